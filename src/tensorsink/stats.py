"""Counters a writer keeps for progress logs and benchmarks."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

__all__ = ["ShardStats", "StatsRecorder", "WriterStats"]


@dataclass(frozen=True)
class WriterStats:
    """A snapshot of a writer's progress; elapsed runs from the first write() to the latest commit."""

    files: int
    bytes: int
    errors: int
    in_flight: int
    #: The part of write_seconds spent waiting for room: the budget (max_inflight, max_inflight_bytes)
    #: or the pinned pool.
    blocked_seconds: float
    elapsed_seconds: float
    #: Size of the pinned staging pool (0 until a device tensor was written) and the most of it in use.
    pinned_pool_bytes: int = 0
    pinned_peak_bytes: int = 0
    #: Payload bytes committed per backend ("posix", "kvikio").
    bytes_by_backend: dict[str, int] = field(default_factory=dict)
    #: Writes (or batch samples) skipped with skip_existing because a journal records their files.
    skipped: int = 0
    #: The write engine that commits the files: "native" or "python".
    engine: str = "python"
    #: The callers' time inside write() and write_batch(), whole: checks, staging, any file written on
    #: the caller's thread, and blocked_seconds.
    write_seconds: float = 0.0
    #: write() and write_batch() calls made.
    writes: int = 0

    @property
    def bytes_per_second(self) -> float:
        return self.bytes / self.elapsed_seconds if self.elapsed_seconds > 0 else 0.0

    @property
    def files_per_second(self) -> float:
        return self.files / self.elapsed_seconds if self.elapsed_seconds > 0 else 0.0

    def __str__(self) -> str:
        return (
            f"{self.files:,} files, {self.bytes / 2**20:,.1f} MiB in {self.elapsed_seconds:.2f} s "
            f"({self.bytes_per_second / 2**20:,.1f} MiB/s, {self.files_per_second:,.0f} files/s), "
            f"{self.write_seconds:.2f} s in {self.writes:,} write() calls ({self.blocked_seconds:.2f} s "
            f"of it blocked), {self.in_flight} in flight, {self.errors} errors"
            + (self._pool_text() if self.pinned_pool_bytes else "")
            + (f", {self.skipped:,} skipped as already written" if self.skipped else "")
        )

    def _pool_text(self) -> str:
        peak, size = self.pinned_peak_bytes / 2**20, self.pinned_pool_bytes / 2**20
        return f", pinned pool peak {peak:,.0f} of {size:,.0f} MiB"


class StatsRecorder:
    """Thread-safe counters behind WriterStats."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files = 0
        self._bytes = 0
        self._errors = 0
        self._skipped = 0
        self._blocked = 0.0
        self._write_seconds = 0.0
        self._writes = 0
        self._by_backend: dict[str, int] = {}
        self._first: float | None = None
        self._last: float | None = None

    def write_started(self) -> None:
        if self._first is None:
            with self._lock:
                if self._first is None:
                    self._first = time.perf_counter()

    def files_committed(self, count: int, bytes_by_backend: dict[str, int]) -> None:
        """`count` files committed, their payload bytes per backend (a reap's worth at once)."""
        if not count:
            return
        with self._lock:
            self._files += count
            for backend, nbytes in bytes_by_backend.items():
                self._bytes += nbytes
                self._by_backend[backend] = self._by_backend.get(backend, 0) + nbytes
            self._last = time.perf_counter()

    def skipped(self, count: int) -> None:
        with self._lock:
            self._skipped += count

    def write_failed(self, count: int = 1) -> None:
        if count:
            with self._lock:
                self._errors += count

    def called(self, seconds: float) -> None:
        """One write() or write_batch() call returned (or raised) after `seconds`."""
        with self._lock:
            self._write_seconds += seconds
            self._writes += 1

    def blocked(self, seconds: float) -> None:
        if seconds:
            with self._lock:
                self._blocked += seconds

    def snapshot(
        self,
        in_flight: int,
        pinned_pool_bytes: int = 0,
        pinned_peak_bytes: int = 0,
        *,
        engine: str = "python",
        ready: tuple[int, int, int, float] = (0, 0, 0, 0.0),
        plain: tuple[int, float, float, float] = (0, 0.0, 0.0, 0.0),
    ) -> WriterStats:
        """`ready`: the engine's own counts of the writes it completed itself (files, payload bytes,
        files failed, time of the latest); `plain`: its counts of the write() calls it took whole
        (calls, seconds in them, seconds of those blocked, time of the first); added to these."""
        with self._lock:
            files, nbytes, failed, ready_last = ready
            calls, call_seconds, call_blocked, plain_first = plain
            first = self._first
            if calls and (first is None or plain_first < first):
                first = plain_first
            by_backend = dict(self._by_backend)
            if nbytes:
                by_backend["posix"] = by_backend.get("posix", 0) + nbytes
            last = max(self._last or 0.0, ready_last) if files or self._last is not None else None
            elapsed = 0.0
            if first is not None and last is not None:
                elapsed = last - first
            return WriterStats(
                self._files + files,
                self._bytes + nbytes,
                self._errors + failed,
                in_flight,
                self._blocked + call_blocked,
                elapsed,
                pinned_pool_bytes,
                pinned_peak_bytes,
                by_backend,
                self._skipped,
                engine,
                self._write_seconds + call_seconds,
                self._writes + calls,
            )


_SHARD_COUNTS = ("samples", "shards", "bytes", "errors", "skipped", "writes")
_SHARD_SECONDS = ("write_seconds", "blocked_seconds")


@dataclass(frozen=True)
class ShardStats:
    """A ShardWriter's progress; `snapshot()` of a live one, made by the writer's `stats()`."""

    samples: int = 0  # in committed shards
    shards: int = 0  # committed
    bytes: int = 0  # of committed shards, tar headers included
    errors: int = 0
    skipped: int = 0  # samples skipped with skip_existing
    writes: int = 0  # write() and write_batch() calls
    write_seconds: float = 0.0  # the callers' time inside them, blocked_seconds included
    blocked_seconds: float = 0.0  # waiting for room under max_inflight_bytes
    elapsed_seconds: float = 0.0  # from the writer's start to the latest commit
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    _started: float = field(default_factory=time.perf_counter, repr=False, compare=False)

    def add(self, **amounts: float) -> None:
        """Add to the counters (thread-safe); the elapsed time runs to this call."""
        with self._lock:
            for name, amount in amounts.items():
                object.__setattr__(self, name, getattr(self, name) + amount)
            object.__setattr__(self, "elapsed_seconds", time.perf_counter() - self._started)

    def snapshot(self) -> ShardStats:
        with self._lock:
            return ShardStats(**{name: getattr(self, name) for name in (*_SHARD_COUNTS, *_SHARD_SECONDS)},
                              elapsed_seconds=self.elapsed_seconds)  # fmt: skip

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.elapsed_seconds if self.elapsed_seconds > 0 else 0.0

    def __str__(self) -> str:
        return (
            f"{self.samples:,} samples in {self.shards:,} shards, {self.bytes / 2**20:,.1f} MiB in "
            f"{self.elapsed_seconds:.2f} s ({self.samples_per_second:,.0f} samples/s), "
            f"{self.write_seconds:.2f} s in {self.writes:,} write calls ({self.blocked_seconds:.2f} s "
            f"of it blocked), {self.errors} errors"
            + (f", {self.skipped:,} skipped as already written" if self.skipped else "")
        )
