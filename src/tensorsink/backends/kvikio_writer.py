"""Writing a header from host memory and the payloads straight from device memory with kvikio's CuFile."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import torch

from ..arrays import Array, byte_view, nbytes
from ..formats import FileEntry, HeaderFormat, write_buffers
from ..staging import on_device

__all__ = ["BLOCK", "KvikioWriter"]

#: The file-system block that direct I/O writes whole: kvikio (and GDS under it) writes only whole
#: blocks here; the bytes of a block shared with a neighbour go from host memory.
BLOCK = 4096


class KvikioWriter:
    """kvikio configured once for the process (its settings are global): threads, task size, O_DIRECT.

    `kvikio` and `device` stand in for the kvikio module and the test of device memory (tests use
    them to run the writer without a GPU).
    """

    def __init__(
        self,
        threads: int,
        task_size: int,
        direct_io: bool,
        *,
        kvikio: Any = None,
        device: Callable[[Array], bool] = on_device,
    ) -> None:
        self._kvikio: Any = (
            kvikio if kvikio is not None else _configured_kvikio(threads, task_size, direct_io)
        )
        self._device = device
        self._streams: dict[int, torch.cuda.Stream] = {}
        self._lock = threading.Lock()

    def write(self, fd: int, path: str, fmt: HeaderFormat, entry: FileEntry) -> None:
        """The header at 0 through `fd`, then each payload at its offset: the whole blocks of device
        payloads by CuFile.pwrite on `path` (the same file), all else by os.pwrite. The device tensors
        must be ready (staged). Every kvikio write has finished before this returns or raises, so
        none lands after the handle is closed or the file is given up."""
        header = fmt.header(entry)
        write_buffers(fd, [header])
        handle = self._kvikio.CuFile(path, "r+")
        pending: list[tuple[Any, int]] = []
        failure: BaseException | None = None
        try:
            self._issue(handle, fd, fmt, entry, len(header), pending)
        except BaseException as exc:
            failure = exc
        for future, size in pending:  # all of them, also after a failure: none may outlive the handle
            try:
                written = future.get()
            except BaseException as exc:
                failure = failure or exc
                continue
            if written != size and failure is None:
                failure = OSError(f"kvikio wrote {written} of {size} bytes to {path}")
        try:
            handle.close()
        except BaseException as exc:  # never instead of the failure that came first
            failure = failure or exc
        if failure is not None:
            raise failure

    def _issue(
        self,
        handle: Any,
        fd: int,
        fmt: HeaderFormat,
        entry: FileEntry,
        offset: int,
        pending: list[tuple[Any, int]],
    ) -> None:
        for array in entry.arrays:
            size = nbytes(array)
            if size and self._device(array):
                assert isinstance(array, torch.Tensor)
                flat = array.reshape(-1).view(torch.uint8)
                start, end = offset, offset + size
                whole_from = min(end, -(-start // BLOCK) * BLOCK)  # the first block boundary inside
                whole_to = max(whole_from, end // BLOCK * BLOCK)  # the last one
                if whole_from > start:
                    _pwrite_all(fd, self._host_bytes(flat[: whole_from - start]), start)
                if end > whole_to:
                    _pwrite_all(fd, self._host_bytes(flat[whole_to - start :]), whole_to)
                if whole_to > whole_from:
                    middle = flat[whole_from - start : whole_to - start]
                    pending.append((handle.pwrite(middle, middle.numel(), whole_from), middle.numel()))
            elif size:
                _pwrite_all(fd, byte_view(array, native=fmt.native_payload), offset)
            offset += size

    def _host_bytes(self, piece: torch.Tensor) -> memoryview:
        """A few device bytes (a shared block's part) in host memory, copied on a stream of the
        writer's own, never the legacy default stream a producer may be running on."""
        if piece.is_cuda:
            with torch.cuda.stream(self._stream(piece.device)):
                piece = piece.to("cpu")
        return piece.numpy().data

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        index = device.index if device.index is not None else torch.cuda.current_device()
        with self._lock:
            stream = self._streams.get(index)
            if stream is None:
                stream = self._streams[index] = torch.cuda.Stream(device=index)  # type: ignore[no-untyped-call]
        return stream


def _configured_kvikio(threads: int, task_size: int, direct_io: bool) -> Any:
    import kvikio
    import kvikio.defaults

    kvikio.defaults.set({"num_threads": threads, "task_size": task_size, "auto_direct_io_write": direct_io})
    return kvikio


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    """os.pwrite until every byte is written; OSError if the file takes none."""
    while view:
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(f"pwrite wrote no bytes at offset {offset} ({len(view)} left)")
        view, offset = view[written:], offset + written
