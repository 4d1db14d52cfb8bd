"""Save functions as users write them: np.save, with_suffix, Pillow; and those that write elsewhere."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tensorsink import AsyncWriter, SaveFunctionError, sweep
from tensorsink.commit import is_temporary
from tensorsink.manifest import Manifest, crc32_of_path, verify
from tensorsink.sample_writers import writers
from tests.support import outputs_under

pytestmark = pytest.mark.usefixtures("each_engine")


def _np_save(path: Path, value: Any) -> None:
    np.save(path, np.asarray(value))  # appends .npy unless the path ends in it


def _text_with_suffix(path: Path, value: Any) -> None:
    path.with_suffix(".txt").write_text(f"{value.sum().item()}\n")  # the Lighter writers' way


def _pillow(path: Path, value: Any) -> None:
    from PIL import Image

    Image.fromarray(np.asarray(value, dtype=np.uint8)).save(path)  # the format from the extension


def _replacing(path: Path, value: Any) -> None:
    """A library that writes atomically itself: its own temporary, then os.replace onto the path."""
    aside = path.with_name(path.name + ".mine")
    aside.write_bytes(np.asarray(value).tobytes())
    os.replace(aside, path)


def _nothing_left(root: Path) -> None:
    assert not [p for p in root.rglob("*") if is_temporary(p.name)]
    assert sweep(root) == []


@pytest.mark.parametrize(
    ("save", "suffix"), [(_np_save, ".npy"), (_text_with_suffix, ".txt"), (_pillow, ".png")]
)
def test_ordinary_save_functions_write_the_committed_file(tmp_path: Path, save: Any, suffix: str) -> None:
    batch = torch.arange(2 * 4 * 4, dtype=torch.uint8).reshape(2, 4, 4)
    with AsyncWriter(tmp_path) as writer:
        paths = writer.write_batch(["a", "b"], batch, save=save, suffix=suffix).result()
    assert paths == [tmp_path / f"a{suffix}", tmp_path / f"b{suffix}"]
    for path, sample in zip(paths, batch, strict=True):
        assert path.stat().st_size > 0
        if suffix == ".npy":
            np.testing.assert_array_equal(np.load(path), sample.numpy())
        elif suffix == ".png":
            from PIL import Image

            with Image.open(path) as read:
                np.testing.assert_array_equal(np.asarray(read), sample.numpy())
        else:
            assert path.read_text() == f"{sample.sum().item()}\n"
    assert sorted(outputs_under(tmp_path)) == paths
    manifest = Manifest.load(tmp_path)
    for path in paths:
        record = manifest.records[path.name]
        assert (record["bytes"], int(record["crc32"], 16)) == crc32_of_path(path)[::-1]
    assert verify(tmp_path).ok
    _nothing_left(tmp_path)


def test_a_save_function_that_writes_beside_its_path_fails_naming_the_key(tmp_path: Path) -> None:
    writer = AsyncWriter(tmp_path)
    future = writer.write_batch(["scene_7"], torch.ones(1, 3), save=_np_save, suffix=".bin")
    with pytest.raises(
        SaveFunctionError, match=r"left it empty; it wrote scene_7\.bin\.npy instead"
    ) as caught:
        future.result()
    assert any("'scene_7'" in note for note in caught.value.__notes__)
    with pytest.raises(SaveFunctionError):
        writer.close()
    assert outputs_under(tmp_path) == []  # no empty scene_7.bin committed
    assert not Manifest.load(tmp_path).records
    _nothing_left(tmp_path)  # the stray .npy was removed


def test_a_save_function_that_removes_its_path_fails(tmp_path: Path) -> None:
    writer = AsyncWriter(tmp_path)
    future = writer.write_batch(["x"], torch.ones(1, 3), save=lambda path, value: path.unlink(), suffix=".x")
    with pytest.raises(SaveFunctionError, match="removed it"):
        future.result()
    with pytest.raises(SaveFunctionError):
        writer.close()
    assert outputs_under(tmp_path) == []
    _nothing_left(tmp_path)


def test_a_replaced_temporary_is_committed_and_journaled_as_it_is(tmp_path: Path) -> None:
    batch = torch.arange(2 * 1000, dtype=torch.float32).reshape(2, 1000)
    with AsyncWriter(tmp_path) as writer:
        paths = writer.write_batch(["a", "b"], batch, save=_replacing, suffix=".raw").result()
    manifest = Manifest.load(tmp_path)
    for path, sample in zip(paths, batch, strict=True):
        assert path.read_bytes() == sample.numpy().tobytes()
        record = manifest.records[path.name]
        assert record["bytes"] == 4000
        assert int(record["crc32"], 16) == crc32_of_path(path)[0]
    assert verify(tmp_path).ok
    _nothing_left(tmp_path)


def test_an_empty_file_is_a_result_where_the_writer_allows_it(tmp_path: Path) -> None:
    text = writers.get("text")
    assert text.allow_empty
    with AsyncWriter(tmp_path) as writer:
        writer.write_batch(["empty", "full"], ["", "x"], save=text, suffix=".txt", allow_empty=True)
    assert (tmp_path / "empty.txt").read_text() == ""
    assert (tmp_path / "full.txt").read_text() == "x"
    strict = AsyncWriter(tmp_path / "strict")
    with pytest.raises(SaveFunctionError, match="left it empty"):
        strict.write_batch(["e"], [""], save=text, suffix=".txt").result()
    with pytest.raises(SaveFunctionError):
        strict.close()


def test_registry_writers_are_callables(tmp_path: Path) -> None:
    image = torch.zeros(3, 4, 5)
    writers.get("image_2d")(tmp_path / "i.png", image)
    from PIL import Image

    with Image.open(tmp_path / "i.png") as read:
        assert read.size == (5, 4)
    writers.get("npy")(tmp_path / "t.npy", torch.arange(6).reshape(2, 3))
    np.testing.assert_array_equal(np.load(tmp_path / "t.npy"), np.arange(6).reshape(2, 3))
    writers.get("tensor")(tmp_path / "t.pt", {"a": torch.ones(2)})
    assert torch.equal(torch.load(tmp_path / "t.pt", weights_only=True)["a"], torch.ones(2))


def test_a_save_functions_file_is_journaled_without_arrays(tmp_path: Path) -> None:
    import json

    def save_text(path: Path, value: Any) -> None:
        path.write_text(str(value.tolist()))

    with AsyncWriter(tmp_path, "npy") as writer:
        writer.write_batch(["t"], torch.ones(1, 2, 3), save=save_text, suffix=".txt")
    (journal,) = (tmp_path / ".tensorsink").glob("journal-*.jsonl")
    records = [json.loads(line) for line in journal.read_text().splitlines()]
    assert {r["format"] for r in records} == {"txt"}
    assert all(r["arrays"] == [] for r in records)  # not the input sample's float32 (2, 3)
