"""The bytes each format lays down, checked against the reference writers and readers."""

from __future__ import annotations

import io
import json
import os
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import torch

from tensorsink import AsyncWriter, SaveFormat
from tensorsink.formats import write_buffers
from tensorsink.formats.npy import npy_header


@pytest.mark.parametrize(
    "array",
    [np.arange(10, dtype="<f4"), np.zeros((2, 3), ">i8"), np.array(True), np.zeros((0, 2), "c16"),
     np.zeros(3, dtype=[("a", "<i4"), ("b", "<f8")])],
    ids=["f4", "big-endian", "0d-bool", "empty", "structured"],
)  # fmt: skip
def test_npy_file_is_byte_identical_to_np_save(tmp_path: Path, array: np.ndarray) -> None:
    with AsyncWriter(tmp_path, SaveFormat.NUMPY_NPY) as writer:
        (path,) = writer.write("x", array).result()
    expected = io.BytesIO()
    np.save(expected, array)
    assert path.read_bytes() == expected.getvalue()


def test_npy_header_switches_to_version_2_when_long() -> None:
    wide = np.dtype([(f"field_{i:05d}", "<f4") for i in range(5000)])
    header = npy_header(wide, (2,))
    assert header[6:8] == b"\x02\x00"
    assert len(header) % 64 == 0
    read = np.lib.format.read_array_header_2_0(io.BytesIO(header[8:]), max_header_size=1 << 20)
    assert read == ((2,), False, wide)


def test_npz_is_a_valid_stored_zip(tmp_path: Path) -> None:
    arrays = {"flow": np.arange(1000, dtype=np.float32), "mask": np.ones((4, 4), bool), "ünï": np.zeros(0)}
    with AsyncWriter(tmp_path, SaveFormat.NUMPY_NPZ) as writer:
        (path,) = writer.write("x", arrays).result()
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None  # every CRC checks
        infos = archive.infolist()
        assert [i.filename for i in infos] == [f"{name}.npy" for name in arrays]
        assert all(i.compress_type == zipfile.ZIP_STORED for i in infos)
        for name, array in arrays.items():
            expected = io.BytesIO()
            np.save(expected, array)
            assert archive.read(f"{name}.npy") == expected.getvalue()


def test_npz_with_corrupted_payload_fails_its_crc(tmp_path: Path) -> None:
    with AsyncWriter(tmp_path, SaveFormat.NUMPY_NPZ) as writer:
        (path,) = writer.write("x", np.arange(100, dtype=np.int64)).result()
    data = bytearray(path.read_bytes())
    data[200] ^= 0xFF
    path.write_bytes(bytes(data))
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() == "arr_0.npy"


def test_safetensors_header_is_aligned_and_metadata_readable(tmp_path: Path) -> None:
    values = {"b": torch.arange(3, dtype=torch.bfloat16), "a": torch.ones(2, 2, dtype=torch.float64)}
    with AsyncWriter(tmp_path, SaveFormat.SAFETENSORS) as writer:
        (path,) = writer.write("x", values).result()
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    assert (8 + length) % 8 == 0
    header = json.loads(raw[8 : 8 + length])
    assert header["__metadata__"] == {"format": "pt"}
    assert header["b"] == {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]}
    assert header["a"]["data_offsets"] == [6, 38]
    assert len(raw) == 8 + length + 38


def test_safetensors_from_numpy_reads_with_safetensors_numpy(tmp_path: Path) -> None:
    values = {"x": np.arange(6, dtype=">f4").reshape(2, 3)}
    with AsyncWriter(tmp_path, SaveFormat.SAFETENSORS) as writer:
        (path,) = writer.write("x", values).result()
    loaded = safetensors.numpy.load_file(path)
    np.testing.assert_array_equal(loaded["x"], values["x"])


def test_write_buffers_resumes_after_short_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_writev = os.writev
    calls = []

    def short_writev(fd: int, buffers: list[memoryview]) -> int:
        calls.append(len(buffers))
        return real_writev(fd, [bytes(buffers[0])[:3]])  # at most 3 bytes per call

    monkeypatch.setattr(os, "writev", short_writev)
    parts = [b"header", memoryview(np.arange(5, dtype=np.uint8)), b"", b"tail"]
    path = tmp_path / "f"
    with open(path, "wb", buffering=0) as file:
        assert write_buffers(file.fileno(), parts) == 15
    assert path.read_bytes() == b"header" + bytes(range(5)) + b"tail"
    assert calls == [
        4,
        3,
        2,
        2,
        1,
        1,
    ]  # 6 + 5 + 4 bytes, 3 at a time; the empty buffer dropped after the first


def test_write_buffers_splits_more_buffers_than_iov_max(tmp_path: Path) -> None:
    parts = [bytes([i % 256]) for i in range(5000)]
    path = tmp_path / "f"
    with open(path, "wb", buffering=0) as file:
        write_buffers(file.fileno(), parts)
    assert path.read_bytes() == b"".join(parts)
