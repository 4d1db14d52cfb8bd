"""write_batch: one staging copy per batch, one file per sample holding only its own rows."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, overload

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
from tensorsink.batches import has_no_samples, split_batch
from tensorsink.commit import is_temporary
from tensorsink.staging import Stager
from tests.staging.fake import POISON, FakeEngine, stage_on
from tests.support import assert_same, outputs_under, random_tensor, read_back


def _files(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in outputs_under(root) if p.is_file()]


@pytest.mark.parametrize("save_format", list(SaveFormat))
def test_each_sample_gets_its_own_rows(tmp_path: Path, save_format: SaveFormat) -> None:
    batch = random_tensor((5, 3, 7), torch.float32)
    keys = [f"scans/s{i}" for i in range(5)]
    with AsyncWriter(tmp_path, save_format) as writer:
        future = writer.write_batch(keys, batch)
    suffix = {SaveFormat.PYTORCH_PT: ".pt"}.get(save_format, f".{save_format.value}")
    assert future.result() == [tmp_path / f"{key}{suffix}" for key in keys]
    for i, path in enumerate(future.result()):
        stored = read_back(path, save_format)
        assert_same(stored["arr_0"] if isinstance(stored, dict) else stored, batch[i])
    if save_format is SaveFormat.PYTORCH_PT:  # a per-sample view must not drag the batch's storage along
        assert future.result()[0].stat().st_size < batch[0].nbytes + 2000


def test_mapping_batch_split_into_files_per_entry(tmp_path: Path) -> None:
    batch = {"mask": torch.arange(8, dtype=torch.uint8).reshape(2, 4), "logits": torch.rand(2, 3)}
    with AsyncWriter(tmp_path, SaveFormat.NUMPY_NPY, DictMode.SPLIT) as writer:
        writer.write_batch(["a", "b"], batch)
    assert _files(tmp_path) == ["a_logits.npy", "a_mask.npy", "b_logits.npy", "b_mask.npy"]
    np.testing.assert_array_equal(np.load(tmp_path / "b_mask.npy"), batch["mask"][1].numpy())
    np.testing.assert_array_equal(np.load(tmp_path / "a_logits.npy"), batch["logits"][0].numpy())


def test_custom_save_gets_a_temporary_and_an_atomic_commit(tmp_path: Path) -> None:
    seen: list[Path] = []

    def save(path: Path, value: Any) -> None:
        seen.append(path)
        assert is_temporary(path.parent.name)  # the file's own name, in a private temporary folder
        assert path.name in ("0.txt", "1.txt")
        path.write_text(f"{value.tolist()}", encoding="utf-8")

    with AsyncWriter(tmp_path) as writer:
        writer.write_batch(["x/0", "x/1"], torch.tensor([[1, 2], [3, 4]]), save=save, suffix=".txt")
    assert _files(tmp_path) == ["x/0.txt", "x/1.txt"]
    assert (tmp_path / "x/1.txt").read_text() == "[3, 4]"
    assert len(seen) == 2


def test_a_list_holds_one_value_per_key(tmp_path: Path) -> None:
    with AsyncWriter(tmp_path) as writer:
        writer.write_batch(["a", "b"], ["first", "second"], save=lambda p, v: p.write_text(v), suffix=".txt")
        writer.write_batch(["c", "d"], [torch.zeros(2), {"v": torch.ones(3)}])
    assert (tmp_path / "b.txt").read_text() == "second"
    assert torch.load(tmp_path / "d.pt", weights_only=True)["v"].tolist() == [1.0, 1.0, 1.0]


class _Rows(Sequence[str]):
    """A Sequence that is neither a list nor a tuple: only the ABC says it holds one value per key."""

    def __init__(self, *values: str) -> None:
        self._values = values

    def __len__(self) -> int:
        return len(self._values)

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[str]: ...
    def __getitem__(self, index: int | slice) -> str | Sequence[str]:
        return self._values[index]


@pytest.mark.parametrize(
    ("batch", "expected"),
    [
        (range(10, 13), ["10", "11", "12"]),
        ((4, 5, 6), ["4", "5", "6"]),
        (_Rows("x", "yz", "w"), ["x", "yz", "w"]),
    ],
    ids=["range", "tuple", "sequence"],
)
def test_any_sequence_holds_one_value_per_key(
    tmp_path: Path, batch: Sequence[Any], expected: list[str]
) -> None:
    with AsyncWriter(tmp_path) as writer:
        writer.write_batch(["a", "b", "c"], batch, save=lambda p, v: p.write_text(str(v)), suffix=".txt")
    assert [(tmp_path / f"{k}.txt").read_text() for k in "abc"] == expected


@pytest.mark.parametrize(
    ("value", "text"),
    [("one text", "one text"), (b"\x00\x01", "b'\\x00\\x01'"), (42, "42"), (2.5, "2.5"),
     (np.float32(0.5), "0.5"), (torch.tensor(3), "tensor(3)")],
    ids=["str", "bytes", "int", "float", "numpy-scalar", "0-d-tensor"],
)  # fmt: skip
def test_one_value_is_the_sample_of_a_batch_of_one(tmp_path: Path, value: object, text: str) -> None:
    """A str is not split into characters (nor bytes into ints): with one key, it is that key's value."""
    seen: list[object] = []

    def save(path: Path, sample: object) -> None:
        seen.append(sample)
        path.write_text(str(sample))

    with AsyncWriter(tmp_path) as writer:
        writer.write_batch(["only"], value, save=save, suffix=".txt")
    assert (tmp_path / "only.txt").read_text() == text
    assert _files(tmp_path) == ["only.txt"]
    assert seen[0] is value or (isinstance(value, torch.Tensor) and torch.equal(seen[0], value))


