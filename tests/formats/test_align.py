"""align=N: headers padded so the payload starts at a multiple of N; the reference readers still load them."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from tensorsink import AsyncWriter, SaveFormat
from tests.support import assert_same, random_tensor


@pytest.mark.parametrize("align", [64, 512, 4096, 8192])
@pytest.mark.parametrize("shape", [(), (0,), (3, 5), (1000,)])
def test_npy_payload_starts_at_the_alignment(tmp_path: Path, align: int, shape: tuple[int, ...]) -> None:
    array = random_tensor(shape, torch.float32, 1).numpy()
    with AsyncWriter(tmp_path, SaveFormat.NUMPY_NPY, align=align) as writer:
        (path,) = writer.write("x", array).result()
    raw = path.read_bytes()
    start = len(raw) - array.nbytes
    assert start % align == 0
    assert start == align or align == 64  # a 64-byte alignment leaves room for no header but the shortest
    assert raw[start:] == array.tobytes()
    assert_same(np.load(path), array)


@pytest.mark.parametrize("align", [64, 4096, 65536])
def test_safetensors_payload_starts_at_the_alignment(tmp_path: Path, align: int) -> None:
    values = {"a": random_tensor((7, 3), torch.bfloat16, 2), "b": torch.arange(5)}
    with AsyncWriter(tmp_path, SaveFormat.SAFETENSORS, align=align) as writer:
        (path,) = writer.write("x", values).result()
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    start = 8 + length
    assert start % align == 0
    assert start == align or align == 64
    assert json.loads(raw[8:start])["a"]["data_offsets"] == [0, 42]
    loaded = safetensors.torch.load_file(path)
    for name, tensor in values.items():
        assert_same(loaded[name], tensor)


def test_the_same_values_give_the_same_bytes(tmp_path: Path) -> None:
    tensor = random_tensor((64, 64), torch.float16, 4)
    contents = []
    for i, value in enumerate([tensor, tensor.numpy(), tensor.t().contiguous().t()]):
        with AsyncWriter(tmp_path / str(i), SaveFormat.NUMPY_NPY, align=4096) as writer:
            (path,) = writer.write("x", value).result()
        contents.append(path.read_bytes())
    assert contents[0] == contents[1] == contents[2]


@pytest.mark.parametrize(
    ("save_format", "align", "message"),
    [
        (SaveFormat.NUMPY_NPY, 1000, "power of two >= 64"),
        (SaveFormat.NUMPY_NPY, 32, "power of two >= 64"),
        (SaveFormat.NUMPY_NPY, 16384, "at most 8192"),
        (SaveFormat.PYTORCH_PT, 4096, "applies to SaveFormat.NUMPY_NPY and SaveFormat.SAFETENSORS"),
        (SaveFormat.NUMPY_NPZ, 4096, "not NUMPY_NPZ"),
    ],
)
def test_bad_alignments_are_refused_at_construction(
    tmp_path: Path, save_format: SaveFormat, align: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        AsyncWriter(tmp_path, save_format, align=align)
