"""Moving writes through the worker threads under a budget, and keeping the first background error."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

from .errors import WriterClosedError
from .future import WriteFuture

__all__ = ["Budget", "Gate", "Pipeline"]

log = logging.getLogger("tensorsink")

#: A write's work; it may mark its future staged before it is done.
Job = Callable[[WriteFuture], list[Path]]


class Budget:
    """Backpressure: at most `max_count` writes and `max_bytes` payload bytes in flight.

    A write larger than the whole byte budget is admitted alone, once nothing else is in flight.
    """

    def __init__(self, max_count: int, max_bytes: int) -> None:
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.count = 0
        self.bytes = 0
        self._cond = threading.Condition(threading.Lock())

    def _fits(self, nbytes: int) -> bool:
        return self.count < self.max_count and (self.count == 0 or self.bytes + nbytes <= self.max_bytes)

    def acquire(self, nbytes: int) -> float:
        """Take room for one write of `nbytes`; returns the seconds spent waiting for it."""
        with self._cond:
            if self._fits(nbytes):
                waited = 0.0
            else:
                start = time.perf_counter()
                while not self._fits(nbytes):
                    self._cond.wait()
                waited = time.perf_counter() - start
            self.count += 1
            self.bytes += nbytes
            return waited

    def release(self, nbytes: int) -> None:
        with self._cond:
            self.count -= 1
            self.bytes -= nbytes
            self._cond.notify_all()


class Gate:
    """Lets calls in while open; close() shuts it and waits until every call let in has left, so
    nothing a late write() does can happen after close() has returned."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._inside = 0
        self.closed = False

    def enter(self) -> bool:
        with self._cond:
            if self.closed:
                return False
            self._inside += 1
            return True

    def leave(self) -> None:
        with self._cond:
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
    """Runs write jobs inline or on `workers` threads; remembers the first background failure."""

    def __init__(self, workers: int, max_count: int, max_bytes: int) -> None:
        self.budget = Budget(max_count, max_bytes)
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix="tensorsink")
        self._in_flight: set[WriteFuture] = set()
        self._in_flight_lock = threading.Lock()
        self._error: BaseException | None = None
        self._error_lock = threading.Lock()

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def run_inline(self, job: Job, future: WriteFuture) -> WriteFuture:
        """Run `job` on the caller's thread; its failure is raised here, and fails the writer as a
        background one does (one rule, wherever a write ran)."""
        try:
            future.set_result(job(future))
        except BaseException as exc:
            if isinstance(exc, Exception):  # not a KeyboardInterrupt that happened to land here
                self._record(exc)
            future.set_exception(exc)
            raise
        return future

    def submit(self, job: Job, nbytes: int, future: WriteFuture) -> float:
        """Queue `job` once the budget has room; returns the seconds spent blocked for it."""
        blocked = self.budget.acquire(nbytes)
        with self._in_flight_lock:
            self._in_flight.add(future)
        try:
            self.executor.submit(self._run, job, nbytes, future)
        except RuntimeError as exc:  # the executor was shut down by a concurrent close()
            self._forget(future)
            self.budget.release(nbytes)
            raise WriterClosedError("the writer was closed while this write() waited for room") from exc
        return blocked

    def _run(self, job: Job, nbytes: int, future: WriteFuture) -> None:
        try:
            result = job(future)
        except BaseException as exc:
            self._record(exc)
            self.budget.release(nbytes)
            future.set_exception(exc)
        else:
            self.budget.release(nbytes)
            future.set_result(result)
        finally:
            self._forget(future)

    def _forget(self, future: WriteFuture) -> None:
        with self._in_flight_lock:
            self._in_flight.discard(future)

    def _record(self, exc: BaseException) -> None:
        with self._error_lock:
            if self._error is None:
                self._error = exc
                return
        log.error("tensorsink: a further background write failed: %r", exc)

    def raise_if_failed(self) -> None:
        """Raise the first background failure, if any (every time: a failed writer stays failed)."""
        if self._error is not None:
            raise self._error

    def drain(self) -> None:
        """Wait for every write submitted before this call."""
        with self._in_flight_lock:
            pending = list(self._in_flight)
        wait(pending)

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True)
