"""What a benchmark run compares: the machine's ceiling, tensorsink, and the usual ways of saving.

Every contender writes the same items into its own empty folder with the same durability, and times
itself from its first call to its last file committed. Work done before the first item (host copies the
ceiling needs) is not timed; work a real loop would do per item (`.cpu()` for the peers) is.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from ..arrays import byte_view
from ..formats.base import write_buffers
from ..options import Backend, DictMode, Durability, SaveFormat
from ..writer import AsyncWriter
from .workloads import Item, item_bytes

native_loop: Callable[[list[str], list[str], list[Sequence[object]], int, int], None] | None
try:
    from ._bare import bare_loop as native_loop
except ImportError:  # the bare loop's extension was not built: the Python loop is the ceiling
    native_loop = None

__all__ = ["SAVERS", "Contender", "PoolWriter", "Sample", "Saver", "contenders_for"]


@dataclass(frozen=True)
class Sample:
    """One timed run: seconds end to end, and each per-item call the caller made (what it was blocked)."""

    seconds: float
    call_seconds: list[float] = field(default_factory=list)
    #: Which backend carried the bytes, where the contender can tell.
    backend: str | None = None


@dataclass(frozen=True)
class Contender:
    name: str
    kind: str  # "ceiling", "tensorsink" or "peer"
    run: Callable[[Path, Sequence[Item], Durability], Sample]


def contenders_for(
    save_format: SaveFormat, dict_mode: DictMode, workers: int, backend: Backend, device: torch.device
) -> list[Contender]:
    """The contenders of one run, ceilings first."""
    cores = min(os.cpu_count() or 1, 8)
    threads = [1, cores] if cores > 1 else [1]
    if native_loop is not None:  # the physical ceiling: the loop in C; the same loop in Python is a peer
        chosen = [
            Contender(f"ceiling: bare loop in C, {_threads(n)}", "ceiling", native_bare_loop(n))
            for n in threads
        ]
        chosen += [
            Contender(f"peer: bare loop in Python, {_threads(n)}", "peer", bare_loop(n)) for n in threads
        ]
    else:
        chosen = [Contender(f"ceiling: bare loop, {_threads(n)}", "ceiling", bare_loop(n)) for n in threads]
    if device.type == "cuda":
        chosen.append(Contender("ceiling: pinned cudaMemcpy", "ceiling", pinned_copy_peak))
    tensorsink = tensorsink_writer(save_format, dict_mode, workers, backend)
    chosen += [
        Contender(f"tensorsink {save_format.value}", "tensorsink", tensorsink),
        Contender("peer: torch.save per sample", "peer", per_sample(_save_pt)),
        Contender("peer: np.save per sample", "peer", per_sample(_save_npy)),
        Contender("peer: safetensors.save_file", "peer", per_sample(_save_safetensors)),
        Contender(f"peer: thread pool + {save_format.value}", "peer", thread_pool(SAVERS[save_format])),
    ]
    return chosen


# Durability, applied alike by every contender that is not tensorsink.


def _sync_directory(directory: Path, durability: Durability) -> None:
    if durability is Durability.FULL:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _sync_files(paths: Sequence[Path], durability: Durability) -> None:
    if durability is Durability.NONE:
        return
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    _sync_directory(paths[0].parent, durability)


# The ceiling: the same bytes through open, write, fsync as asked, close, rename; nothing else.


def _host_buffers(items: Sequence[Item]) -> list[list[memoryview]]:
    host = [_host(item) for item in items]
    return [[byte_view(t) for t in (h.values() if isinstance(h, dict) else [h])] for h in host]


def _bare_write(root: Path, index: int, buffers: list[memoryview], durability: Durability) -> None:
    temporary, final = root / f".{index}.tmp", root / f"{index}.bin"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_buffers(fd, buffers)
        if durability is not Durability.NONE:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, final)
    _sync_directory(root, durability)


def bare_loop(threads: int) -> Callable[[Path, Sequence[Item], Durability], Sample]:
    def run(root: Path, items: Sequence[Item], durability: Durability) -> Sample:
        buffers = _host_buffers(items)
        if threads == 1:
            calls = []
            start = time.perf_counter()
            for index, item_buffers in enumerate(buffers):
                began = time.perf_counter()
                _bare_write(root, index, item_buffers, durability)
                calls.append(time.perf_counter() - began)
            return Sample(time.perf_counter() - start, calls)

        def stripe(first: int) -> None:
            for index in range(first, len(buffers), threads):
                _bare_write(root, index, buffers[index], durability)

        workers = [threading.Thread(target=stripe, args=(t,)) for t in range(threads)]
        start = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        return Sample(time.perf_counter() - start)

    return run


def _threads(count: int) -> str:
    return "1 thread" if count == 1 else f"{count} threads"


def native_bare_loop(threads: int) -> Callable[[Path, Sequence[Item], Durability], Sample]:
    """The same loop as bare_loop, in C with the GIL released: what the machine itself can do."""
    assert native_loop is not None
    loop = native_loop
    levels = {Durability.NONE: 0, Durability.FILE: 1, Durability.FULL: 2}

    def run(root: Path, items: Sequence[Item], durability: Durability) -> Sample:
        buffers: list[Sequence[object]] = list(_host_buffers(items))
        finals = [str(root / f"{index}.bin") for index in range(len(items))]
        temporaries = [str(root / f".{index}.tmp") for index in range(len(items))]
        start = time.perf_counter()
        loop(finals, temporaries, buffers, levels[durability], threads)
        return Sample(time.perf_counter() - start)

    return run


def pinned_copy_peak(root: Path, items: Sequence[Item], durability: Durability) -> Sample:
    """Device-to-host copies of every item into one pinned buffer: what the staging copies can reach."""
    tensors = [t for item in items for t in (item.values() if isinstance(item, dict) else [item])]
    largest = max(t.numel() * t.element_size() for t in tensors)
    pinned = torch.empty(largest, dtype=torch.uint8, pin_memory=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for tensor in tensors:
        flat = tensor.reshape(-1).view(torch.uint8)
        pinned[: flat.numel()].copy_(flat, non_blocking=True)
    torch.cuda.synchronize()
    return Sample(time.perf_counter() - start)


# tensorsink.


def tensorsink_writer(
    save_format: SaveFormat, dict_mode: DictMode, workers: int, backend: Backend
) -> Callable[[Path, Sequence[Item], Durability], Sample]:
    def run(root: Path, items: Sequence[Item], durability: Durability) -> Sample:
        calls = []
        start = time.perf_counter()
        with AsyncWriter(
            root, save_format, dict_mode, workers, durability=durability, backend=backend
        ) as writer:
            for index, item in enumerate(items):
                began = time.perf_counter()
                writer.write(str(index), item)
                calls.append(time.perf_counter() - began)
        seconds = time.perf_counter() - start
        by_backend = writer.stats().bytes_by_backend
        return Sample(seconds, calls, "+".join(sorted(k for k, v in by_backend.items() if v)) or None)

    return run


# The peers: each library's own save function, on the caller's thread or in a thread pool.

Saver = Callable[[Path, Item], list[Path]]


def _host(item: Item) -> Item:
    """What a loop hands a CPU library: `.cpu()` of each tensor (a blocking copy for CUDA tensors)."""
    if isinstance(item, dict):
        return {name: tensor.cpu() for name, tensor in item.items()}
    return item.cpu()


def _named(item: Item) -> dict[str, torch.Tensor]:
    return dict(item) if isinstance(item, dict) else {"arr_0": item}


def _save_pt(stem: Path, item: Item) -> list[Path]:
    path = stem.with_name(stem.name + ".pt")
    torch.save(item, path)
    return [path]


def _save_npy(stem: Path, item: Item) -> list[Path]:
    if not isinstance(item, dict):
        path = stem.with_name(stem.name + ".npy")
        np.save(path, item.numpy())
        return [path]
    paths = []
    for name, tensor in item.items():
        path = stem.with_name(f"{stem.name}_{name}.npy")
        np.save(path, tensor.numpy())
        paths.append(path)
    return paths


def _save_npz(stem: Path, item: Item) -> list[Path]:
    path = stem.with_name(stem.name + ".npz")
    arrays: dict[str, Any] = {name: tensor.numpy() for name, tensor in _named(item).items()}
    np.savez(path, **arrays)
    return [path]


def _save_safetensors(stem: Path, item: Item) -> list[Path]:
    path = stem.with_name(stem.name + ".safetensors")
    safetensors.torch.save_file(_named(item), path)
    return [path]


SAVERS: dict[SaveFormat, Saver] = {
    SaveFormat.PYTORCH_PT: _save_pt,
    SaveFormat.NUMPY_NPY: _save_npy,
    SaveFormat.NUMPY_NPZ: _save_npz,
    SaveFormat.SAFETENSORS: _save_safetensors,
}


def per_sample(save: Saver) -> Callable[[Path, Sequence[Item], Durability], Sample]:
    """The usual loop: `.cpu()` and save straight to the final name, on the caller's thread."""

    def run(root: Path, items: Sequence[Item], durability: Durability) -> Sample:
        calls = []
        start = time.perf_counter()
        for index, item in enumerate(items):
            began = time.perf_counter()
            _sync_files(save(root / str(index), _host(item)), durability)
            calls.append(time.perf_counter() - began)
        return Sample(time.perf_counter() - start, calls)

    return run


