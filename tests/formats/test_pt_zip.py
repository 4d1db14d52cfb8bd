""".pt files built from the tensors' own memory: the same archive torch.save writes, read by torch.load."""

from __future__ import annotations

import io
import os
import struct
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.utils.serialization

from tensorsink.arrays import Array, compact_tensor, torch_tensor
from tensorsink.formats import Buffer, Container, FileEntry
from tensorsink.formats import pt as pt_module
from tensorsink.formats.pt import PtFormat

FORMAT = PtFormat()
_SID = "archive/.data/serialization_id"

# Every dtype a plain tensor can have (quantized and sub-byte shell dtypes hold no plain storage).
_DTYPE_NAMES = [
    "bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64",
    "float16", "bfloat16", "float32", "float64", "complex32", "complex64", "complex128",
    "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
    "float4_e2m1fn_x2", "bits8", "bits16", "bits1x8", "bits2x4", "bits4x2",
]  # fmt: skip
DTYPES = [getattr(torch, name) for name in _DTYPE_NAMES if hasattr(torch, name)]


def _raw(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random bytes seen as `dtype` (bool as 0/1): every bit pattern must come back unchanged."""
    count = int(np.prod(shape, dtype=np.int64))
    generator = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (count * dtype.itemsize,), dtype=torch.uint8, generator=generator)
    if dtype is torch.bool:
        raw %= 2
    return raw.view(dtype).reshape(shape)


def _entry(value: Any) -> FileEntry:
    if isinstance(value, dict):
        names, arrays, container = tuple(value), tuple(value.values()), Container.MAPPING
    elif isinstance(value, list):
        names, arrays, container = tuple(map(str, range(len(value)))), tuple(value), Container.SEQUENCE
    else:
        names, arrays, container = ("tensor",), (value,), Container.TENSOR
    return FileEntry("x.pt", container, names, arrays, 0)


def _write(path: Path, value: Any) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        FORMAT.write(fd, _entry(value))
    finally:
        os.close(fd)
    return path


def _reference(value: Any) -> bytes:
    """What the torch.save path wrote: the same compacted tensors, through torch's own writer."""

    def compact(array: Array) -> torch.Tensor:
        return compact_tensor(torch_tensor(array))

    if isinstance(value, dict):
        obj: object = {k: compact(v) for k, v in value.items()}
    elif isinstance(value, list):
        obj = [compact(v) for v in value]
    else:
        obj = compact(value)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, dict):
        yield from obj.values()
    elif isinstance(obj, list):
        yield from obj
    else:
        yield obj


def _storage_bytes(tensor: torch.Tensor) -> bytes:
    storage = tensor.untyped_storage()
    return torch.empty(0, dtype=torch.uint8).set_(storage).numpy().tobytes()


def _describe(obj: Any) -> object:
    """Container shape, keys, and each tensor's dtype, shape, strides, offset, flags and stored bytes;
    storages shared between tensors are numbered in first-seen order."""
    storages: dict[int, int] = {}
    tensors = [
        (
            t.dtype,
            tuple(t.shape),
            t.stride(),
            t.storage_offset(),
            t.requires_grad,
            storages.setdefault(t.untyped_storage().data_ptr(), len(storages)),
            _storage_bytes(t),
        )
        for t in _tensors(obj)
    ]
    keys = list(obj) if isinstance(obj, dict) else type(obj).__name__
    return keys, tensors


def _load(path: Path | bytes, **kwargs: Any) -> Any:
    source = io.BytesIO(path) if isinstance(path, bytes) else path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # complex32 "experimental", nested "prototype"
        return torch.load(source, **kwargs)


def _data_start(data: bytes | bytearray, info: zipfile.ZipInfo) -> int:
    """Where a member's data begins: past its local header, whose extra field is not the central one."""
    names, extra = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    return int(info.header_offset + 30 + names + extra)


def _without_id(data: bytes) -> bytes:
    """The archive with its serialization id (and that record's CRCs) blanked: the one record whose
    bytes torch derives from a C++ standard-library string hash."""
    out = bytearray(data)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        info = archive.getinfo(_SID)
    start = _data_start(data, info)
    out[start : start + 40] = bytes(40)
    out[start + 44 : start + 48] = bytes(4)  # descriptor CRC
    central = data.rindex(_SID.encode()) - 46
    out[central + 16 : central + 20] = bytes(4)
    return bytes(out)


