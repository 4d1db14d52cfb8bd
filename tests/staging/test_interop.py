"""Arrays from other libraries: anything speaking DLPack is written without a copy through torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tensorsink import AsyncWriter, SaveFormat, UnsupportedValueError
from tensorsink.arrays import as_array
from tests.support import assert_same, read_back


class DLPackOnly:
    """An array known only through the DLPack protocol (as a CuPy or JAX array is)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self._tensor = tensor

    def __dlpack__(self, stream: object = None, **kwargs: object) -> object:
        return self._tensor.__dlpack__()

    def __dlpack_device__(self) -> tuple[int, int]:
        return self._tensor.__dlpack_device__()  # type: ignore[return-value]


def test_dlpack_view_shares_memory() -> None:
    tensor = torch.arange(6.0)
    view = as_array(DLPackOnly(tensor))
    assert isinstance(view, torch.Tensor)
    assert view.data_ptr() == tensor.data_ptr()


@pytest.mark.parametrize("save_format", [SaveFormat.PYTORCH_PT, SaveFormat.NUMPY_NPZ, SaveFormat.SAFETENSORS])
def test_dlpack_arrays_are_written_like_tensors(tmp_path: Path, save_format: SaveFormat) -> None:
    tensor = torch.arange(12, dtype=torch.int32).reshape(3, 4)
    with AsyncWriter(tmp_path, save_format) as writer:
        (single,) = writer.write("single", DLPackOnly(tensor)).result()
        (mapping,) = writer.write("mapping", {"x": DLPackOnly(tensor), "y": np.ones(2)}).result()
    stored = read_back(single, save_format)
    assert_same(stored if isinstance(stored, torch.Tensor) else stored["arr_0"], tensor)
    stored = read_back(mapping, save_format)
    assert_same(stored["x"], tensor)
    assert_same(stored["y"], np.ones(2))


def test_dlpack_array_as_npy(tmp_path: Path) -> None:
    tensor = torch.arange(5, dtype=torch.float64)
    with AsyncWriter(tmp_path, SaveFormat.NUMPY_NPY) as writer:
        (path,) = writer.write("x", DLPackOnly(tensor)).result()
    np.testing.assert_array_equal(np.load(path), tensor.numpy())


def test_objects_that_are_no_arrays_are_refused(tmp_path: Path) -> None:
    assert as_array("text") is None
    assert as_array([1, 2]) is None
    with AsyncWriter(tmp_path) as writer, pytest.raises(UnsupportedValueError, match="DLPack"):
        writer.write("x", object())
