"""Every format x dict mode x input kind stores exactly what it was given."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tensorsink import AsyncWriter, DictMode, SaveFormat
from tests.support import SUPPORTED, assert_same, random_tensor, read_back

SHAPES = [(), (0,), (7,), (3, 5), (2, 0, 4), (2, 3, 4, 5)]
CONTAINER_FORMATS = [SaveFormat.PYTORCH_PT, SaveFormat.NUMPY_NPZ, SaveFormat.SAFETENSORS]


def _write(
    root: Path, save_format: SaveFormat, value: object, dict_mode: DictMode = DictMode.SINGLE
) -> list[Path]:
    with AsyncWriter(root, save_format, dict_mode, small_sync_bytes=0) as writer:
        future = writer.write("out/sample.001", value)
    return future.result()


def _single(root: Path, save_format: SaveFormat, value: object) -> object:
    (path,) = _write(root, save_format, value)
    assert path == root / f"out/sample.001.{save_format.value}"
    stored = read_back(path, save_format)
    if save_format in (SaveFormat.NUMPY_NPZ, SaveFormat.SAFETENSORS):
        assert list(stored) == ["arr_0"]
        return stored["arr_0"]
    return stored


@pytest.mark.parametrize("save_format", list(SaveFormat))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_every_supported_dtype_and_shape_round_trips(
    tmp_path: Path, save_format: SaveFormat, shape: tuple[int, ...]
) -> None:
    for i, dtype in enumerate(SUPPORTED[save_format]):
        tensor = random_tensor(shape, dtype, seed=i)
        assert_same(_single(tmp_path / str(dtype), save_format, tensor), tensor)


@pytest.mark.parametrize("save_format", list(SaveFormat))
@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda t: t.t(), id="transposed"),
        pytest.param(lambda t: t[::2, 1:], id="strided-slice"),
        pytest.param(lambda t: t[3], id="row-view"),
        pytest.param(lambda t: t[:, 2], id="column-view"),
        pytest.param(lambda t: t[0, 0], id="0d-view"),
        pytest.param(lambda t: t[:0], id="empty-view"),
        pytest.param(lambda t: t[:1].expand(4, 6), id="expanded"),
        pytest.param(lambda t: t.requires_grad_(True) * 1, id="requires-grad"),
        pytest.param(lambda t: torch.complex(t, -t).conj()[1:], id="conj-view"),
    ],
)
def test_views_and_non_contiguous_tensors_round_trip(tmp_path: Path, save_format: SaveFormat, make) -> None:  # type: ignore[no-untyped-def]
    value = make(random_tensor((8, 6), torch.float32).nan_to_num())
    assert_same(_single(tmp_path, save_format, value), value)


@pytest.mark.parametrize("save_format", list(SaveFormat))
@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda t: t.reshape(-1)[::4][:1], id="one-element-stride-4"),
        pytest.param(lambda t: t.reshape(1, -1).T[3], id="row-of-a-transposed-row"),
        pytest.param(lambda t: t.reshape(-1)[:1].as_strided((1, 1, 1), (5, 7, 9)), id="one-element-3d"),
    ],
)
def test_one_element_views_with_odd_strides_round_trip_in_every_dtype(
    tmp_path: Path, save_format: SaveFormat, make
) -> None:  # type: ignore[no-untyped-def]
    """torch calls these contiguous, yet no byte view of them can be taken without a copy."""
    for i, dtype in enumerate(SUPPORTED[save_format]):
        value = make(random_tensor((8,), dtype, seed=i))
        assert_same(_single(tmp_path / str(dtype), save_format, value), value)


@pytest.mark.parametrize("save_format", list(SaveFormat))
def test_a_batch_of_one_element_rows_with_odd_strides_round_trips(
    tmp_path: Path, save_format: SaveFormat
) -> None:
    dtype = (
        torch.bfloat16 if save_format in (SaveFormat.SAFETENSORS, SaveFormat.PYTORCH_PT) else torch.float32
    )
    batch = random_tensor((1, 8), dtype).T  # eight samples of shape (1,), each with stride 8
    with AsyncWriter(tmp_path, save_format) as writer:
        paths = writer.write_batch([f"s{i}" for i in range(8)], batch).result()
    for i, path in enumerate(paths):
        stored = read_back(path, save_format)
        assert_same(
            stored if save_format in (SaveFormat.PYTORCH_PT, SaveFormat.NUMPY_NPY) else stored["arr_0"],
            batch[i],
        )


@pytest.mark.parametrize("save_format", list(SaveFormat))
@pytest.mark.parametrize(
    "array",
    [
        np.arange(24, dtype=">i4").reshape(4, 6),
        np.arange(24, dtype="<f8").reshape(4, 6)[:, ::2],
        np.asfortranarray(np.arange(12, dtype=np.int16).reshape(3, 4)),
        np.array(3.5, dtype=np.float32),
        np.zeros((0, 3), dtype=np.uint8),
    ],
    ids=["big-endian", "strided", "fortran", "0d", "empty"],
)
def test_numpy_arrays_round_trip(tmp_path: Path, save_format: SaveFormat, array: np.ndarray) -> None:
    assert_same(_single(tmp_path, save_format, array), array)


def test_read_only_numpy_array_round_trips_as_pt(tmp_path: Path) -> None:
    array = np.arange(10, dtype=np.float32)
    array.flags.writeable = False
    assert_same(_single(tmp_path, SaveFormat.PYTORCH_PT, array), array)


def _batch() -> dict[str, torch.Tensor]:
    return {
        "flow": random_tensor((3, 4, 5), torch.float32, 1),
        "mask": random_tensor((4, 5), torch.bool, 2),
        "ids": random_tensor((6,), torch.int64, 3),
    }


@pytest.mark.parametrize("save_format", CONTAINER_FORMATS)
def test_mapping_keeps_its_keys_in_one_file(tmp_path: Path, save_format: SaveFormat) -> None:
    batch = _batch()
    (path,) = _write(tmp_path, save_format, batch)
    stored = read_back(path, save_format)
    assert isinstance(stored, dict)
    assert sorted(stored) == sorted(batch)
    for name, tensor in batch.items():
        assert_same(stored[name], tensor)


@pytest.mark.parametrize("save_format", CONTAINER_FORMATS)
@pytest.mark.parametrize("kind", [list, tuple])
def test_sequence_is_a_list_or_arr_i_entries(tmp_path: Path, save_format: SaveFormat, kind: type) -> None:
    tensors = list(_batch().values())
    (path,) = _write(tmp_path, save_format, kind(tensors))
    stored = read_back(path, save_format)
    if save_format is SaveFormat.PYTORCH_PT:
        assert isinstance(stored, list)
        assert len(stored) == len(tensors)
        pairs = zip(stored, tensors, strict=True)
    else:
        assert sorted(stored) == [f"arr_{i}" for i in range(len(tensors))]
        pairs = ((stored[f"arr_{i}"], t) for i, t in enumerate(tensors))
    for actual, expected in pairs:
        assert_same(actual, expected)


@pytest.mark.parametrize("save_format", list(SaveFormat))
def test_split_writes_one_file_per_entry(tmp_path: Path, save_format: SaveFormat) -> None:
    batch = _batch()
    paths = _write(tmp_path, save_format, batch, DictMode.SPLIT)
    assert paths == [tmp_path / f"out/sample.001_{name}.{save_format.value}" for name in batch]
    for path, tensor in zip(paths, batch.values(), strict=True):
        stored = read_back(path, save_format)
        assert_same(stored["arr_0"] if isinstance(stored, dict) else stored, tensor)

    sequence = list(batch.values())
    paths = _write(tmp_path / "seq", save_format, sequence, DictMode.SPLIT)
    assert [p.name for p in paths] == [f"sample.001_{i}.{save_format.value}" for i in range(len(sequence))]

    (single,) = _write(tmp_path / "one", save_format, sequence[0], DictMode.SPLIT)
    assert single.name == f"sample.001.{save_format.value}"


def test_pt_file_holds_only_its_own_slice_of_a_batch(tmp_path: Path) -> None:
    batch = torch.zeros(64, 1024)
    (path,) = _write(tmp_path, SaveFormat.PYTORCH_PT, batch[5])
    assert path.stat().st_size < batch[5].nbytes + 2048 < batch.nbytes // 8
    loaded = torch.load(path, weights_only=True)
    assert loaded.untyped_storage().nbytes() == 1024 * 4


def test_mapping_of_views_stores_each_view_compactly(tmp_path: Path) -> None:
    batch = torch.arange(64 * 256, dtype=torch.float32).reshape(64, 256)
    (path,) = _write(tmp_path, SaveFormat.PYTORCH_PT, {"a": batch[1], "b": batch[2, :10]})
    assert path.stat().st_size < 4 * 1024 + 2048
    stored = torch.load(path, weights_only=True)
    assert_same(stored["a"], batch[1])
    assert_same(stored["b"], batch[2, :10])


_DTYPES = st.sampled_from(sorted({*SUPPORTED[SaveFormat.PYTORCH_PT]}, key=str))
_SHAPES = st.lists(st.integers(0, 4), min_size=0, max_size=4).map(tuple)


@given(
    save_format=st.sampled_from(list(SaveFormat)),
    dict_mode=st.sampled_from(list(DictMode)),
    kind=st.sampled_from(["tensor", "mapping", "sequence"]),
    specs=st.lists(st.tuples(_DTYPES, _SHAPES, st.integers(0, 2**16)), min_size=1, max_size=3),
    sync=st.booleans(),
)
def test_property_any_supported_value_round_trips(
    tmp_path_factory: pytest.TempPathFactory,
    save_format: SaveFormat,
    dict_mode: DictMode,
    kind: str,
    specs: list[tuple[torch.dtype, tuple[int, ...], int]],
    sync: bool,
) -> None:
    specs = [s for s in specs if s[0] in SUPPORTED[save_format]]
    if not specs or (
        save_format is SaveFormat.NUMPY_NPY and dict_mode is DictMode.SINGLE and kind != "tensor"
    ):
        return
    tensors = [random_tensor(shape, dtype, seed) for dtype, shape, seed in specs]
    value: object = {
        "tensor": tensors[0],
        "mapping": {f"k{i}": t for i, t in enumerate(tensors)},
        "sequence": tensors,
    }[kind]
    expected = [tensors[0]] if kind == "tensor" else tensors
    root = tmp_path_factory.mktemp("prop")
    with AsyncWriter(root, save_format, dict_mode, small_sync_bytes=1 << 40 if sync else 0) as writer:
        paths = writer.write("p/x", value).result()

    stored = _stored_in_order(paths, save_format, kind, dict_mode, len(expected))
    assert len(stored) == len(expected)
    for actual, tensor in zip(stored, expected, strict=True):
        assert_same(actual, tensor)


def _stored_in_order(
    paths: list[Path], save_format: SaveFormat, kind: str, dict_mode: DictMode, count: int
) -> list[object]:
    """The arrays read back, in the order they were given (by key, never by the reader's order)."""
    contents = [read_back(path, save_format) for path in paths]
    if dict_mode is DictMode.SPLIT or kind == "tensor":
        return [c["arr_0"] if isinstance(c, dict) else c for c in contents]
    (content,) = contents
    if isinstance(content, list):
        return content
    names = [f"k{i}" if kind == "mapping" else f"arr_{i}" for i in range(count)]
    assert sorted(content) == sorted(names)
    return [content[name] for name in names]


class _Mask(torch.Tensor):
    """A tensor subclass as torchvision's tv_tensors are: loading it needs its class."""


@pytest.mark.parametrize("save_format", list(SaveFormat))
def test_a_tensor_subclass_is_stored_as_the_plain_tensor(tmp_path: Path, save_format: SaveFormat) -> None:
    mask = torch.arange(6, dtype=torch.float32).reshape(2, 3).as_subclass(_Mask)
    parameter = torch.nn.Parameter(torch.ones(2))
    with AsyncWriter(tmp_path, save_format, DictMode.SPLIT) as writer:
        writer.write("m", mask)
        writer.write_batch(["b0", "b1"], mask)
        writer.write("p", {"w": parameter})
    suffix = save_format.value
    if save_format is SaveFormat.PYTORCH_PT:  # the documented reader, which refuses unknown classes
        loaded = torch.load(tmp_path / "m.pt", weights_only=True)
        assert type(loaded) is torch.Tensor
        assert torch.equal(loaded, mask.as_subclass(torch.Tensor))
        assert type(torch.load(tmp_path / "b1.pt", weights_only=True)) is torch.Tensor

    def one(name: str) -> object:
        value = read_back(tmp_path / f"{name}.{suffix}", save_format)
        return value["arr_0"] if isinstance(value, dict) else value  # npz: the one array by its name

    assert_same(one("m"), mask.as_subclass(torch.Tensor))
    assert_same(one("b1"), mask[1].as_subclass(torch.Tensor))
    assert_same(one("p_w"), torch.ones(2))


@pytest.mark.parametrize("save_format", list(SaveFormat))
@pytest.mark.parametrize("number", [3, 2.5, True, np.float32(1.5), np.int16(-4)])
def test_a_number_is_written_as_a_0d_array(tmp_path: Path, save_format: SaveFormat, number: object) -> None:
    with AsyncWriter(tmp_path, save_format) as writer:
        writer.write("n", number)
        writer.write_batch(["b"], [number])  # a batch of one number, as a predict step returns it
    for name in ("n", "b"):
        value = read_back(tmp_path / f"{name}.{save_format.value}", save_format)
        value = value["arr_0"] if isinstance(value, dict) else value
        assert_same(value, np.asarray(number))