def test_a_0d_tensor_of_a_batch_of_one_is_stored_as_it_is(tmp_path: Path) -> None:
    with AsyncWriter(tmp_path, SaveFormat.SAFETENSORS) as writer:
        writer.write_batch(["s"], torch.tensor(2.5, dtype=torch.float64))
    stored = read_back(tmp_path / "s.safetensors", SaveFormat.SAFETENSORS)["arr_0"]
    assert stored.shape == ()
    assert stored.item() == 2.5


def test_split_batch_layouts() -> None:
    assert split_batch("ab", 1).values == ("ab",)
    assert split_batch(["ab"], 1).values == ("ab",)
    assert split_batch(range(2), 2).values == (0, 1)
    with pytest.raises(UnsupportedValueError, match="generator cannot be split"):
        split_batch((v for v in "ab"), 2)


@pytest.mark.parametrize(
    ("batch", "empty"),
    [(None, True), ({}, True), ([], True), ((), True), (range(0), True), (torch.zeros(0, 3), True),
     (np.zeros((0,)), True), ({"y": torch.zeros(0, 2), "m": np.zeros((0, 4))}, True),
     ("", False), (b"", False), (0, False), (torch.tensor(0.0), False), (torch.zeros(1, 0), False),
     ([[]], False), ({"y": torch.zeros(0, 2), "ids": []}, False), ({"y": torch.zeros(1, 2)}, False)],
)  # fmt: skip
def test_has_no_samples(batch: object, empty: bool) -> None:
    assert has_no_samples(batch) is empty


def test_a_failing_custom_writer_leaves_nothing_and_surfaces(tmp_path: Path) -> None:
    def save(path: Path, value: Any) -> None:
        path.write_bytes(b"half")
        raise RuntimeError("encoder broke")

    writer = AsyncWriter(tmp_path)
    writer.write_batch(["a", "b"], torch.zeros(2, 2), save=save, suffix=".bin")
    with pytest.raises(RuntimeError, match="encoder broke"):
        writer.close()
    assert _files(tmp_path) == []


