"""ShardWriter: what it writes, read back by the readers users have (tarfile, webdataset, wids, our own),
its limits, its refusals, and its failures."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from tensorsink import DictMode, InvalidKeyError, InvalidLayoutError, UnsupportedValueError, WriterClosedError
from tensorsink.manifest import Manifest, verify
from tensorsink.shards import ShardReader, ShardWriter, publish_shard_list
from tensorsink.shards.tar import END

pytestmark = pytest.mark.usefixtures("each_engine")  # the C packer and its Python twin


def shards_in(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.tar") if not p.name.startswith("."))


def members(root: Path) -> list[str]:
    names = []
    for shard in shards_in(root):
        with tarfile.open(shard) as tar:
            names += tar.getnames()
    return names


def batch(count: int, width: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, width, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("save_format", ["npy", "safetensors", "pt", "npz"])
def test_every_sample_reads_back_bit_for_bit_by_key(tmp_path: Path, save_format: str) -> None:
    values = batch(300)
    keys = [f"scenes/{i:04d}" for i in range(300)]
    with ShardWriter(tmp_path, save_format=save_format, shard_samples=128) as writer:
        handle = writer.write_batch(keys, values)
        one = writer.write("extra/one", torch.arange(5))
    assert [p.name for p in handle.result()] == [p.name for p in shards_in(tmp_path)]
    assert one.result() == [shards_in(tmp_path)[-1]]
    reader = ShardReader(tmp_path)
    assert len(reader) == 301
    for i in (0, 127, 128, 299):
        (loaded,) = reader.load(keys[i]).values()
        array = loaded["arr_0"] if isinstance(loaded, dict) else loaded
        assert torch.equal(torch.as_tensor(np.asarray(array)), values[i])
    assert members(tmp_path)[:2] == [f"scenes/0000.{save_format}", f"scenes/0001.{save_format}"]
    assert verify(tmp_path).ok


def test_shard_samples_cuts_exactly_and_close_ends_the_last(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, save_format="npy", shard_samples=100) as writer:
        for start in range(0, 250, 30):  # batches that straddle the shards' ends
            count = min(30, 250 - start)
            writer.write_batch([f"k{i}" for i in range(start, start + count)], batch(count))
    listing = json.loads((tmp_path / "shards.json").read_text())
    assert listing["wids_version"] == 1
    assert [s["nsamples"] for s in listing["shardlist"]] == [100, 100, 50]
    assert [s["url"] for s in listing["shardlist"]] == [p.name for p in shards_in(tmp_path)]


def test_shard_bytes_bounds_each_shard_and_a_larger_sample_goes_alone(tmp_path: Path) -> None:
    limit = 64 * 1024
    with ShardWriter(tmp_path, save_format="npy", shard_bytes=limit) as writer:
        writer.write_batch([f"small{i}" for i in range(100)], batch(100, 1000))  # 4,000 bytes each
        writer.write("big", torch.zeros(50_000))  # 200 KB
        writer.write_batch([f"after{i}" for i in range(3)], batch(3, 1000))
    sizes = [p.stat().st_size for p in shards_in(tmp_path)]
    big = [s for s in sizes if s > limit]
    assert len(big) == 1
    assert big[0] < 2 * 200_000
    assert all(s <= limit for s in sizes if s not in big)
    assert sum(1 for s in sizes if s <= limit) >= 100 * 4_600 // limit
    assert verify(tmp_path).ok
    assert len(ShardReader(tmp_path)) == 104


def test_flush_commits_the_open_shard(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, save_format="npy")
    handle = writer.write_batch(["a", "b"], batch(2))
    writer.flush()
    assert handle.done()
    assert len(shards_in(tmp_path)) == 1
    writer.write("c", torch.ones(2))
    writer.close()
    assert len(shards_in(tmp_path)) == 2
    assert writer.stats().samples == 3
    assert writer.stats().shards == 2


def test_split_mappings_become_one_member_per_entry(tmp_path: Path) -> None:
    value = {"mask": torch.ones(2, 3, dtype=torch.uint8), "score": torch.tensor([0.5, 0.25])}
    with ShardWriter(tmp_path, save_format="npy", dict_mode=DictMode.SPLIT) as writer:
        writer.write_batch(["scan_1", "scan_2"], value)
    assert members(tmp_path) == ["scan_1.mask.npy", "scan_1.score.npy", "scan_2.mask.npy", "scan_2.score.npy"]
    loaded = ShardReader(tmp_path).load("scan_2")
    assert loaded["mask.npy"].tolist() == [1, 1, 1]
    assert loaded["score.npy"].tolist() == 0.25


def test_a_mapping_in_one_member(tmp_path: Path) -> None:
    value = {"a": torch.arange(3), "b": torch.ones(2, 2)}
    with ShardWriter(tmp_path, save_format="safetensors") as writer:
        writer.write("x", value)
        writer.write_batch(["y", "z"], {"a": torch.arange(6).reshape(2, 3), "b": torch.zeros(2, 4)})
    reader = ShardReader(tmp_path)
    assert torch.equal(reader.load("x")["safetensors"]["b"], value["b"])
    assert torch.equal(reader.load("z")["safetensors"]["a"], torch.arange(3, 6))


def test_a_list_of_values_is_one_sample_each(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, save_format="npy") as writer:
        handle = writer.write_batch(["a", "b"], [torch.ones(3), np.zeros((2, 2))])
    assert handle.result() == shards_in(tmp_path)
    assert ShardReader(tmp_path).load("b")["npy"].shape == (2, 2)


# webdataset, as its documentation uses it; in a child process, since it leaves each shard it read
# open for the collector to close (a ResourceWarning, an error in this suite).
READ_WEBDATASET = textwrap.dedent(
    """
    import hashlib, json, sys
    import webdataset as wds
    for sample in wds.WebDataset(sys.argv[1:], shardshuffle=False):
        members = {k: hashlib.sha256(v).hexdigest() for k, v in sample.items() if not k.startswith("__")}
        print(json.dumps([sample["__key__"], members]))
    """
)


def read_webdataset(shards: list[Path]) -> list[tuple[str, dict[str, str]]]:
    """Each sample webdataset reads from `shards`, in order: its key and each member's SHA-256."""
    result = subprocess.run(
        [sys.executable, "-c", READ_WEBDATASET, *map(str, shards)],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    return [tuple(json.loads(line)) for line in result.stdout.splitlines()]  # type: ignore[misc]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_long_and_unicode_keys_are_read_by_tarfile_and_webdataset(tmp_path: Path) -> None:
    keys = ["d/" + "k" * 150, "späť/ключ", 'quote"back\\slash', "x" * 97]
    with ShardWriter(tmp_path, save_format="npy") as writer:
        writer.write_batch(keys, batch(4))
    assert members(tmp_path) == [f"{key}.npy" for key in keys]
    read = [key for key, _ in read_webdataset(shards_in(tmp_path))]
    assert read == keys
    reader = ShardReader(tmp_path)
    assert reader.keys() == sorted(keys)
    assert reader.load(keys[1])["npy"].tolist() == batch(4)[1].tolist()
    assert verify(tmp_path).ok


def test_webdataset_and_wids_read_every_sample(tmp_path: Path) -> None:
    import wids

    values = batch(40, 16)
    keys = [f"s/{i:03d}" for i in range(40)]
    with ShardWriter(tmp_path, save_format="npy", shard_samples=15) as writer:
        writer.write_batch(keys, values)
    reader = ShardReader(tmp_path)
    seen = read_webdataset(shards_in(tmp_path))
    assert [key for key, _ in seen] == keys
    assert all(members == {"npy": sha256(reader.read(key)["npy"])} for key, members in seen)
    assert np.array_equal(reader.load(keys[7])["npy"], values[7].numpy())
    dataset = wids.ShardListDataset(
        str(tmp_path / "shards.json"), cache_dir=str(tmp_path / "cache"), transformations=[]
    )
    assert len(dataset) == 40
    for i in (0, 14, 15, 39):
        sample = dataset[i]
        assert sample["__key__"] == keys[i]
        assert np.array_equal(np.load(sample[".npy"]), values[i].numpy())
    dataset.close()


def test_keys_webdataset_cannot_group_are_refused_at_the_call(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, save_format="npy", dict_mode="split") as writer:
        with pytest.raises(InvalidKeyError, match=r"dot in its last part.*'scene'"):
            writer.write("preds/scene.v2", torch.ones(1))
        with pytest.raises(InvalidKeyError, match=r"without '\.'"):
            writer.write("k", {"a.b": torch.ones(1)})
        with pytest.raises(InvalidKeyError, match="more than once"):
            writer.write_batch(["a", "a"], batch(2))
        with pytest.raises(InvalidKeyError, match="one str"):
            writer.write_batch("ab", batch(2))
        with pytest.raises(InvalidKeyError, match="under the output root"):
            writer.write_batch(["ok", "../out"], batch(2))
        writer.write("dots.in.folders/are_fine", torch.ones(1))
    assert members(tmp_path) == ["dots.in.folders/are_fine.0.npy"] or members(tmp_path) == [
        "dots.in.folders/are_fine.npy"
    ]


def test_values_the_format_cannot_store_are_refused_at_the_call(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, save_format="npy") as writer:
        with pytest.raises(InvalidLayoutError, match=r"DictMode\.SPLIT"):
            writer.write("m", {"a": torch.ones(1), "b": torch.ones(1)})
        with pytest.raises(UnsupportedValueError, match="bfloat16"):
            writer.write_batch(["a", "b"], torch.ones(2, 2, dtype=torch.bfloat16))
        with pytest.raises(InvalidLayoutError, match="3 keys"):
            writer.write_batch(["a", "b", "c"], batch(2))
    assert shards_in(tmp_path) == []


def test_a_key_written_twice_never_shares_a_shard_with_itself(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, save_format="npy") as writer:
        writer.write("k", torch.zeros(2))
        writer.write_batch(["j", "k"], torch.ones(2, 2))
    assert len(shards_in(tmp_path)) == 2
    for shard in shards_in(tmp_path):
        with tarfile.open(shard) as tar:
            names = tar.getnames()
        assert len(names) == len(set(names))
    assert ShardReader(tmp_path).load("k")["npy"].tolist() == [1.0, 1.0]  # the latest


def test_skip_existing_writes_the_rest_into_new_shards(tmp_path: Path) -> None:
    keys = [f"k{i}" for i in range(10)]
    with ShardWriter(tmp_path, save_format="npy") as writer:
        writer.write_batch(keys[:6], batch(6))
    (first,) = shards_in(tmp_path)
    before = first.read_bytes()
    with ShardWriter(tmp_path, save_format="npy", skip_existing=True) as writer:
        assert writer.is_done("k3")
        assert not writer.is_done("k7")
        writer.write_batch(keys, batch(10))
        assert writer.stats().skipped == 6
    assert first.read_bytes() == before  # never appended to
    assert len(shards_in(tmp_path)) == 2
    assert sorted(members(tmp_path)) == sorted(f"{k}.npy" for k in keys)
    listing = json.loads((tmp_path / "shards.json").read_text())
    assert sum(s["nsamples"] for s in listing["shardlist"]) == 10


def test_is_done_answers_for_this_run_and_earlier_ones(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, save_format="npy")
    writer.write("a", torch.ones(1))
    assert not writer.is_done("a")  # still in the open shard
    writer.flush()
    assert writer.is_done("a")
    assert not writer.is_done("b")
    writer.close()
    assert Manifest.load(tmp_path).done("a")
    (shards_in(tmp_path)[0]).write_bytes(b"torn")
    assert not Manifest.load(tmp_path).done("a")


def test_the_shard_list_merges_every_writer_under_the_root(tmp_path: Path) -> None:
    one = ShardWriter(tmp_path, save_format="npy", shard_samples=2)
    two = ShardWriter(tmp_path, save_format="npy", shard_samples=2)
    one.write_batch(["a", "b", "c"], batch(3))
    two.write_batch(["d", "e"], batch(2))
    two.close()
    one.close()
    listing = json.loads((tmp_path / "shards.json").read_text())["shardlist"]
    assert sum(s["nsamples"] for s in listing) == 5
    assert len(listing) == 3
    assert len({s["url"] for s in listing}) == 3  # writers name their shards apart
    assert verify(tmp_path).ok  # the list itself is journaled


def test_upload_queue_gets_each_shard_and_the_list(tmp_path: Path) -> None:
    uploads: queue.Queue[Path] = queue.Queue()
    with ShardWriter(tmp_path, save_format="npy", shard_samples=2, upload_queue=uploads) as writer:
        writer.write_batch(["a", "b", "c"], batch(3))
    got = [uploads.get_nowait() for _ in range(uploads.qsize())]
    assert got == [*shards_in(tmp_path), tmp_path / "shards.json"]


def test_copy_true_lets_the_caller_overwrite_at_once(tmp_path: Path) -> None:
    values = batch(8)
    expected = values.clone()
    with ShardWriter(tmp_path, save_format="npy") as writer:
        handle = writer.write_batch([f"k{i}" for i in range(8)], values, copy=True)
        assert handle.staged()
        values.zero_()
    assert ShardReader(tmp_path).load("k5")["npy"].tolist() == expected[5].tolist()


def test_a_batch_with_no_samples_writes_nothing(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, save_format="npy") as writer:
        assert writer.write_batch([], torch.ones(0, 3)).result() == []
    assert shards_in(tmp_path) == []


def test_closed_and_bad_settings(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path)
    writer.close()
    writer.close()
    with pytest.raises(WriterClosedError):
        writer.write("a", torch.ones(1))
    with pytest.raises(ValueError, match="shard_bytes=0"):
        ShardWriter(tmp_path, shard_bytes=0)
    with pytest.raises(ValueError, match=r"prefix='a\.b'"):
        ShardWriter(tmp_path, prefix="a.b")
    with pytest.raises(ValueError, match=r"shard_list='list\.txt'"):
        ShardWriter(tmp_path, shard_list="list.txt")
    with pytest.raises(InvalidKeyError):
        ShardWriter(tmp_path, prefix="../outside")


def test_prefix_with_folders_and_no_list(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, save_format="npy", prefix="train/part", shard_list=None) as writer:
        writer.write("a", torch.ones(1))
    (shard,) = shards_in(tmp_path)
    assert shard.parent == tmp_path / "train"
    assert shard.name.startswith("part-")
    assert not (tmp_path / "shards.json").exists()
    assert publish_shard_list(str(tmp_path), "all.json", _committer(tmp_path)).exists()


def _committer(root: Path):  # type: ignore[no-untyped-def]
    from tensorsink.commit import Committer
    from tensorsink.options import Durability

    return Committer(Durability.NONE, str(root))


def test_a_failed_shard_fails_its_writes_naming_their_keys_and_commits_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tensorsink.commit import Committer

    real = Committer.finish
    calls = [0]

    def failing_second(self: Committer, final: str, *args: object, **kwargs: object) -> object:
        calls[0] += 1
        if final.endswith(".tar") and calls[0] == 2:
            os.close(args[2])  # type: ignore[arg-type]
            os.unlink(args[1])  # type: ignore[arg-type]
            raise OSError(28, "No space left on device", final)
        return real(self, final, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Committer, "finish", failing_second)
    writer = ShardWriter(tmp_path, save_format="npy", shard_samples=4)
    first = writer.write_batch([f"a{i}" for i in range(4)], batch(4))
    second = writer.write_batch([f"b{i}" for i in range(4)], batch(4))
    with pytest.raises(OSError, match="No space") as raised:
        writer.close()
    assert first.exception() is None
    assert second.exception() is raised.value
    assert "'b0', 'b1', 'b2', 'b3'" in "".join(raised.value.__notes__)
    assert len(shards_in(tmp_path)) == 1
    assert verify(tmp_path).ok
    assert not Manifest.load(tmp_path).done("b0")
    assert Manifest.load(tmp_path).done("a0")


def test_verify_finds_a_flipped_byte_a_cut_shard_and_a_wrong_member(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, save_format="npy", shard_samples=3) as writer:
        writer.write_batch([f"k{i}" for i in range(9)], batch(9, 64))
    a, b, c = shards_in(tmp_path)
    data = bytearray(a.read_bytes())
    data[512 + 200] ^= 1
    a.write_bytes(bytes(data))
    b.write_bytes(b.read_bytes()[: -len(END)] + bytes(len(END) - 1) + b"x")
    report = verify(tmp_path)
    assert report.checksum_mismatch == [a.name] or any(a.name in u for u in report.unreadable)
    assert any(b.name in u for u in report.unreadable)
    assert verify(tmp_path, checksums=False).unreadable == [u for u in report.unreadable if b.name in u]
    with pytest.raises(ValueError, match="run verify"):
        ShardReader(tmp_path).read("k0")
    c.write_bytes(c.read_bytes()[:1024])
    assert any(f"{c.name}: 1024 bytes" in s for s in verify(tmp_path).size_mismatch)


def test_stats_and_repr(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, save_format="npy") as writer:
        writer.write_batch(["a", "b"], batch(2))
        assert "open" in repr(writer)
    stats = writer.stats()
    assert (stats.samples, stats.shards, stats.writes, stats.errors) == (2, 1, 1, 0)
    assert stats.bytes == shards_in(tmp_path)[0].stat().st_size
    assert "2 samples in 1 shards" in str(stats)


def test_is_done_does_not_turn_on_skipping(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, save_format="npy") as writer:
        writer.write("a", torch.zeros(1))
    with ShardWriter(tmp_path, save_format="npy") as writer:
        assert writer.is_done("a")
        writer.write("a", torch.ones(1))  # written again: skip_existing is off
    assert ShardReader(tmp_path).load("a")["npy"].tolist() == [1.0]
    assert writer.stats().skipped == 0


def test_skipped_samples_name_the_shards_that_hold_them(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, save_format="npy") as writer:
        writer.write_batch(["a", "b"], batch(2))
    (first,) = shards_in(tmp_path)
    with ShardWriter(tmp_path, save_format="npy", skip_existing=True) as writer:
        assert writer.write_batch(["a", "b"], batch(2)).result() == [first]
        both = writer.write_batch(["b", "c"], batch(2))
    assert both.result()[0] == first
    assert len(both.result()) == 2


def test_an_unexpected_error_in_the_packer_fails_its_shard_and_close_does_not_hang(
    tmp_path: Path, each_engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tensorsink.shards.packer import Packer

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("packer broke")

    writer = ShardWriter(tmp_path, save_format="npy")
    if each_engine == "native":
        monkeypatch.setattr(writer._packer, "tar_pack", broken)
    else:
        monkeypatch.setattr(Packer, "_append", broken)
    handle = writer.write_batch(["a", "b"], batch(2))
    with pytest.raises(RuntimeError, match="packer broke"):
        writer.close()
    assert isinstance(handle.exception(), RuntimeError)
    assert shards_in(tmp_path) == []
    assert not any(tmp_path.rglob("*.partial"))


def test_writes_from_threads_racing_close_are_written_or_refused(tmp_path: Path) -> None:
    import threading

    writer = ShardWriter(tmp_path, save_format="npy", shard_samples=7)
    handles: list[object] = []
    refused = []

    def produce(offset: int) -> None:
        for i in range(200):
            try:
                handles.append(writer.write(f"t{offset}/{i}", torch.full((3,), float(i))))
            except WriterClosedError:
                refused.append(i)
                return

    threads = [threading.Thread(target=produce, args=(t,)) for t in range(3)]
    for thread in threads:
        thread.start()
    writer.close()
    for thread in threads:
        thread.join()
    assert all(h.result(timeout=10) for h in handles)  # type: ignore[attr-defined]
    assert len(ShardReader(tmp_path)) == len(handles)
    assert verify(tmp_path).ok


def test_the_shard_list_reads_no_samples_and_agrees_with_the_manifest(tmp_path: Path) -> None:
    keys = ['],"bytes":1,"x":"', 'quote"inside', *[f"k{i}" for i in range(20)]]
    with ShardWriter(tmp_path, save_format="npy", shard_samples=6) as writer:
        writer.write_batch(keys, batch(len(keys)))
    light, full = Manifest.load(tmp_path, samples=False), Manifest.load(tmp_path)
    assert light.shards == {}
    assert light.shard_sizes == {path: len(samples) for path, samples in full.shards.items()}
    assert light.damaged == []
    assert full.done(keys[0])
    assert full.done(keys[1])
    listing = json.loads((tmp_path / "shards.json").read_text())["shardlist"]
    assert sorted((s["url"], s["nsamples"]) for s in listing) == sorted(light.shard_sizes.items())
