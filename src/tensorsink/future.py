"""The handle write() returns."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError, wait
from concurrent.futures._base import FINISHED, PENDING
from pathlib import Path
from typing import Any, Protocol

__all__ = ["Callbacks", "WriteFuture", "WriteHandle", "as_future", "run_callback"]

log = logging.getLogger("tensorsink")

#: Orders the first use of a future's Condition against a completion that found none (see WriteFuture).
#: Reentrant, and only ever held for a few bytecodes (the Condition is made before it is taken): a
#: signal handler or a finalizer that looks at a future while this thread holds it must not deadlock.
_WAKING = threading.RLock()


class WriteHandle(Protocol):
    """What write() and write_batch() return: a WriteFuture, or the native engine's handle (made and
    settled in C, without a Python thread), which has the same methods but is not a
    concurrent.futures.Future: `as_future()` makes one of it, for concurrent.futures.wait."""

    def done(self) -> bool: ...
    def result(self, timeout: float | None = None) -> list[Path]: ...
    def exception(self, timeout: float | None = None) -> BaseException | None: ...
    def add_done_callback(self, fn: Callable[[Any], object], /) -> None: ...
    def cancel(self) -> bool: ...
    def staged(self) -> bool: ...
    def wait_staged(self, timeout: float | None = None) -> bool: ...
    def as_future(self) -> Future[list[Path]]: ...


class WriteFuture(Future[list[Path]]):
    """A concurrent.futures.Future whose result is the list of final Paths a write() committed.

    It has two stages: *staged*, when the writer no longer reads the caller's tensors (they may be
    modified again), and *done*, when the files are committed. CPU tensors are read until their files
    are written, so for them the two coincide; device tensors are staged once their copy to host
    memory has finished, and with write(..., copy=True) at once. Writes cannot be cancelled: cancel()
    returns False.

    Most futures are completed before anyone looks at them, so the Condition every Future carries is
    made on first use (by result(), done(), wait(), a callback), not by write(): it was the largest
    cost left on the caller's thread. A completion that finds no Condition sets the result bare;
    `_WAKING` orders the two, so a waiter either sees the result or is woken by it.
    """

    def __init__(self, *, staged_apart: bool = False, callbacks: Callbacks | None = None) -> None:
        # Future.__init__ without its Condition (made by the `_condition` property below).
        self._state = PENDING
        self._result = None
        self._exception = None
        self._waiters = []
        self._done_callbacks: list[Callable[[Future[list[Path]]], object]] = []
        self._made_condition: threading.Condition | None = None
        self._staged = threading.Event() if staged_apart else None
        self._callbacks_runner = callbacks
        self._reserved = False  # the runner counts this future's callbacks already

    @property
    def _condition(self) -> threading.Condition:  # type: ignore[override]  # Future's, made on first use
        condition = self._made_condition
        if condition is None:
            made = threading.Condition()
            with _WAKING:
                if self._made_condition is None:
                    self._made_condition = made
                condition = self._made_condition
        return condition

    def staged(self) -> bool:
        """Whether the source tensors may be modified again."""
        return self.done() if self._staged is None else self._staged.is_set()

    def wait_staged(self, timeout: float | None = None) -> bool:
        """Wait until the source tensors may be modified again; False if `timeout` passed first."""
        if self._staged is None:
            return bool(wait([self], timeout).done)
        return self._staged.wait(timeout)

    def set_staged(self) -> None:
        assert self._staged is not None, "only a future created with staged_apart=True is staged apart"
        self._staged.set()

    def set_result(self, result: list[Path]) -> None:
        if self._staged is not None:
            self._staged.set()
        if self._settled_bare(result, None):
            return
        self._reserve_callbacks()
        super().set_result(result)

    def set_exception(self, exception: BaseException | None) -> None:
        if self._staged is not None:
            self._staged.set()
        if self._settled_bare(None, exception):
            return
        self._reserve_callbacks()
        super().set_exception(exception)

    def _reserve_callbacks(self) -> None:
        """Count the callbacks as due before the waiters are woken: a flush() woken by this future
        must find them pending, not yet handed over (Future wakes waiters, then calls callbacks)."""
        runner = self._callbacks_runner
        if runner is not None:
            with self._condition:
                if self._done_callbacks and not self._reserved:
                    runner.reserve()
                    self._reserved = True

    def _settled_bare(self, result: list[Path] | None, exception: BaseException | None) -> bool:
        """Settle without a Condition where none was made: then nobody waits, and no callback is set."""
        with _WAKING:
            if self._made_condition is not None:
                return False
            if self._state == FINISHED:
                raise InvalidStateError("this write's future is settled already")
            self._result, self._exception, self._state = result, exception, FINISHED
            return True

    def cancel(self) -> bool:
        return False

    def as_future(self) -> Future[list[Path]]:
        """This handle as a concurrent.futures.Future (for concurrent.futures.wait): itself."""
        return self

    def _invoke_callbacks(self) -> None:
        """Done-callbacks run on the writer's callback thread, never on the thread that completes
        writes: one that calls write() on a full budget would wait there for itself."""
        runner = self._callbacks_runner
        if runner is None or not self._done_callbacks:
            super()._invoke_callbacks()  # type: ignore[misc]  # Future's own, on this thread
            return
        callbacks, self._done_callbacks = self._done_callbacks, []
        runner.run(self, callbacks, reserved=self._reserved)


class Callbacks:
    """A writer's thread for the done-callbacks of its futures, started at the first one.

    A callback that raises (SystemExit included) is logged, and the others still run. wait() returns
    once every callback handed over so far has run, so flush() and close() return after them.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Future[list[Path]], list[Callable[..., object]]] | None]
        self._queue = queue.SimpleQueue()
        self._cond = threading.Condition()
        self._pending = 0
        self._thread: threading.Thread | None = None

    def reserve(self) -> None:
        """Count one future's callbacks as pending before they are handed over (see run)."""
        with self._cond:
            self._pending += 1

    def run(
        self, future: Future[list[Path]], callbacks: list[Callable[..., object]], *, reserved: bool = False
    ) -> None:
        with self._cond:
            if not reserved:
                self._pending += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="tensorsink-callbacks", daemon=True)
                self._thread.start()
        self._queue.put((future, callbacks))

    @property
    def here(self) -> bool:
        """Whether the calling thread is the one that runs the callbacks."""
        return threading.current_thread() is self._thread

    @property
    def pending(self) -> int:
        return self._pending

    def _loop(self) -> None:
        from .staging.cudart import own_thread  # here: `import tensorsink` loads no torch

        own_thread()  # the writer's: a writer dropped here is closed on a thread of its own
        while (item := self._queue.get()) is not None:
            future, callbacks = item
            for callback in callbacks:
                try:
                    callback(future)
                except BaseException:
                    log.exception("tensorsink: a write's done-callback %r raised", callback)
            with self._cond:
                self._pending -= 1
                if not self._pending:
                    self._cond.notify_all()

    def wait(self) -> None:
        """Wait for the callbacks handed over so far (at once on the callbacks' own thread)."""
        if threading.current_thread() is self._thread:
            return
        with self._cond:
            while self._pending:
                self._cond.wait()

    def stop(self, *, wait: bool = True) -> None:
        """Run what is queued, then end the thread (joined unless `wait` is False)."""
        thread = self._thread
        if thread is not None:
            self._queue.put(None)
            if wait and threading.current_thread() is not thread:
                thread.join()


def run_callback(callback: Callable[[Any], object], handle: Any) -> None:
    """Call a done-callback as a concurrent.futures.Future does: an exception is logged, not raised."""
    try:
        callback(handle)
    except Exception:
        log.exception("tensorsink: a write's done-callback %r raised", callback)


def as_future(handle: Any) -> Future[list[Path]]:
    """A concurrent.futures.Future settled with `handle` (a write's handle of the native engine, which
    is not one), for concurrent.futures.wait and as_completed."""
    future: Future[list[Path]] = Future()

    def settle(done: Any) -> None:
        failure = done.exception()
        if failure is not None:
            future.set_exception(failure)
        else:
            future.set_result(done.result())

    handle.add_done_callback(settle)
    return future
