"""Moving writes through the worker threads under a budget, and keeping the first background error."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import WriterClosedError
from .future import Callbacks, WriteFuture

if TYPE_CHECKING:
    from .engine.base import BudgetLike
from .staging.cudart import own_thread

__all__ = ["Budget", "Finished", "Gate", "Pipeline", "run_in"]


def run_in(executor: ThreadPoolExecutor, job: Callable[[], None]) -> bool:
    """Run `job` in `executor`, or here once the interpreter's exit has stopped every thread pool (a
    thread still writes then: writers are closed after such threads end). False if the executor was
    shut down otherwise, and `job` not run."""
    try:
        executor.submit(job)
    except RuntimeError:
        if not sys.is_finalizing() and not _executors_stopped():
            return False
        job()
    return True


def _executors_stopped() -> bool:
    """Whether the interpreter's exit has stopped the thread pools (concurrent.futures.thread)."""
    import concurrent.futures.thread as pools

    return bool(getattr(pools, "_shutdown", False))


log = logging.getLogger("tensorsink")


#: A finished write as Pipeline.finish takes it: its budgeted bytes, its future, its files or its error.
Finished = tuple[int, WriteFuture, "list[Path] | None", "BaseException | None"]


class Budget:
    """Backpressure: at most `max_count` writes and `max_bytes` payload bytes in flight.

    A write larger than the whole byte budget is admitted alone, once nothing else is in flight.
    """

    def __init__(self, max_count: int, max_bytes: int) -> None:
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.count = 0
        self.bytes = 0
        # The lock itself where nobody waits (a Condition's `with` is Python code, its lock's is not).
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._waiting = 0

    @property
    def waiting(self) -> int:
        """Callers waiting for room now."""
        return self._waiting

    def _fits(self, nbytes: int) -> bool:
        return self.count < self.max_count and (self.count == 0 or self.bytes + nbytes <= self.max_bytes)

    def acquire(self, nbytes: int) -> float:
        """Take room for one write of `nbytes`; returns the seconds spent waiting for it."""
        with self._lock:
            if self._fits(nbytes):
                waited = 0.0
            else:
                start = time.perf_counter()
                self._waiting += 1
                try:
                    while not self._fits(nbytes):
                        self._cond.wait()
                finally:
                    self._waiting -= 1
                waited = time.perf_counter() - start
            self.count += 1
            self.bytes += nbytes
            return waited

    def release(self, nbytes: int, count: int = 1) -> None:
        """Give back the room of `count` writes of `nbytes` bytes in all (a reap's worth at once)."""
        with self._lock:
            self.count -= count
            self.bytes -= nbytes
            if self._waiting:
                self._cond.notify_all()


class Gate:
    """Lets calls in while open; close() shuts it and waits until every call let in has left, so
    nothing a late write() does can happen after close() has returned."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._inside = 0
        self.closed = False

    def enter(self) -> bool:
        with self._lock:
            if self.closed:
                return False
            self._inside += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self._inside -= 1
            if self._inside == 0 and self.closed:
                self._cond.notify_all()

    def close(self) -> bool:
        """Shut the gate and wait for the calls inside; True the first time only."""
        with self._cond:
            first = not self.closed
            self.closed = True
            while self._inside:
                self._cond.wait()
            return first


class Pipeline:
    """Admits writes under the budget, tracks them until they finish, and keeps the first failure.

    Its threads (`executor`) prepare the writes whose bytes are not ready at write(): they wait for
    staging copies and run custom writers; the engine does the writing.
    """

    def __init__(
        self,
        workers: int,
        budget: BudgetLike,
        callbacks: Callbacks | None = None,
        on_failure: Callable[[], object] | None = None,
    ) -> None:
        self.budget = budget  # the engine's: its ready route gives room back without Python
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix="tensorsink", initializer=own_thread)
        self.callbacks = callbacks or Callbacks()  # futures made with it run their done-callbacks there
        # Added by callers and discarded by completions without a lock: set.add, set.discard and list(set)
        # are each one step under the GIL, and a lock here would be one a completion can hold while it
        # waits for the GIL, stalling the caller's next write().
        self._in_flight: set[WriteFuture] = set()
        self._error: BaseException | None = None
        self.failed_at = 0.0
        self._error_lock = threading.Lock()
        self._on_failure = on_failure  # told once, when the first failure is kept

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def admit(self, nbytes: int, future: WriteFuture) -> float:
        """Take room for a write once the budget has it; returns the seconds spent blocked."""
        blocked = self.budget.acquire(nbytes)
        self._in_flight.add(future)
        return blocked

    def prepare(self, job: Callable[[], None]) -> None:
        """Run `job` (which finishes its write itself, also on failure) on a worker thread."""
        if not run_in(self.executor, job):
            raise WriterClosedError("the writer was closed while this write() was starting")

    def finish(self, done: list[Finished]) -> None:
        """Writes are done: give back their room at once, complete their futures; a failure fails the
        writer."""
        self.budget.release(sum(nbytes for nbytes, _, _, _ in done), len(done))
        in_flight = self._in_flight
        for _, future, result, error in done:
            try:
                if error is not None:
                    self.record(error)
                    future.set_exception(error)
                else:
                    future.set_result(result or [])
            except BaseException:  # one future that cannot be settled must not strand the others
                log.exception("tensorsink: settling a write's future failed")
            finally:
                in_flight.discard(future)

    def record(self, exc: BaseException) -> None:
        """Keep `exc` as the writer's failure, unless it failed already (then it is logged)."""
        with self._error_lock:
            first = self._error is None
            if first:
                self._error = exc
                self.failed_at = time.perf_counter()
        if first:
            if self._on_failure is not None:
                self._on_failure()
            return
        if exc is not self._error:
            log.error("tensorsink: a further write failed: %r", exc)

    def raise_if_failed(self) -> None:
        """Raise the first failure, if any (every time: a failed writer stays failed)."""
        if self._error is not None:
            raise self._error

    @property
    def error(self) -> BaseException | None:
        """The first failure, if any; `failed_at` says when (time.perf_counter())."""
        return self._error

    def drain(self) -> None:
        """Wait for every write admitted before this call."""
        wait(list(self._in_flight))

    def shutdown(self, *, wait_callbacks: bool = True) -> None:
        self.executor.shutdown(wait=True)
        self.callbacks.stop(wait=wait_callbacks)
