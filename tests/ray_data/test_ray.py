from __future__ import annotations

import json
import os
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ray = pytest.importorskip("ray")
from safetensors.numpy import load_file  # noqa: E402

from tensorsink import InvalidKeyError, sweep  # noqa: E402
from tensorsink.commit import is_temporary  # noqa: E402
from tensorsink.manifest import JOURNAL_DIR, Manifest, verify  # noqa: E402
from tensorsink.ray import CommittedBatchWriter, TensorDatasink  # noqa: E402
from tensorsink.shards import ShardReader  # noqa: E402
from tests.support import outputs_under  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("ray_session"),
    # Ray Data's DataContext warns about deprecated fields it sets itself (copies of it included).
    pytest.mark.filterwarnings(r"ignore::DeprecationWarning:ray\.data\.context"),
]


def _rows(count: int, blocks: int, *, str_keys: bool = True) -> Any:
    """A dataset of `count` rows in `blocks` blocks: a key, a (4, 8) float32 field, an int16 vector."""

    def make(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = batch["id"]
        out: dict[str, np.ndarray] = {
            "field": np.stack([np.full((4, 8), i, np.float32) for i in ids]),
            "vec": np.stack([(np.arange(3) + i).astype(np.int16) for i in ids]),
        }
        out["key"] = np.array([f"scene/{i:03d}" for i in ids], dtype=object) if str_keys else ids
        return out

    return ray.data.range(count, override_num_blocks=blocks).map_batches(make)


def _final_files(root: Path) -> list[Path]:
    return [p for p in outputs_under(root) if p.is_file() and not is_temporary(p.name)]


def _journals(root: Path) -> list[Path]:
    return sorted((root / JOURNAL_DIR).glob("journal-*.jsonl"))


def test_rows_become_files_across_tasks_and_blocks(tmp_path: Path) -> None:
    sink = TensorDatasink(tmp_path, key_column="key", durability="none", min_bytes_per_write=None)
    _rows(24, 4).write_datasink(sink)
    files = _final_files(tmp_path)
    assert len(files) == 24
    loaded = load_file(str(tmp_path / "scene" / "017.safetensors"))
    assert set(loaded) == {"field", "vec"}
    np.testing.assert_array_equal(loaded["field"], np.full((4, 8), 17, np.float32))
    np.testing.assert_array_equal(loaded["vec"], (np.arange(3) + 17).astype(np.int16))
    result = sink.result
    assert result is not None
    assert (result.rows, result.files, result.skipped) == (24, 24, 0)
    assert result.bytes == 24 * (4 * 8 * 4 + 3 * 2)
    assert result.tasks >= 2  # several write tasks, each with its own writer and journal
    assert _journals(tmp_path) == [Path(result.journal or "")]  # merged into one
    assert len(Manifest.load(tmp_path).records) == 24
    report = verify(tmp_path)
    assert report.ok, report
    assert report.checked == 24


def test_blocks_are_gathered_into_large_write_tasks(tmp_path: Path) -> None:
    rows = _rows(24, 6).materialize()  # six blocks, a few hundred bytes each
    small = TensorDatasink(tmp_path / "small", key_column="key", min_bytes_per_write=None)
    rows.write_datasink(small)
    large = TensorDatasink(tmp_path / "large", key_column="key")  # 64 MiB by default
    rows.write_datasink(large)
    assert small.result is not None
    assert large.result is not None
    assert small.result.tasks == 6  # one task per block
    assert large.result.tasks == 1  # all six blocks in one task: its fixed cost paid once
    assert large.result.rows == small.result.rows == 24
    assert verify(tmp_path / "large").ok


def test_int_keys_one_column_as_tensor(tmp_path: Path) -> None:
    sink = TensorDatasink(tmp_path, key_column="key", columns=["vec"])
    _rows(10, 2, str_keys=False).write_datasink(sink)
    assert sorted(p.name for p in _final_files(tmp_path)) == sorted(f"{i}.safetensors" for i in range(10))
    loaded = load_file(str(tmp_path / "7.safetensors"))
    assert list(loaded) == ["arr_0"]  # one column: stored as a tensor
    np.testing.assert_array_equal(loaded["arr_0"], (np.arange(3) + 7).astype(np.int16))
    assert verify(tmp_path).ok


def test_split_writes_a_file_per_column(tmp_path: Path) -> None:
    sink = TensorDatasink(tmp_path, key_column="key", save_format="npy", dict_mode="split")
    _rows(6, 2, str_keys=False).write_datasink(sink)
    assert len(_final_files(tmp_path)) == 12
    np.testing.assert_array_equal(np.load(tmp_path / "4_vec.npy"), (np.arange(3) + 4).astype(np.int16))
    assert sink.result is not None
    assert (sink.result.rows, sink.result.files) == (6, 12)
    assert verify(tmp_path).ok


def test_bad_options_fail_on_the_driver(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="did you mean 'workers'"):
        TensorDatasink(tmp_path, key_column="key", worker=2)
    with pytest.raises(ValueError, match="not the key column"):
        TensorDatasink(tmp_path, key_column="key", columns=["key"])
    with pytest.raises(ValueError, match=r"min_bytes_per_write=0\) must be a positive int"):
        TensorDatasink(tmp_path, key_column="key", min_bytes_per_write=0)


@pytest.mark.parametrize(
    ("rows", "columns", "error"),
    [
        ([{"key": "../escape", "x": np.zeros(2)}], None, "must stay under the output root"),
        ([{"key": "a", "x": np.zeros(2)}], ["nope"], r"\['nope'\] not in the dataset's columns"),
        ([{"key": "a", "x": "text"}], None, "UnsupportedValueError"),
    ],
    ids=["key-escapes-root", "missing-column", "object-column"],
)
def test_bad_rows_fail_the_write(
    tmp_path: Path, rows: list[dict[str, Any]], columns: list[str] | None, error: str
) -> None:
    ds = ray.data.from_items(rows, override_num_blocks=1)
    with pytest.raises(Exception, match=error):
        ds.write_datasink(TensorDatasink(tmp_path / "out", key_column="key", columns=columns))
    assert not (tmp_path / "escape.safetensors").exists()
    out = tmp_path / "out"
    assert not out.exists() or _final_files(out) == []


def test_skip_existing_writes_only_missing_rows(tmp_path: Path) -> None:
    _rows(20, 4).write_datasink(TensorDatasink(tmp_path, key_column="key"))
    files = _final_files(tmp_path)
    for gone in files[::4]:
        gone.unlink()
    kept = {p: p.stat().st_mtime_ns for p in files if p.exists()}
    sink = TensorDatasink(tmp_path, key_column="key", skip_existing=True)
    _rows(20, 4).write_datasink(sink)
    assert sink.result is not None
    assert (sink.result.files, sink.result.skipped) == (5, 15)
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # untouched
    assert len(_final_files(tmp_path)) == 20
    assert verify(tmp_path).ok


def _keyed(keys: list[str], blocks: int) -> Any:
    """Rows with the given keys (in order, in `blocks` blocks) and a vector that tells them apart."""
    rows = [{"key": key, "x": np.full(2, i, np.float32)} for i, key in enumerate(keys)]
    return ray.data.from_items(rows, override_num_blocks=blocks).materialize()


def test_a_key_in_two_write_tasks_fails_the_write_naming_it(tmp_path: Path) -> None:
    """Two rows of one key in different tasks would leave one file for both: the driver refuses."""
    ds = _keyed(["a", "b", "c", "./a"], blocks=2)  # "./a" is "a": one file
    sink = TensorDatasink(tmp_path, key_column="key", min_bytes_per_write=None)  # a task per block
    with pytest.raises(
        InvalidKeyError, match=r"key_column='key'\): key 'a' is in rows of more than one write task"
    ):
        ds.write_datasink(sink)
    assert sink.result is None
    assert not [p for p in _journals(tmp_path) if "merged" in p.name], "a failed write merges nothing"


def test_many_keys_in_two_tasks_are_counted_and_some_named(tmp_path: Path) -> None:
    keys = [f"k{i}" for i in range(8)]
    with pytest.raises(
        InvalidKeyError, match=r"8 keys \('k0', 'k1', 'k2', 'k3', 'k4' and 3 more\) are each in rows of"
    ):
        _keyed(keys + keys, blocks=2).write_datasink(
            TensorDatasink(tmp_path, key_column="key", min_bytes_per_write=None)
        )


@pytest.mark.parametrize("blocks", [1, 2], ids=["one-block", "two-blocks"])
def test_a_key_twice_in_one_write_task_fails_it_naming_the_key(tmp_path: Path, blocks: int) -> None:
    """In one block, or in two blocks gathered into one task (64 MiB by default): refused in the task."""
    with pytest.raises(Exception, match=r"key 'scene/1' is in two rows of one write task"):
        _keyed(["scene/0", "scene/1", "scene/2", "scene/1"], blocks).write_datasink(
            TensorDatasink(tmp_path, key_column="key")
        )
    # Refused before its block is queued: only an earlier block's rows (each once) are written.
    written = sorted(p.relative_to(tmp_path).as_posix() for p in _final_files(tmp_path))
    assert written == ([] if blocks == 1 else ["scene/0.safetensors", "scene/1.safetensors"])


def test_distinct_keys_in_many_tasks_pass_the_check(tmp_path: Path) -> None:
    sink = TensorDatasink(tmp_path, key_column="key", min_bytes_per_write=None)
    _keyed([f"{i}" for i in range(12)], blocks=4).write_datasink(sink)
    assert sink.result is not None
    assert (sink.result.rows, sink.result.tasks) == (12, 4)


class _DiesOnce(TensorDatasink):
    """Kills its worker process after queueing its first block, on the first attempt only."""

    def __init__(self, path: Path, marker: Path) -> None:
        super().__init__(path, key_column="key")
        self.marker = str(marker)

    def write(self, blocks: Any, ctx: Any) -> Any:
        def blocks_then_die() -> Any:
            for block in blocks:
                yield block  # the writer queues this block's files, then asks for the next
                if not os.path.exists(self.marker):
                    open(self.marker, "w").close()
                    os._exit(1)  # a crashed worker, files in flight: Ray retries the task

        return super().write(blocks_then_die(), ctx)


def test_task_killed_midway_is_retried_without_duplicates(tmp_path: Path) -> None:
    out, marker = tmp_path / "out", tmp_path / "died"
    sink = _DiesOnce(out, marker)
    _rows(16, 4).repartition(2).write_datasink(sink)
    assert marker.exists()  # the first attempt did die
    files = _final_files(out)
    assert len(files) == 16  # one file per row: the retry replaced, it did not add
    assert sink.result is not None
    assert sink.result.rows == 16
    assert not [p for p in out.rglob("*") if is_temporary(p.name)]  # swept on completion
    report = verify(out)
    assert report.ok, report


class _Predict:
    """A map_batches callable class: 'predicts', writes through CommittedBatchWriter, returns rows."""

    def __init__(self, root: str) -> None:
        import torch

        self.torch = torch
        self.writer = CommittedBatchWriter(root, durability="none")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        ids = torch.as_tensor(batch["id"])
        preds = {"y": ids[:, None].float() * torch.ones(1, 16), "idx": ids}
        time.sleep(0.01)
        return self.writer.write([f"p/{int(i)}" for i in ids], preds)


def test_actor_helper_returns_committed_files(tmp_path: Path) -> None:
    ds = ray.data.range(40, override_num_blocks=4).map_batches(
        _Predict,
        fn_constructor_args=(str(tmp_path),),
        batch_size=8,
        compute=ray.data.ActorPoolStrategy(
            size=1, max_concurrent_calls_per_actor=2, enable_true_multi_threading=True
        ),  # two threads share the actor's writer
    )
    rows = ds.take_all()
    assert len(rows) == 40
    assert set(rows[0]) == {"key", "path", "bytes"}
    for row in rows:
        path = Path(row["path"])
        assert path.stat().st_size == row["bytes"]
        i = int(row["key"].split("/")[1])
        loaded = load_file(str(path))
        np.testing.assert_array_equal(loaded["y"], np.full(16, i, np.float32))
        assert int(loaded["idx"]) == i
    report = verify(tmp_path)
    assert report.ok, report


class _PredictDiesOnce(_Predict):
    """Queues its first batch's files, then kills its actor before they are committed (first time only)."""

    def __init__(self, root: str, marker: str) -> None:
        super().__init__(root)
        self.marker = marker

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not os.path.exists(self.marker):
            open(self.marker, "w").close()
            big = {"y": np.ones((len(batch["id"]), 1 << 20), np.float32)}  # 4 MiB a file: still in flight
            self.writer.writer.write_batch([f"p/{int(i)}" for i in batch["id"]], big)
            os._exit(1)  # the actor dies; Ray restarts it and retries the batch
        return super().__call__(batch)


def test_killed_actor_leaves_no_torn_file(tmp_path: Path) -> None:
    out, marker = tmp_path / "out", tmp_path / "died"
    ds = ray.data.range(16, override_num_blocks=2).map_batches(
        _PredictDiesOnce,
        fn_constructor_args=(str(out), str(marker)),
        batch_size=8,
        compute=ray.data.ActorPoolStrategy(size=1),
    )
    rows = ds.take_all()
    assert marker.exists()
    assert sorted(int(r["key"].split("/")[1]) for r in rows) == list(range(16))
    for row in rows:  # every returned row names a committed file with the retried batch's contents
        assert Path(row["path"]).stat().st_size == row["bytes"]
        assert load_file(row["path"])["y"].shape == (16,)
    sweep(out)  # removes whatever temporaries the killed actor left
    assert not [p for p in out.rglob("*") if is_temporary(p.name)]
    assert len(_final_files(out)) == 16
    report = verify(out)
    assert report.ok, report


class _ShardsDieOnce(TensorDatasink):
    """Shards; kills its worker after its first block's shard is committed, on the first attempt only."""

    def __init__(self, path: Path, marker: Path) -> None:
        super().__init__(path, key_column="key", shards=True, save_format="npy", dict_mode="split")
        self.marker = str(marker)

    def write(self, blocks: Any, ctx: Any) -> Any:
        def blocks_then_die() -> Any:
            for block in blocks:
                yield block
                if not os.path.exists(self.marker):
                    open(self.marker, "w").close()
                    os._exit(1)

        return super().write(blocks_then_die(), ctx)


def test_shards_from_every_task_in_one_list(tmp_path: Path) -> None:
    sink = TensorDatasink(tmp_path, key_column="key", shards=True, save_format="npy", dict_mode="split",
                          shard_samples=5, min_bytes_per_write=None)  # fmt: skip
    _rows(23, 3).write_datasink(sink)
    assert sink.result is not None
    assert (sink.result.rows, sink.result.files) == (23, 23)
    listing = json.loads((tmp_path / "shards.json").read_text())["shardlist"]
    assert sum(s["nsamples"] for s in listing) == 23
    reader = ShardReader(tmp_path)
    assert len(reader) == 23
    np.testing.assert_array_equal(reader.load("scene/007")["field.npy"], np.full((4, 8), 7, np.float32))
    assert verify(tmp_path).ok


def test_a_retried_shard_task_lists_each_sample_once(tmp_path: Path) -> None:
    out, marker = tmp_path / "out", tmp_path / "died"
    sink = _ShardsDieOnce(out, marker)
    _rows(16, 4).repartition(2).write_datasink(sink)
    assert marker.exists()
    listing = json.loads((out / "shards.json").read_text())["shardlist"]
    keys: list[str] = []
    for shard in listing:
        with tarfile.open(out / shard["url"]) as tar:
            keys += {name.split(".")[0] for name in tar.getnames()}  # two members a sample (split)
    assert sorted(set(keys)) == sorted(keys) == [f"scene/{i:03d}" for i in range(16)]
    assert verify(out).ok


def test_shards_refuse_asyncwriter_only_options(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"'workers'.*ShardWriter's options"):
        TensorDatasink(tmp_path, key_column="key", shards=True, workers=2)
