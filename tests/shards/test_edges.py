"""ShardWriter at its edges: callbacks, a failing upload queue, flush racing close, hostile headers, a
shard killed before its rename, 1-D batches, the shard list's place and source."""

from __future__ import annotations

import json
import queue
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from tensorsink import WriterClosedError
from tensorsink.manifest import verify
from tensorsink.shards import ShardReader, ShardWriter
from tensorsink.shards.tar import BLOCK, read_members

pytestmark = pytest.mark.usefixtures("each_engine")


def test_a_callback_that_writes_on_a_full_budget_does_not_deadlock(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, save_format="npy", shard_samples=1, max_inflight_bytes=1024)
    chained = threading.Event()
    threads: list[str] = []

    def write_next(_: object) -> None:
        threads.append(threading.current_thread().name)
        writer.write("b", np.zeros(200))  # over the budget while "c" is queued
        chained.set()

    writer.write("a", np.zeros(3)).add_done_callback(write_next)
    writer.write("c", np.zeros(3))
    writer.flush()  # returns after the callbacks of the writes it waited for
    assert chained.is_set()
    assert threads == ["tensorsink-callbacks"]
    writer.close()
    assert sorted(ShardReader(tmp_path).keys()) == ["a", "b", "c"]


def test_a_callback_raising_system_exit_is_logged_and_writing_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def leave(_: object) -> None:
        raise SystemExit(0)

    with ShardWriter(tmp_path, save_format="npy") as writer:
        writer.write("a", np.zeros(3)).add_done_callback(leave)
        writer.flush()
        writer.write("b", np.zeros(3))
    assert "done-callback" in caplog.text
    assert sorted(ShardReader(tmp_path).keys()) == ["a", "b"]


def test_an_upload_queue_that_refuses_fails_close_without_a_hang(tmp_path: Path) -> None:
    class Refusing(queue.Queue[Path]):
        def put(self, item: Path, block: bool = True, timeout: float | None = None) -> None:
            raise ValueError("queue is closed")

    writer = ShardWriter(tmp_path, save_format="npy", upload_queue=Refusing())
    writer.write("a", np.zeros(3))
    with pytest.raises(ValueError, match="queue is closed") as raised:
        writer.flush()
    assert "for upload" in "".join(raised.value.__notes__)
    with pytest.raises(ValueError, match="queue is closed"):
        writer.close()
    assert verify(tmp_path).ok  # the shard itself was committed


def test_flush_after_close_is_refused(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path)
    writer.close()
    with pytest.raises(WriterClosedError):
        writer.flush()


def test_a_header_with_a_negative_size_is_unreadable_not_a_loop(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, save_format="npy") as writer:
        writer.write_batch(["a", "b"], np.zeros((2, 8)))
    (shard,) = tmp_path.glob("*.tar")
    data = bytearray(shard.read_bytes())
    second = next(m for m in read_members(bytes(data)) if m.name == "b.npy").offset - BLOCK
    data[second + 124 : second + 136] = b"-0000003000\0"
    data[second + 148 : second + 156] = b" " * 8
    data[second + 148 : second + 156] = b"%06o\0 " % sum(data[second : second + BLOCK])
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="not an octal number"):
        list(read_members(bytes(data)))
    assert any("not an octal number" in problem for problem in verify(tmp_path).unreadable)


def test_the_reader_keeps_the_shard_on_disk_when_a_newer_one_never_was_renamed(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, save_format="npy") as writer:
        writer.write("a", np.zeros(3))
    with ShardWriter(tmp_path, save_format="npy") as writer:
        writer.write_batch(["a", "new"], np.ones((2, 3)))
    newest = max(tmp_path.glob("*.tar"), key=lambda p: p.stat().st_mtime_ns)
    newest.unlink()  # as if killed after its journal line, before its rename
    reader = ShardReader(tmp_path)
    assert reader.keys() == ["a"]
    assert reader.load("a")["npy"].tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("save_format", ["npy", "pt", "safetensors", "npz"])
def test_a_1d_numpy_batch_is_one_scalar_a_sample(tmp_path: Path, save_format: str) -> None:
    with ShardWriter(tmp_path, save_format=save_format) as writer:
        writer.write_batch(["a", "b", "c"], np.arange(3, dtype=np.float32))
        writer.write_batch((f"g{i}" for i in range(2)), torch.arange(2))  # a generator of keys
    (value,) = ShardReader(tmp_path).load("c").values()
    stored = value["arr_0"] if isinstance(value, dict) else value
    assert float(np.asarray(stored)) == 2.0
    assert len(ShardReader(tmp_path)) == 5


def test_split_samples_keep_shards_under_shard_bytes(tmp_path: Path) -> None:
    value = {"x": np.zeros((4, 512), np.float32), "y": np.zeros((4, 512), np.float32)}
    with ShardWriter(tmp_path, save_format="npy", dict_mode="split", shard_bytes=8192) as writer:
        writer.write_batch(["a", "b", "c", "d"], value)
    assert all(p.stat().st_size <= 8192 for p in tmp_path.glob("*.tar"))


def test_the_shard_list_lives_in_the_root_and_lists_without_journals(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="in the root"):
        ShardWriter(tmp_path, shard_list="lists/train.json")
    with ShardWriter(tmp_path, save_format="npy", manifest=False) as writer:
        writer.write_batch(["a", "b"], np.zeros((2, 3)))
    listing = json.loads((tmp_path / "shards.json").read_text())["shardlist"]
    assert [s["nsamples"] for s in listing] == [2]
