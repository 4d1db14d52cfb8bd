"""PYTORCH_PT: torch.save of a tensor, a dict or a list, loadable with torch.load(weights_only=True)."""

from __future__ import annotations

import io

import torch

from ..arrays import Array, compact_tensor, dtype_name, torch_dtype, torch_tensor
from ..options import SaveFormat
from .base import Container, FileEntry, Format

__all__ = ["PtFormat"]


class PtFormat(Format):
    save_format = SaveFormat.PYTORCH_PT

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
        with io.FileIO(fd, "wb", closefd=False) as file:
            torch.save(obj, file)
