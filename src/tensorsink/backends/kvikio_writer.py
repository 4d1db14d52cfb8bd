"""Writing a header from host memory and the payloads straight from device memory with kvikio's CuFile."""

from __future__ import annotations

import os
from typing import Any

import torch

from ..arrays import byte_view, nbytes
from ..formats import FileEntry, HeaderFormat, write_buffers
from ..staging import on_device

__all__ = ["KvikioWriter"]


class KvikioWriter:
    """kvikio configured once for the process (its settings are global): threads, task size, O_DIRECT."""

    def __init__(self, threads: int, task_size: int, direct_io: bool) -> None:
        import kvikio
        import kvikio.defaults

        kvikio.defaults.set(
            {"num_threads": threads, "task_size": task_size, "auto_direct_io_write": direct_io}
        )
        self._kvikio: Any = kvikio

    def write(self, fd: int, path: str, fmt: HeaderFormat, entry: FileEntry) -> None:
        """Header at 0 through `fd`, then each payload at its offset: device ones by CuFile.pwrite on
        `path` (the same file), host ones by os.pwrite. The device tensors must be ready (staged)."""
        header = fmt.header(entry)
        write_buffers(fd, [header])
        offset = len(header)
        handle = self._kvikio.CuFile(path, "r+")
        try:
            pending = []
            for array in entry.arrays:
                size = nbytes(array)
                if size and on_device(array):
                    assert isinstance(array, torch.Tensor)
                    pending.append((handle.pwrite(array.reshape(-1).view(torch.uint8), size, offset), size))
                elif size:
                    view = byte_view(array, native=fmt.native_payload)
                    while view:
                        view = view[os.pwrite(fd, view, offset + size - view.nbytes) :]
                offset += size
            for future, size in pending:
                written = future.get()
                if written != size:
                    raise OSError(f"kvikio wrote {written} of {size} bytes to {path}")
        finally:
            handle.close()
