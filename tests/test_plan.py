"""What write() refuses, on the caller's thread, before anything is queued."""

from __future__ import annotations

import os
import warnings
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
from tensorsink.formats import format_for
from tensorsink.plan import plan_files
from tests.support import outputs_under


@pytest.fixture
def writer(tmp_path: Path):  # type: ignore[no-untyped-def]
    with AsyncWriter(tmp_path / "out", SaveFormat.NUMPY_NPY) as w:
        yield w


def _listing(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in outputs_under(root)]


@pytest.mark.parametrize("key", ["", "/abs/path", "../escape", "a/../../b", "a/", "a\0b", ".", 42, None])
def test_invalid_keys_are_value_errors_naming_the_key(writer: AsyncWriter, key: object) -> None:
    with pytest.raises(ValueError, match=r"key") as info:
        writer.write(key, torch.zeros(3))  # type: ignore[arg-type]
    assert isinstance(info.value, InvalidKeyError)
    assert _listing(writer.root) == []


def test_key_may_be_a_pathlike_and_is_normalised(writer: AsyncWriter) -> None:
    (path,) = writer.write(Path("a") / "." / "b", torch.zeros(3)).result()
    assert path == writer.root / "a" / "b.npy"


@pytest.mark.parametrize("value", ["text", b"x", None, {1: torch.zeros(1)}, [torch.zeros(1), "x"],
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


@pytest.mark.parametrize("durability", ["none", "file"])
@pytest.mark.parametrize(
    ("key", "why"),
    [
        ("a" * 300, "255 bytes"),
        ("d/" + "b" * 256 + "/x", "255 bytes"),
        ("/".join(["c" * 200] * 22), "at most 4047 fit"),
        ("a\ud800b", "not valid Unicode"),
        ("x\udc80y", "not valid Unicode"),  # a surrogate escape of a non-UTF-8 byte
        (".tensorsink/x", "journals"),
        ("./.tensorsink//y", "journals"),
    ],
)
def test_keys_the_file_system_or_tensorsink_cannot_take_are_refused_at_write(
    tmp_path: Path, durability: str, key: str, why: str
) -> None:
    with AsyncWriter(tmp_path, SaveFormat.NUMPY_NPY, durability=durability) as writer:
        with pytest.raises(InvalidKeyError, match=why):
            writer.write(key, torch.zeros(3))
        writer.write("after", torch.zeros(3)).result()  # the writer is still usable
    assert _listing(tmp_path) == ["after.npy"]


def test_a_file_name_is_limited_in_bytes_with_its_suffix(tmp_path: Path) -> None:
    with AsyncWriter(tmp_path, SaveFormat.SAFETENSORS, "split") as writer:
        writer.write("a" * 240, torch.zeros(1)).result()  # 252 bytes with .safetensors; 258 with "_entry":
        with pytest.raises(InvalidKeyError, match="at most 255 bytes"):
            writer.write("b" * 240, {"entry": torch.zeros(1)})
    assert _listing(tmp_path) == ["a" * 240 + ".safetensors"]


def test_multibyte_names_up_to_name_max_are_written(tmp_path: Path) -> None:
    key = "测" * 80  # 240 bytes; 244 with .npy, under NAME_MAX, though its temporary keeps only a part
    with AsyncWriter(tmp_path, SaveFormat.NUMPY_NPY, durability="full") as writer:
        writer.write(key, torch.arange(3.0)).result()
        writer.write("d/" + "é" * 120, torch.arange(2.0)).result()
    assert np.array_equal(np.load(tmp_path / f"{key}.npy"), np.arange(3.0, dtype=np.float32))
    assert (tmp_path / "d" / ("é" * 120 + ".npy")).exists()


@pytest.mark.parametrize(("key", "suffix"), [(".report.tsink-1.partial", ""), (".r.tsink-ab", ".partial")])
def test_final_names_that_look_like_temporaries_are_refused(tmp_path: Path, key: str, suffix: str) -> None:
    """sweep() removes temporaries by name: no final file may be named like one."""
    with AsyncWriter(tmp_path) as writer, pytest.raises(InvalidKeyError, match="temporaries"):
        writer.write_batch([key], [b"report"], save=lambda p, v: p.write_bytes(v), suffix=suffix)
    assert _listing(tmp_path) == []


@pytest.mark.parametrize(
    ("save_format", "value", "error", "why"),
    [
        (SaveFormat.SAFETENSORS, {"__metadata__": torch.zeros(2)}, InvalidKeyError, "reserved"),
        (SaveFormat.SAFETENSORS, {"a\ud800": torch.zeros(2)}, InvalidKeyError, "not valid Unicode"),
        (SaveFormat.NUMPY_NPZ, {"a\ud800": torch.zeros(2)}, InvalidKeyError, "not valid Unicode"),
        (SaveFormat.PYTORCH_PT, {"\udcff": torch.zeros(2)}, InvalidKeyError, "not valid Unicode"),
        (SaveFormat.NUMPY_NPZ, {}, InvalidLayoutError, "empty"),
        (SaveFormat.NUMPY_NPZ, [], InvalidLayoutError, "empty"),
    ],
)
def test_collections_a_format_cannot_hold_readably_are_refused_at_write(
    tmp_path: Path, save_format: SaveFormat, value: object, error: type[Exception], why: str
) -> None:
    with AsyncWriter(tmp_path, save_format) as writer, pytest.raises(error, match=why):
        writer.write("x", value)
    assert _listing(tmp_path) == []


def test_empty_collections_that_formats_can_hold_still_round_trip(tmp_path: Path) -> None:
    import safetensors.torch

    with AsyncWriter(tmp_path, SaveFormat.SAFETENSORS) as writer:
        writer.write("m", {})
    with AsyncWriter(tmp_path, SaveFormat.PYTORCH_PT) as writer:
        writer.write("l", [])
    assert safetensors.torch.load_file(tmp_path / "m.safetensors") == {}
    assert torch.load(tmp_path / "l.pt", weights_only=True) == []


def _nested() -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch calls its strided nested layout a prototype
        return torch.nested.nested_tensor([torch.arange(2.0), torch.arange(3.0)])


@pytest.mark.parametrize("save_format", [SaveFormat.NUMPY_NPY, SaveFormat.NUMPY_NPZ, SaveFormat.SAFETENSORS])
def test_nested_tensors_are_refused_where_the_format_cannot_hold_them(
    tmp_path: Path, save_format: SaveFormat
) -> None:
    with AsyncWriter(tmp_path, save_format) as writer, pytest.raises(UnsupportedValueError, match="nested"):
        writer.write("n", _nested())
    assert _listing(tmp_path) == []


def test_nested_tensors_round_trip_as_pt(tmp_path: Path) -> None:
    nested = _nested()
    with AsyncWriter(tmp_path, SaveFormat.PYTORCH_PT) as writer:
        writer.write("n", nested).result()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        loaded = torch.load(tmp_path / "n.pt", weights_only=True)
        assert [t.tolist() for t in loaded.unbind()] == [t.tolist() for t in nested.unbind()]


@pytest.mark.parametrize(("key", "suffix"), [(".out.tsink-0.partial\n", ""), (".out2.tsink-1", ".partial\n")])
def test_a_name_like_a_temporary_but_for_a_trailing_newline_is_kept_by_sweep(
    tmp_path: Path, key: str, suffix: str
) -> None:
    from tensorsink import sweep

    with AsyncWriter(tmp_path) as writer:
        writer.write_batch([key], [b"x"], save=lambda p, v: p.write_bytes(v), suffix=suffix).result()
    assert sweep(tmp_path) == []
    assert _listing(tmp_path) == [key + suffix]


def test_a_path_just_under_path_max_leaves_room_for_its_temporary(tmp_path: Path) -> None:
    with AsyncWriter(tmp_path, SaveFormat.NUMPY_NPY) as writer:
        parts: list[str] = []
        while 4090 - len(f"{tmp_path}/{'/'.join(parts)}/.npy") > 250:
            parts.append("d" * 250)
        parts.append("f" * (4090 - len(f"{tmp_path}/{'/'.join(parts)}/.npy")))
        key = "/".join(parts)  # a final path of 4,090 bytes: its temporary would not fit PATH_MAX
        with pytest.raises(InvalidKeyError, match="room for the temporary"):
            writer.write(key, torch.zeros(2))
        writer.write("fine", torch.zeros(2)).result()


def test_a_key_ending_in_dot_names_a_folder(writer: AsyncWriter) -> None:
    with pytest.raises(InvalidKeyError, match="names a folder"):
        writer.write("a/.", torch.zeros(2))


@pytest.mark.parametrize("name", ["a\0b", "n" * 70_000])
def test_npz_member_names_a_zip_cannot_hold_are_refused(tmp_path: Path, name: str) -> None:
    with (
        AsyncWriter(tmp_path, SaveFormat.NUMPY_NPZ) as writer,
        pytest.raises(InvalidKeyError, match="member"),
    ):
        writer.write("x", {name: torch.zeros(2)})


def test_structured_dtypes_with_non_latin1_fields_are_written_as_npy_version_3(tmp_path: Path) -> None:
    value = np.zeros(3, dtype=[("测", "<f4"), ("b", "<i2")])
    value["测"] = [1, 2, 3]
    with AsyncWriter(tmp_path, SaveFormat.NUMPY_NPY) as writer:
        writer.write("s", value).result()
    loaded = np.load(tmp_path / "s.npy")
    assert loaded.dtype == value.dtype
    assert loaded.tobytes() == value.tobytes()


def test_an_empty_mapping_batch_is_a_layout_error(writer: AsyncWriter) -> None:
    with pytest.raises(InvalidLayoutError, match="empty mapping"):
        writer.write_batch(["a", "b"], {})


def test_jagged_nested_tensors_round_trip_as_pt(tmp_path: Path) -> None:
    jagged = torch.nested.nested_tensor([torch.arange(2.0), torch.arange(3.0)], layout=torch.jagged)
    with AsyncWriter(tmp_path, SaveFormat.PYTORCH_PT) as writer:
        writer.write("j", jagged).result()
    loaded = torch.load(tmp_path / "j.pt", weights_only=True)
    assert [t.tolist() for t in loaded.unbind()] == [[0.0, 1.0], [0.0, 1.0, 2.0]]


def test_safetensors_headers_the_reader_refuses_are_refused_at_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tensorsink.formats import safetensors as module

    monkeypatch.setattr(module, "_MAX_HEADER", 1000)
    with (
        AsyncWriter(tmp_path, SaveFormat.SAFETENSORS) as writer,
        pytest.raises(InvalidKeyError, match="header"),
    ):
        writer.write("x", {"n" * 2000: torch.zeros(1)})
    path = tmp_path / "crafted.safetensors"
    path.write_bytes((5000).to_bytes(8, "little") + b"{}" + b" " * 4998)
    with pytest.raises(ValueError, match="over the 1,000"):
        module.SafetensorsFormat().check_file(str(path))


def test_a_jagged_nested_tensor_is_named_as_torch_nested_where_it_cannot_be_stored() -> None:
    nested = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], layout=torch.jagged)
    with pytest.raises(UnsupportedValueError, match=r"nested tensor \(torch\.nested\).*to_padded_tensor"):
        plan_files("/r", "k", nested, format_for(SaveFormat.NUMPY_NPY), DictMode.SINGLE)
    assert plan_files("/r", "k", nested, format_for(SaveFormat.PYTORCH_PT), DictMode.SINGLE)