@pytest.mark.parametrize(
    ("keys", "batch", "error", "message"),
    [(["a", "b"], torch.zeros(3, 2), InvalidLayoutError, r"shape \(3, 2\), but 2 keys"),
     (["a", "b"], {"m": torch.zeros(2), "n": torch.zeros(1)}, InvalidLayoutError, r"batch\['n'\]"),
     (["a", "b"], torch.tensor(1.0), InvalidLayoutError, "a 0-d Tensor, one sample's value, but 2 keys"),
     (["a", "b"], "ab", InvalidLayoutError, r"one str \('ab'\), one sample's value, but 2 keys"),
     (["a", "b"], b"ab", InvalidLayoutError, r"one bytes \(b'ab'\), one sample's value, but 2 keys"),
     (["a", "b"], 7, InvalidLayoutError, r"one int \(7\), one sample's value, but 2 keys"),
     (["a", "b"], range(3), InvalidLayoutError, r"the batch \(range\) has 3 values for 2 keys"),
     (["a", "b"], {"a", "b"}, UnsupportedValueError, "set cannot be split into samples"),
     (["a", "b"], ["only one"], InvalidLayoutError, "1 values for 2 keys"),
     (["a", "./a"], torch.zeros(2), InvalidKeyError, "more than once"),
     (["a", "../b"], torch.zeros(2), InvalidKeyError, "under the output root")],
)  # fmt: skip
def test_bad_batches_fail_at_the_call(
    tmp_path: Path, keys: list[str], batch: object, error: type[Exception], message: str
) -> None:
    with AsyncWriter(tmp_path) as writer, pytest.raises(error, match=message):
        writer.write_batch(keys, batch)
    assert _files(tmp_path) == []


def test_bad_suffix_is_refused(tmp_path: Path) -> None:
    with AsyncWriter(tmp_path) as writer, pytest.raises(InvalidKeyError, match="suffix 'png'"):
        writer.write_batch(["a"], torch.zeros(1), save=lambda p, v: None, suffix="png")


@pytest.mark.parametrize("custom", [False, True])
def test_device_batch_is_copied_once_for_all_samples(tmp_path: Path, custom: bool) -> None:
    engine = FakeEngine(delay=0.05)
    with AsyncWriter(tmp_path, SaveFormat.NUMPY_NPY, DictMode.SPLIT) as writer:
        stage_on(writer, Stager(1 << 20, engine, pin=False))
        writer._stager.pool.buffer.fill_(POISON)
        batch = {"a": engine.put(torch.rand(6, 10)), "b": engine.put(torch.arange(12).reshape(6, 2))}
        expected = {name: t.clone() for name, t in batch.items()}

        def save_a(path: Path, value: dict[str, torch.Tensor]) -> None:
            with open(path, "wb") as file:  # np.save would append .npy to a path without it
                np.save(file, value["a"].numpy())

        save = save_a if custom else None
        writer.write_batch([f"s{i}" for i in range(6)], batch, save=save, suffix=".npy" if custom else "")
    assert engine.copies == [2], "one copy batch for the whole batch, not one per sample"
    for i in range(6):
        if custom:
            np.testing.assert_array_equal(np.load(tmp_path / f"s{i}.npy"), expected["a"][i].numpy())
        else:
            np.testing.assert_array_equal(np.load(tmp_path / f"s{i}_b.npy"), expected["b"][i].numpy())


def test_a_device_0d_tensor_of_a_batch_of_one_is_staged_and_written(tmp_path: Path) -> None:
    engine = FakeEngine(delay=0.05)
    value = engine.put(torch.tensor(6.25))
    with AsyncWriter(tmp_path, SaveFormat.NUMPY_NPY) as writer:
        stage_on(writer, Stager(1 << 20, engine, pin=False))
        writer._stager.pool.buffer.fill_(POISON)
        writer.write_batch(["s"], value)
    assert engine.copies == [1]
    assert np.load(tmp_path / "s.npy").item() == 6.25