def _check_round_trip(tmp_path: Path, value: Any) -> Any:
    path = _write(tmp_path / "x.pt", value)
    data = path.read_bytes()
    reference = _reference(value)
    assert _without_id(data) == _without_id(reference)  # byte for byte torch.save's layout
    expected = _describe(_load(reference, weights_only=True))
    for kwargs in ({"weights_only": True}, {"weights_only": False}, {"weights_only": True, "mmap": True}):
        assert _describe(_load(path, **kwargs)) == expected, kwargs
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
    FORMAT.check_file(str(path))
    return _load(path, weights_only=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 5), (2, 0, 4)], ids=str)
def test_every_dtype_and_shape_round_trips(
    tmp_path: Path, dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    tensor = _raw(dtype, shape)
    loaded = _check_round_trip(tmp_path, tensor)
    assert _storage_bytes(loaded) == _storage_bytes(tensor)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda t: t.t(), id="transposed"),
        pytest.param(lambda t: t.permute(1, 0)[:, :], id="permuted"),
        pytest.param(lambda t: t[::2, 1:], id="strided-slice"),
        pytest.param(lambda t: t[3], id="row-view"),
        pytest.param(lambda t: t[:, 2], id="column-view"),
        pytest.param(lambda t: t[0, 0], id="0d-view"),
        pytest.param(lambda t: t[:0], id="empty-view"),
        pytest.param(lambda t: t[:1].expand(4, 6), id="expanded"),
        pytest.param(lambda t: t.reshape(-1)[:4].as_strided((2, 8), (0, 0), 3), id="offset-overlapping"),
        pytest.param(lambda t: t.clone().requires_grad_(True), id="requires-grad-leaf"),
        pytest.param(lambda t: t.requires_grad_(True) * 1, id="requires-grad"),
        pytest.param(lambda t: torch.complex(t, -t).conj()[1:], id="conj-view"),
        pytest.param(lambda t: torch.complex(t, t).conj(), id="conj"),
        pytest.param(lambda t: torch.complex(t, t).conj().imag, id="neg-view"),
    ],
)
def test_views_and_non_contiguous_tensors_store_what_torch_save_stores(
    tmp_path: Path, make: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    value = make(torch.randn(8, 6, generator=torch.Generator().manual_seed(1)))
    loaded = _check_round_trip(tmp_path, value)
    expected = value.detach().resolve_conj().resolve_neg()
    assert torch.equal(loaded, expected)
    assert not loaded.requires_grad
    if value.untyped_storage().nbytes() > value.numel() * value.element_size():
        assert loaded.untyped_storage().nbytes() == value.numel() * value.element_size()  # only its own bytes


def test_dicts_keep_their_key_order_and_lists_their_order(tmp_path: Path) -> None:
    value = {
        "z": torch.arange(3),
        "a": _raw(torch.bfloat16, (2, 2)),
        "ünï": torch.zeros(0),
        "m": torch.tensor(1),
    }
    loaded = _check_round_trip(tmp_path, value)
    assert list(loaded) == ["z", "a", "ünï", "m"]
    items = [torch.ones(2), _raw(torch.float8_e5m2, (3,)), torch.tensor(True)]
    loaded_list = _check_round_trip(tmp_path, items)
    assert isinstance(loaded_list, list)
    assert len(loaded_list) == 3


def test_empty_containers_round_trip(tmp_path: Path) -> None:
    assert _check_round_trip(tmp_path, {}) == {}
    assert _check_round_trip(tmp_path, []) == []


def test_shared_storages_are_stored_once_and_shared_again(tmp_path: Path) -> None:
    base = torch.arange(12.0).reshape(3, 4)
    loaded = _check_round_trip(tmp_path, {"a": base, "b": base, "t": base.t()})
    assert loaded["a"].untyped_storage().data_ptr() == loaded["t"].untyped_storage().data_ptr()
    with zipfile.ZipFile(tmp_path / "x.pt") as archive:
        assert [n for n in archive.namelist() if n.startswith("archive/data/")] == ["archive/data/0"]


def test_numpy_arrays_round_trip(tmp_path: Path) -> None:
    value = {"f": np.arange(6, dtype=">f8").reshape(2, 3), "t": np.arange(6, dtype=np.int16).reshape(2, 3).T}
    loaded = _check_round_trip(tmp_path, value)
    for name, array in value.items():
        assert np.array_equal(loaded[name].numpy(), array)


def test_nested_tensors_round_trip(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        nested = torch.nested.nested_tensor([torch.arange(2.0), torch.arange(3.0)])
    path = _write(tmp_path / "n.pt", {"n": nested, "t": torch.ones(2)})
    for kwargs in ({"weights_only": True}, {"weights_only": True, "mmap": True}):
        loaded = _load(path, **kwargs)
        assert [t.tolist() for t in loaded["n"].unbind()] == [[0.0, 1.0], [0.0, 1.0, 2.0]]
        assert loaded["t"].tolist() == [1.0, 1.0]
    assert _without_id(path.read_bytes()) == _without_id(_reference({"n": nested, "t": torch.ones(2)}))


def _views(buffers: list[Buffer]) -> list[memoryview]:
    return [b for b in buffers if isinstance(b, memoryview)]


def _address(view: memoryview) -> int:
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)


def test_payloads_are_views_of_the_tensors_memory_not_copies() -> None:
    tensors = {"a": torch.zeros(1 << 16), "b": torch.arange(1000, dtype=torch.int64).reshape(10, 100).t()}
    buffers = FORMAT.encode(_entry(tensors))
    views = _views(buffers)
    assert [_address(v) for v in views] == [t.data_ptr() for t in tensors.values()]
    assert sum(len(b) for b in buffers if not isinstance(b, memoryview)) < 4096  # headers and pickle only
    tensors["a"][0] = 1.0  # written later, the file has what the memory holds then
    assert np.frombuffer(views[0], dtype=np.float32)[0] == 1.0


def test_numpy_payloads_are_views_of_the_arrays_memory() -> None:
    array = np.arange(4096, dtype=np.float32)
    (view,) = _views(FORMAT.encode(_entry({"a": array})))
    assert _address(view) == array.ctypes.data


def test_data_records_are_aligned_and_found_by_torchs_offset_calculation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    value = {f"t{i}": torch.arange(i * 7, dtype=torch.int8) for i in range(6)}
    path = _write(tmp_path / "x.pt", value)
    data = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            start = _data_start(data, info)
            assert start % 64 == 0, info.filename
    # torch.load can skip the local headers, computing each offset from miniz's layout; its debug
    # mode checks every computed offset against the header's
    monkeypatch.setenv("TORCH_SERIALIZATION_DEBUG", "1")
    with torch.utils.serialization.config.patch({"load.calculate_storage_offsets": True}):  # type: ignore[attr-defined]
        loaded = _load(path, weights_only=True, mmap=True)
    assert all(torch.equal(loaded[k], v) for k, v in value.items())


def test_a_truncated_file_fails_the_layout_check(tmp_path: Path) -> None:
    path = _write(tmp_path / "x.pt", {"a": torch.arange(1000.0)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="ZIP"):
        FORMAT.check_file(str(path))


def test_a_corrupted_payload_fails_its_crc(tmp_path: Path) -> None:
    """torch.load reads no CRC, but every ZIP tool does: the CRCs must be right."""
    path = _write(tmp_path / "x.pt", {"a": torch.arange(1000.0)})
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("archive/data/0")
    start = _data_start(data, info)
    data[start + 100] ^= 0xFF
    path.write_bytes(bytes(data))
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() == "archive/data/0"


def test_the_same_tensors_give_the_same_bytes() -> None:
    def encoded() -> bytes:
        return b"".join(bytes(b) for b in FORMAT.encode(_entry({"a": torch.arange(5), "b": torch.ones(3)})))

    assert encoded() == encoded()


def test_skip_data_is_refused() -> None:
    with torch.serialization.skip_data(), pytest.raises(RuntimeError, match="skip_data"):
        FORMAT.encode(_entry(torch.ones(3)))


def test_without_torchs_internal_pickling_the_file_is_torch_saves_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pt_module, "_torch_save_records", None)
    value = {"a": torch.arange(4.0), "b": torch.ones(2, 3).t()}
    path = _write(tmp_path / "x.pt", value)
    assert _describe(_load(path, weights_only=True)) == _describe(_load(_reference(value), weights_only=True))


# Past 4 GiB: headers checked against those torch 2.13's writer laid down for a list of an 8-byte, a
# (4 GiB + 64)-byte and an 8-byte tensor (too big to write in the suite).
_BIG = 2**32 + 64


def test_zip64_fields_past_4_gib_match_torchs_writer() -> None:
    local, descriptor = pt_module._local_header(b"archive/data/1", _BIG, 0x1DCDF777, 856, 64)
    assert local[:30] == struct.pack("<IHHHHHIIIHH", 0x04034B50, 0, 0x808, 0, 0, 0, 0, 0, 0, 14, 60)
    assert (
        local[44:] == bytes.fromhex("01001000 4000000001000000 0000000000000000") + b"FB\x24\x00" + b"Z" * 36
    )
    assert descriptor == bytes.fromhex("504b0708 77f7cd1d 4000000001000000 4000000001000000")
    central = pt_module._central_header(b"archive/data/1", _BIG, 0x1DCDF777, 856)
    assert central[16:32] == bytes.fromhex("77f7cd1d ffffffff ffffffff 0e00 1400")
    assert central[42:46] == struct.pack("<I", 856)
    assert central[60:] == bytes.fromhex("01001000 4000000001000000 4000000001000000")

    local, descriptor = pt_module._local_header(b"archive/data/2", 8, 0x2EA122D3, 4294968344, 64)
    assert local[44:] == bytes.fromhex("01000800 1804000001000000") + b"FB\x2c\x00" + b"Z" * 44
    assert descriptor == bytes.fromhex("504b0708 d322a12e 0800000000000000 0800000000000000")
    central = pt_module._central_header(b"archive/data/2", 8, 0x2EA122D3, 4294968344)
    assert central[16:32] == bytes.fromhex("d322a12e 08000000 08000000 0e00 0c00")
    assert central[42:46] == b"\xff\xff\xff\xff"
    assert central[60:] == bytes.fromhex("01000800 1804000001000000")

    assert pt_module._end_records(9, 0x27F, 0x1000005C0) == bytes.fromhex(
        "504b06062c000000000000001e032d00000000000000000009000000000000000900000000000000"
        "7f02000000000000c005000001000000"
        "504b0607000000003f0800000100000001000000"
        "504b050600000000090009007f020000ffffffff0000"
    )


class _PointerWriter:
    """Passes storages on as older torch releases did: by data_ptr() alone."""

    def __init__(self, writer: Any) -> None:
        self._writer = writer

    def write_record(self, name: str, data: Any, nbytes: int) -> None:
        self._writer.write_record(
            name, data.data_ptr() if isinstance(data, torch.UntypedStorage) else data, nbytes
        )


def _old_torch_save(copy_storages: bool) -> Callable[..., None]:
    save: Callable[..., None] = torch.serialization._save

    def old_save(obj: object, zip_file: Any, *args: Any) -> None:
        if copy_storages:  # as for a CUDA tensor, whose storage torch copies to the CPU first
            obj = {k: v.clone() for k, v in obj.items()}  # type: ignore[attr-defined]
        save(obj, _PointerWriter(zip_file), *args)

    return old_save


def test_storages_handed_as_pointers_are_still_viewed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pt_module, "_torch_save_records", _old_torch_save(copy_storages=False))
    value = {"a": torch.arange(1 << 12, dtype=torch.int32), "e": torch.zeros(0), "t": torch.ones(3, 5).t()}
    buffers = FORMAT.encode(_entry(value))
    assert [_address(v) for v in _views(buffers)] == [value["a"].data_ptr(), value["t"].data_ptr()]
    _check_round_trip(tmp_path, value)


def test_storages_not_among_the_tensors_fall_back_to_torch_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pt_module, "_torch_save_records", _old_torch_save(copy_storages=True))
    value = {"a": torch.arange(10.0), "t": torch.ones(3, 5).t()}
    assert len(FORMAT.encode(_entry(value))) == 1
    path = _write(tmp_path / "x.pt", value)
    assert _describe(_load(path, weights_only=True)) == _describe(_load(_reference(value), weights_only=True))
