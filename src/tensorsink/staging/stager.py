"""Staging: making a write's device tensors readable from host memory, without stalling the producer.

On the caller's thread (`Stager.stage`): one pool block holding all of the write's device tensors, and
per device one `ready` marker on the producer's stream and one batch of copies into the block: small
outputs share a block, a marker and a completion. A write larger than the whole pool is left to the
worker, which stages it in chunks through the pool (`Staged.wait`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import torch

from ..arrays import Array, nbytes
from ..errors import GraphCaptureError
from ..formats import FileEntry
from .cudart import own_thread
from .engine import Completion, CopyEngine, CudaEngine
from .pool import ALIGNMENT, Block, PinnedPool

if TYPE_CHECKING:
    from ..engine.base import CopyWait

__all__ = ["Staged", "Stager", "on_device"]

log = logging.getLogger("tensorsink")

#: Offsets of tensors inside a shared block: enough for any dtype's alignment.
_TENSOR_ALIGNMENT = 64


def _padded(size: int) -> int:
    return -(-size // _TENSOR_ALIGNMENT) * _TENSOR_ALIGNMENT


def on_device(array: Array) -> bool:
    return isinstance(array, torch.Tensor) and not array.is_cpu


def snapshot_host_arrays(entries: list[FileEntry]) -> list[FileEntry]:
    """The entries with private copies of their host arrays (write(..., copy=True)); device tensors
    are snapshotted by the stager, on their own streams."""
    return [
        entry._replace(arrays=tuple(a if on_device(a) else _host_copy(a) for a in entry.arrays))
        for entry in entries
    ]


def _plain_source(tensor: torch.Tensor) -> torch.Tensor:
    """Detached (no autograd record of the staging copy), with lazy conjugate and negative bits
    applied on the producer's stream: a copy into host memory would otherwise apply them to the
    destination before the data arrives."""
    tensor = tensor.detach()
    if tensor.is_conj() or tensor.is_neg():
        tensor = tensor.resolve_conj().resolve_neg()
    return tensor


def _unpin(pool: PinnedPool) -> None:
    own_thread()
    try:
        pool.close()
    except Exception as exc:  # memory that stays pinned is a leak, not a failed write
        log.warning("tensorsink: unpinning the pool failed: %r", exc)


def _host_copy(array: Array) -> Array:
    return array.clone() if isinstance(array, torch.Tensor) else array.copy()


class Staged:
    """One write's staging: what the worker waits for, and the pool blocks it gives back."""

    def __init__(self, stager: Stager, entries: list[FileEntry]) -> None:
        self._stager = stager
        self._pool: PinnedPool | None = None  # the pool its blocks came from
        self._entries = entries
        self.arrays = [list(entry.arrays) for entry in entries]
        self.blocks: list[Block] = []
        self.completions: list[Completion] = []
        self.chunked: list[tuple[int, int, torch.Tensor, Any]] = []
        self.blocked_seconds = 0.0
        #: Payload bytes held in pool blocks (the pool, not the writer's byte budget, bounds them).
        self.pooled_bytes = 0
        #: Device tensors were left on the device for a device-direct writer, which reads the
        #: caller's memory until the file is written: the write is staged only when it is done.
        self.on_device = False

    def wait(self) -> list[FileEntry]:
        """Block until every staged tensor is in host memory; the entries with host arrays in place."""
        for completion in self.completions:
            completion.wait()
        for i, j, source, ready in self.chunked:
            self.arrays[i][j] = self._stager.copy_in_chunks(source, ready)
        self.completions, self.chunked = [], []
        return self.entries

    def native_waits(self) -> list[CopyWait] | None:
        """Its copies as waits that the native engine's threads make themselves (then no Python thread
        waits for them); None where a Python worker must: chunked copies, tensors left on the device
        for a device-direct writer, a copy engine without them."""
        if self.chunked or self.on_device:
            return None
        waits = [completion.native() for completion in self.completions]
        return None if None in waits else cast(list["CopyWait"], waits)

    @property
    def entries(self) -> list[FileEntry]:
        return [
            entry._replace(arrays=tuple(arrays))
            for entry, arrays in zip(self._entries, self.arrays, strict=True)
        ]

    def release(self, *, landed: bool = False) -> None:
        """Give the pool blocks back, after the files are written or on failure; copies still queued
        into them (a failure part-way) are waited for first, so none can land in a reused block,
        unless they are known to have `landed` (the engine's threads waited for them all)."""
        for completion in [] if landed else self.completions:
            with contextlib.suppress(Exception):
                completion.wait()
        self.completions = []
        blocks, self.blocks = self.blocks, []
        for block in blocks:
            assert self._pool is not None
            self._pool.free(block)


