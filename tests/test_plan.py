"""What write() refuses, on the caller's thread, before anything is queued."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tensorsink import (
    AsyncWriter,
    DictMode,
    InvalidKeyError,
    InvalidLayoutError,
    SaveFormat,
    UnsupportedValueError,
)


@pytest.fixture
def writer(tmp_path: Path):  # type: ignore[no-untyped-def]
    with AsyncWriter(tmp_path / "out", SaveFormat.NUMPY_NPY) as w:
        yield w


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("key", ["", "/abs/path", "../escape", "a/../../b", "a/", "a\0b", ".", 42, None])
def test_invalid_keys_are_value_errors_naming_the_key(writer: AsyncWriter, key: object) -> None:
    with pytest.raises(ValueError, match=r"key") as info:
        writer.write(key, torch.zeros(3))  # type: ignore[arg-type]
    assert isinstance(info.value, InvalidKeyError)
    assert _listing(writer.root) == []


def test_key_may_be_a_pathlike_and_is_normalised(writer: AsyncWriter) -> None:
    (path,) = writer.write(Path("a") / "." / "b", torch.zeros(3)).result()
    assert path == writer.root / "a" / "b.npy"


@pytest.mark.parametrize("value", ["text", 3.0, None, {1: torch.zeros(1)}, [torch.zeros(1), "x"],
                                   {"a": {"b": torch.zeros(1)}}, np.array([object()])])  # fmt: skip
def test_unsupported_values_are_type_errors(tmp_path: Path, value: object) -> None:
    with AsyncWriter(tmp_path, SaveFormat.NUMPY_NPZ) as writer, pytest.raises(TypeError) as info:
        writer.write("x", value)
    assert isinstance(info.value, UnsupportedValueError)
    assert _listing(tmp_path) == []


@pytest.mark.parametrize("save_format", [SaveFormat.NUMPY_NPY, SaveFormat.NUMPY_NPZ])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2])
def test_dtypes_numpy_cannot_hold_name_the_dtype_and_the_alternatives(
    tmp_path: Path, save_format: SaveFormat, dtype: torch.dtype
) -> None:
    name = str(dtype).removeprefix("torch.")
    with AsyncWriter(tmp_path, save_format) as writer, pytest.raises(TypeError, match=name) as info:
        writer.write("x", {"ok": torch.zeros(2), "bad": torch.zeros(2, dtype=dtype)})
    assert "SAFETENSORS" in str(info.value)
    assert "PYTORCH_PT" in str(info.value)
    assert "value['bad']" in str(info.value)


def test_complex128_is_refused_by_safetensors(tmp_path: Path) -> None:
    with (
        AsyncWriter(tmp_path, SaveFormat.SAFETENSORS) as writer,
        pytest.raises(TypeError, match="complex128"),
    ):
        writer.write("x", torch.zeros(2, dtype=torch.complex128))


def test_numpy_dtype_torch_lacks_is_refused_by_pt(tmp_path: Path) -> None:
    with AsyncWriter(tmp_path) as writer, pytest.raises(TypeError, match="NUMPY_NPY"):
        writer.write("x", np.array(["a", "b"]))


@pytest.mark.parametrize("value", [{"a": torch.zeros(1)}, [torch.zeros(1)], (torch.zeros(1),)])
def test_collections_as_npy_need_split(writer: AsyncWriter, value: object) -> None:
    with pytest.raises(ValueError, match=r"DictMode\.SPLIT.*NUMPY_NPZ") as info:
        writer.write("x", value)
    assert isinstance(info.value, InvalidLayoutError)


@pytest.mark.parametrize("value", [{}, []])
def test_empty_collection_in_split_would_write_nothing(tmp_path: Path, value: object) -> None:
    with AsyncWriter(tmp_path, dict_mode=DictMode.SPLIT) as writer, pytest.raises(ValueError, match="empty"):
        writer.write("x", value)


def test_empty_collection_in_single_writes_an_empty_container(tmp_path: Path) -> None:
    with AsyncWriter(tmp_path, SaveFormat.PYTORCH_PT) as writer:
        (path,) = writer.write("x", {}).result()
    assert torch.load(path, weights_only=True) == {}


@pytest.mark.parametrize("key", ["a/b", "..", ""])
def test_split_mapping_keys_must_be_file_name_parts(tmp_path: Path, key: str) -> None:
    with (
        AsyncWriter(tmp_path, dict_mode=DictMode.SPLIT) as writer,
        pytest.raises(ValueError, match="mapping key"),
    ):
        writer.write("x", {key: torch.zeros(1)})


def test_sparse_and_meta_tensors_are_refused(writer: AsyncWriter) -> None:
    with pytest.raises(TypeError, match="to_dense"):
        writer.write("x", torch.eye(3).to_sparse())
    with pytest.raises(TypeError, match="meta"):
        writer.write("x", torch.empty(3, device="meta"))


def test_extension_is_appended_never_substituted(writer: AsyncWriter) -> None:
    (path,) = writer.write("case.001", torch.zeros(1)).result()
    assert path.name == "case.001.npy"
    assert os.path.exists(path)
