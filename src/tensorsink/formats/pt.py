"""PYTORCH_PT: torch.save of a tensor, a dict or a list, loadable with torch.load(weights_only=True)."""

from __future__ import annotations

from typing import IO, cast

import torch

from ..arrays import Array, compact_tensor, dtype_name, torch_dtype, torch_tensor
from ..options import SaveFormat
from .base import Container, FdFile, FileEntry, Format, check_zip

__all__ = ["PtFormat"]


class PtFormat(Format):
    save_format = SaveFormat.PYTORCH_PT
    holds_nested = True

    def dtype_tag(self, array: Array) -> torch.dtype | None:
        return torch_dtype(array)

    def alternatives(self, array: Array) -> str:
        return f"SaveFormat.NUMPY_NPY or SaveFormat.NUMPY_NPZ for numpy dtype {dtype_name(array)}"

    def write(self, fd: int, entry: FileEntry) -> None:
        tensors = [compact_tensor(torch_tensor(array)) for array in entry.arrays]
        obj: object
        if entry.container is Container.TENSOR:
            (obj,) = tensors
        elif entry.container is Container.MAPPING:
            obj = dict(zip(entry.names, tensors, strict=True))
        else:
            obj = tensors
        file = FdFile(fd)  # io.FileIO would let torch.save drop the rest of a short write unnoticed
        torch.save(obj, cast(IO[bytes], file))  # write() is all torch.save calls
        file.flush()

    def check_file(self, path: str) -> None:
        check_zip(path)
