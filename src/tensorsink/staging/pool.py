"""A pool of page-locked host memory, allocated once and sub-allocated per write.

Pinning costs milliseconds per GiB and takes a driver-wide lock, so it happens once, and for exactly
the size asked: anonymous memory mapped by the pool and registered with cudaHostRegister (torch's
`pin_memory=True` allocator rounds up to a power of two: 1.5 GiB would pin 2 GiB for the process's
life). Writes then take blocks of exactly the size they need (rounded up to ALIGNMENT) by first fit,
and freed blocks merge with their neighbours. A full pool blocks the caller: it is the byte budget
of CUDA writes.
"""

from __future__ import annotations

import bisect
import logging
import mmap
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .cudart import before_cuda, clear_last_error

log = logging.getLogger("tensorsink")

__all__ = ["ALIGNMENT", "Block", "PinnedPool", "default_pool_bytes"]

#: Block offsets and sizes are multiples of this: any dtype may be viewed at a block's start, and
#: 4 KiB-aligned I/O (O_DIRECT, GPUDirect Storage) can use the memory as it is.
ALIGNMENT = 4096


def default_pool_bytes() -> int:
    """1 GiB, or an eighth of the host's memory where that is less."""
    try:
        import os

        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 30
    return max(64 << 20, min(1 << 30, physical // 8 // ALIGNMENT * ALIGNMENT))


#: cudaHostRegister's flag for memory every CUDA context (every device) treats as pinned.
_PORTABLE = 1


def pinned_buffer(nbytes: int) -> tuple[torch.Tensor, Callable[[], None]]:
    """`nbytes` of page-locked host memory as a uint8 tensor, and what unpins it: private anonymous
    memory mapped here and registered with CUDA for every device. Where that fails (or torch offers
    no cudaHostRegister), torch's pinned allocator, which rounds up to a power of two, with a log
    line saying so."""
    before_cuda()
    cudart = torch.cuda.cudart()  # type: ignore[no-untyped-call]
    register = getattr(cudart, "cudaHostRegister", None)
    if register is not None:
        memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # page-aligned, exact
        buffer = torch.frombuffer(memory, dtype=torch.uint8)  # keeps `memory` alive as long as any view
        address = buffer.data_ptr()
        error = int(register(address, nbytes, _PORTABLE))
        if error == 0:

            def unpin() -> None:
                before_cuda()
                cudart.cudaHostUnregister(address)

            return buffer, unpin
        clear_last_error()  # else the thread's next kernel launch would raise this error
        log.warning(
            "tensorsink: pinning %d bytes failed (CUDA error %d); using torch's pinned memory", nbytes, error
        )
    else:
        log.warning("tensorsink: no cudaHostRegister in this torch; the pinned pool is rounded up")
    return _torch_pinned(nbytes), lambda: None


def _torch_pinned(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


@dataclass(frozen=True)
class Block:
    """A piece of the pool: [offset, offset + nbytes)."""

    offset: int
    nbytes: int


class PinnedPool:
    """First-fit sub-allocator over one host buffer; thread-safe; blocks while it has no room.

    `pin=False` backs it with ordinary memory (no CUDA needed), which is how its bookkeeping is tested.
    """

    def __init__(self, capacity: int, *, pin: bool = True) -> None:
        if capacity < ALIGNMENT:
            raise ValueError(f"pinned_pool_bytes={capacity} is too small; use at least {ALIGNMENT}")
        self.capacity = capacity // ALIGNMENT * ALIGNMENT
        self._unpin: weakref.finalize[[], PinnedPool] | None = None
        if pin:
            self.buffer, unpin = pinned_buffer(self.capacity)
            # Unpinned by close() (the writer's), or else once the pool itself is gone (staged writes
            # hold it while their copies run); never at interpreter exit, when workers may still read it.
            self._unpin = weakref.finalize(self, unpin)
            self._unpin.atexit = False
        else:
            self.buffer = torch.empty(self.capacity, dtype=torch.uint8)
        self._free: list[tuple[int, int]] = [(0, self.capacity)]  # (offset, size), sorted by offset
        self._cond = threading.Condition()
        self.in_use = 0
        self.peak = 0

    def close(self) -> None:
        """Unpin the memory now (no block may be in use): it stays valid, as ordinary memory."""
        if self._unpin is not None:
            self._unpin()  # once: a finalize runs its function at most once

    @staticmethod
    def rounded(nbytes: int) -> int:
        return max(ALIGNMENT, -(-nbytes // ALIGNMENT) * ALIGNMENT)

    def try_allocate(self, nbytes: int) -> Block | None:
        """A block of at least `nbytes`, or None if no free run is large enough now."""
        size = self.rounded(nbytes)
        with self._cond:
            return self._take(size)

    def allocate(self, nbytes: int) -> tuple[Block, float]:
        """A block of at least `nbytes`, waiting for frees if needed; also the seconds waited."""
        size = self.rounded(nbytes)
        if size > self.capacity:
            raise ValueError(f"a block of {nbytes} bytes cannot come from a pool of {self.capacity}")
        with self._cond:
            block = self._take(size)
            if block is not None:
                return block, 0.0
            start = time.perf_counter()
            while block is None:
                self._cond.wait()
                block = self._take(size)
            return block, time.perf_counter() - start

    def free(self, block: Block) -> None:
        with self._cond:
            index = bisect.bisect(self._free, (block.offset, 0))
            offset, size = block.offset, block.nbytes
            if index < len(self._free) and self._free[index][0] == offset + size:  # merge with the next
                size += self._free.pop(index)[1]
            if index > 0 and sum(self._free[index - 1]) == offset:  # merge with the previous
                offset, previous = self._free.pop(index - 1)
                size += previous
                index -= 1
            self._free.insert(index, (offset, size))
            self.in_use -= block.nbytes
            self._cond.notify_all()

    def view(self, block: Block) -> torch.Tensor:
        """The block's memory as a uint8 tensor."""
        return self.buffer[block.offset : block.offset + block.nbytes]

    def _take(self, size: int) -> Block | None:
        for index, (offset, free) in enumerate(self._free):
            if free >= size:
                if free == size:
                    del self._free[index]
                else:
                    self._free[index] = (offset + size, free - size)
                self.in_use += size
                self.peak = max(self.peak, self.in_use)
                return Block(offset, size)
        return None

    def free_runs(self) -> list[tuple[int, int]]:
        """The free runs as (offset, size), for tests and diagnostics."""
        with self._cond:
            return list(self._free)