_TEMPORARY = ".tmp-"
_SMALL_BYTES = 64_000
_MAX_PENDING = 256


def _save_and_rename(save: Saver, root: Path, index: int, item: Item, durability: Durability) -> None:
    temporaries = save(root / f"{_TEMPORARY}{index}", item)
    if durability is not Durability.NONE:
        _sync_files(temporaries, Durability.FILE)
    for temporary in temporaries:
        os.replace(temporary, temporary.with_name(temporary.name.removeprefix(_TEMPORARY)))
    _sync_directory(root, durability)


class PoolWriter:
    """The common async design: ThreadPoolExecutor(4), save to a temporary and os.replace, at most 256
    futures pending, items under 64,000 bytes saved on the caller's thread.

    One item per write() call, so the same design serves the throughput runs and the producer loop.
    """

    def __init__(self, save: Saver, root: Path, durability: Durability) -> None:
        self._save, self._root, self._durability = save, root, durability
        self._pool = ThreadPoolExecutor(4)
        self._pending: set[Future[None]] = set()

    def write(self, index: int, item: Item) -> None:
        host = _host(item)
        if item_bytes(host) < _SMALL_BYTES:
            _save_and_rename(self._save, self._root, index, host, self._durability)
            return
        if len(self._pending) >= _MAX_PENDING:
            done, self._pending = wait(self._pending, return_when=FIRST_COMPLETED)
            for future in done:
                future.result()
        self._pending.add(
            self._pool.submit(_save_and_rename, self._save, self._root, index, host, self._durability)
        )

    def close(self) -> None:
        """Wait for every pending save (raising the first failure), then stop the threads."""
        try:
            for future in self._pending:
                future.result()
            self._pending.clear()
        finally:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> PoolWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:  # the failure in flight is the one to see, not a pending save's
            self._pool.shutdown(wait=True)


def thread_pool(save: Saver) -> Callable[[Path, Sequence[Item], Durability], Sample]:
    """The common async design (PoolWriter), timed to its last file committed."""

    def run(root: Path, items: Sequence[Item], durability: Durability) -> Sample:
        calls = []
        start = time.perf_counter()
        with PoolWriter(save, root, durability) as writer:
            for index, item in enumerate(items):
                began = time.perf_counter()
                writer.write(index, item)
                calls.append(time.perf_counter() - began)
        return Sample(time.perf_counter() - start, calls)

    return run
