"""Getting each array into host memory that the workers can read.

CPU tensors and numpy arrays need nothing: the writer holds a reference until the file is committed,
so the caller must not modify them in place before the write's future is done. Tensors on another
device are copied to the host on the caller's thread, ordered after the work queued on its current
stream, which is always correct but blocks the caller for the copy.
"""

from __future__ import annotations

import torch

from .arrays import Array

__all__ = ["needs_staging", "stage"]


def needs_staging(array: Array) -> bool:
    return isinstance(array, torch.Tensor) and array.device.type != "cpu"


def stage(array: Array) -> Array:
    """The array itself if the workers can read it, else a host copy of it."""
    if needs_staging(array):
        assert isinstance(array, torch.Tensor)
        return array.detach().to("cpu")
    return array