class Stager:
    """Stages device tensors through one pinned pool; the pool and the engine are made on first use."""

    def __init__(self, pool_bytes: int, engine: CopyEngine | None = None, *, pin: bool = True) -> None:
        self.pool_bytes = pool_bytes
        self._engine = engine
        self._pin = pin
        self._pool: PinnedPool | None = None
        self._lock = threading.Lock()
        self._preparing: threading.Thread | None = None

    def prepare(self, device: int | None = None) -> None:
        """Pin the pool in a background thread now, so that no write() pays for it (a writer made in
        a process that uses CUDA already calls this at construction). `device`: the CUDA device whose
        context pins it (the caller's: a new thread's would be device 0, making a context there)."""
        with self._lock:
            if self._pool is not None or self._preparing is not None:
                return
            self._preparing = threading.Thread(
                target=self._make_pool, args=(device,), name="tensorsink-pin", daemon=True
            )
            self._preparing.start()

    def _make_pool(self, device: int | None) -> None:
        own_thread()
        try:
            if device is not None:
                torch.cuda.set_device(device)
            pool = PinnedPool(self.pool_bytes, pin=self._pin)
        except Exception as exc:  # the first write that needs the pool tries again, and raises its own
            log.warning("tensorsink: pinning the pool at construction failed: %r", exc)
            return
        with self._lock:
            if self._pool is None:
                self._pool = pool

    @property
    def engine(self) -> CopyEngine:
        if self._engine is None:
            with self._lock:
                if self._engine is None:
                    self._engine = CudaEngine()
        return self._engine

    @property
    def pool(self) -> PinnedPool:
        """The pool, made at the first use unless prepare() started it (then its end is waited for).

        It is pinned on a thread of its own, never the caller's: the caller may be capturing a CUDA
        graph, and a failed pin's error must not stay behind on its thread. If that fails, it is made
        here (torch's pinned allocator), raising its own error."""
        if self._pool is None:
            if self._pin and self._preparing is None:
                device = torch.cuda.current_device() if torch.cuda.is_initialized() else None  # type: ignore[no-untyped-call]
                self.prepare(device)
            preparing = self._preparing
            if preparing is not None:
                preparing.join()
            with self._lock:  # two threads' first CUDA writes must not make two pools
                if self._pool is None:
                    self._pool = PinnedPool(self.pool_bytes, pin=self._pin)
        return self._pool

    def close(self) -> None:
        """Unpin the pool (no write may be in flight), on a thread of the writer's: the caller's may be
        capturing. A pool still being pinned is waited for first."""
        preparing = self._preparing
        if preparing is not None:
            preparing.join()
        pool = self._pool
        if pool is None:
            return
        unpinning = threading.Thread(target=_unpin, args=(pool,), name="tensorsink-unpin", daemon=True)
        unpinning.start()
        unpinning.join()

    @property
    def pool_started(self) -> bool:
        return self._pool is not None

    def stage(
        self,
        entries: list[FileEntry],
        *,
        copy: bool = False,
        direct: Callable[[], bool] | None = None,
    ) -> tuple[list[FileEntry], Staged | None]:
        """Queue the copies of the entries' device tensors; the entries and their staging (None when
        every array is in host memory).

        Blocks while the pool has no room. With copy=True each device tensor is first snapshotted on
        its producer's stream and each host array copied, so the caller may overwrite them as soon as
        this returns. When `direct()` says so (asked once a device tensor is found), device tensors
        stay on the device for a device-direct writer: ordered by the same events, copied only into
        ALIGNMENT-aligned device buffers where their address or layout is not fit for direct I/O.
        """
        if copy:
            entries = [
                entry._replace(
                    arrays=tuple(a if self._needs_copy(a) else _host_copy(a) for a in entry.arrays)
                )
                for entry in entries
            ]
        found: dict[torch.device, list[tuple[int, int, torch.Tensor]]] = {}
        staged: Staged | None = None
        for i, entry in enumerate(entries):
            for j, array in enumerate(entry.arrays):
                if not self._needs_copy(array):
                    continue
                assert isinstance(array, torch.Tensor)
                if staged is None:
                    staged = Staged(self, entries)
                if self.engine.owns(array):
                    found.setdefault(array.device, []).append((i, j, _plain_source(array)))
                else:  # a device no engine serves: a plain blocking copy
                    staged.arrays[i][j] = array.detach().to("cpu")
        if staged is None:
            return entries, None
        if found and self.engine.capturing():
            raise GraphCaptureError(
                "write() of a CUDA tensor while the current stream captures a CUDA graph: its copy would "
                "be captured too, not run. Write the graph's outputs after replay() (copy=True if the "
                "graph overwrites them next), outside the capture"
            )
        try:
            if found and direct is not None and direct():
                self._keep_on_device(staged, list(found.values()), copy)
            else:
                self._stage_groups(staged, list(found.values()), copy)
        except BaseException:
            staged.release()
            raise
        return staged.entries, staged

    def _needs_copy(self, array: Array) -> bool:
        """On a device; an engine given at construction is asked about every array."""
        return on_device(array) or (self._engine is not None and self._engine.owns(array))

    def _stage_groups(
        self, staged: Staged, groups: list[list[tuple[int, int, torch.Tensor]]], copy: bool
    ) -> None:
        """One pool block for the whole write (so no write holds a block while it waits for another),
        then per device one ready marker and one batch of copies into its part of the block."""
        if not groups:
            return
        engine = self.engine
        if copy:
            groups = [[(i, j, engine.snapshot(source)) for i, j, source in group] for group in groups]
        sizes = [[_padded(nbytes(source)) for _, _, source in group] for group in groups]
        total = sum(map(sum, sizes))
        if PinnedPool.rounded(total) > self.pool.capacity:
            for group in groups:
                contiguous = [(i, j, s if s.is_contiguous() else s.contiguous()) for i, j, s in group]
                ready = engine.ready(contiguous[0][2])  # after the contiguous copies, on the same stream
                staged.chunked += [(i, j, source, ready) for i, j, source in contiguous]
            return
        pool = self.pool
        block, waited = pool.allocate(total)
        staged._pool = pool
        staged.blocks.append(block)
        staged.blocked_seconds += waited
        memory = pool.view(block)
        offset = 0
        for group, group_sizes in zip(groups, sizes, strict=True):
            pairs = []
            for (i, j, source), size in zip(group, group_sizes, strict=True):
                host = memory[offset : offset + nbytes(source)].view(source.dtype).view(source.shape)
                pairs.append((host, source))
                staged.arrays[i][j] = host
                staged.pooled_bytes += nbytes(source)
                offset += size
            staged.completions.append(engine.copy(pairs, engine.ready(group[0][2])))

    def _keep_on_device(
        self, staged: Staged, groups: list[list[tuple[int, int, torch.Tensor]]], copy: bool
    ) -> None:
        engine = self.engine
        staged.on_device = True
        for group in groups:
            members = [(i, j, engine.snapshot(source)) for i, j, source in group] if copy else group
            fit: list[torch.Tensor] = []
            pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
            for i, j, source in members:
                if source.is_contiguous() and source.data_ptr() % ALIGNMENT == 0:
                    fit.append(source)
                    staged.arrays[i][j] = source  # a snapshot, with copy=True
                else:  # allocated before the marker, so its earlier users are ordered before the copy
                    aligned = engine.aligned_like(source, ALIGNMENT)
                    pairs.append((aligned, source))
                    staged.arrays[i][j] = aligned
            ready = engine.ready(members[0][2])
            if pairs:
                staged.completions.append(engine.copy(pairs, ready))
            if fit:
                staged.completions.append(engine.fence(ready, fit))

    def copy_in_chunks(self, source: torch.Tensor, ready: object) -> torch.Tensor:
        """`source` (contiguous, larger than the pool) copied into ordinary host memory, pool-sized piece
        by piece; a piece for which the pool has no room now goes straight to the host memory instead."""
        host = torch.empty(source.shape, dtype=source.dtype)
        source_bytes = source.reshape(-1).view(torch.uint8)
        host_bytes = host.reshape(-1).view(torch.uint8)
        step = max(ALIGNMENT, self.pool.capacity // 2 // ALIGNMENT * ALIGNMENT)
        for start in range(0, source_bytes.numel(), step):
            piece = source_bytes[start : start + step]
            target = host_bytes[start : start + step]
            block = self.pool.try_allocate(piece.numel())
            if block is None:
                self.engine.copy([(target, piece)], ready).wait()
                continue
            try:
                bounce = self.pool.view(block)[: piece.numel()]
                self.engine.copy([(bounce, piece)], ready).wait()
                target.copy_(bounce)
            finally:
                self.pool.free(block)
        return host
