"""A shard writer killed with SIGKILL leaves only whole shards under final names, verify passes once its
temporaries are swept, and a resumed run writes every key exactly once into the shard list."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tarfile
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tensorsink import sweep
from tensorsink.commit import is_temporary
from tensorsink.manifest import verify
from tensorsink.shards import ShardReader

pytestmark = [pytest.mark.usefixtures("each_engine"), pytest.mark.slow]

KEYS = 12_000

# Writes keys 0..KEYS-1 in batches of varied sizes, then keeps rewriting nothing: killed mid-way.
CHILD = textwrap.dedent(
    """
    import sys, torch
    from tensorsink.shards import ShardWriter
    root, resume, count = sys.argv[1], sys.argv[2] == "resume", int(sys.argv[3])

    def rows(start, stop):
        return torch.arange(start * 64, stop * 64, dtype=torch.float32).reshape(stop - start, 64)

    with ShardWriter(root, save_format="npy", shard_samples=97, durability="file",
                     skip_existing=resume) as writer:
        i = 0
        while i < count:
            step = 1 + (i * 7919) % 61
            stop = min(i + step, count)
            writer.write_batch([f"s/{k:05d}" for k in range(i, stop)], rows(i, stop))
            if i == 0:
                writer.flush()
                print("ready", flush=True)
            i = stop
    print("done", flush=True)
    """
)


def _run_and_kill(root: Path, seconds: float) -> None:
    """Start the child, and kill it `seconds` after its first shard is committed."""
    with subprocess.Popen(
        [sys.executable, "-c", CHILD, str(root), "first", str(KEYS)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as child:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        try:
            child.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            child.kill()
        assert child.wait() == -9, "the child finished before it was killed: give it more to write"


@pytest.mark.parametrize("round_", range(4))
def test_killed_mid_shard_then_resumed_writes_each_key_once(tmp_path: Path, round_: int) -> None:
    rng = random.Random(round_)
    _run_and_kill(tmp_path, rng.uniform(0.02, 0.6))
    for shard in tmp_path.rglob("*.tar"):
        if not is_temporary(shard.name):
            with tarfile.open(shard) as tar:  # whole: every member and the end marker are there
                assert all(member.isfile() for member in tar.getmembers())
    sweep(tmp_path)
    assert verify(tmp_path).ok, verify(tmp_path)
    resumed = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path), "resume", str(KEYS)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert verify(tmp_path).ok
    listing = json.loads((tmp_path / "shards.json").read_text())["shardlist"]
    keys: Counter[str] = Counter()
    for shard in listing:
        with tarfile.open(tmp_path / shard["url"]) as tar:
            names = tar.getnames()
        assert len(names) == shard["nsamples"]
        keys.update(name.removesuffix(".npy") for name in names)
    assert set(keys) == {f"s/{k:05d}" for k in range(KEYS)}
    assert max(keys.values()) == 1
    reader = ShardReader(tmp_path)
    for k in (0, rng.randrange(KEYS), KEYS - 1):
        assert np.array_equal(
            reader.load(f"s/{k:05d}")["npy"], np.arange(k * 64, k * 64 + 64, dtype=np.float32)
        )


# A shard that outgrows the file size limit mid-batch: writev fails with EFBIG in the packer.
TOO_BIG = textwrap.dedent(
    """
    import errno, os, resource, signal, sys, torch
    from tensorsink.manifest import Manifest, verify
    from tensorsink.shards import ShardWriter
    root = sys.argv[1]
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
    writer = ShardWriter(root, save_format="npy", shard_samples=40)
    fits = writer.write_batch([f"a{i}" for i in range(40)], torch.zeros(40, 512))  # 40 x 2.6 KB
    fails = writer.write_batch([f"b{i}" for i in range(40)], torch.zeros(40, 2048))  # 40 x 8.7 KB
    try:
        writer.close()
    except OSError as exc:
        assert exc.errno == errno.EFBIG, exc
        assert "'b0', 'b1'" in " ".join(exc.__notes__), exc.__notes__
    else:
        raise AssertionError("close() did not raise the failure")
    assert fits.exception() is None and fails.exception() is not None
    names = sorted(n for n in os.listdir(root) if not n.startswith("."))
    assert len(names) == 1 and names[0].endswith(".tar"), names
    manifest = Manifest.load(root)
    assert manifest.done("a39") and not manifest.done("b0")
    assert verify(root).ok
    print("ok")
    """
)


def test_a_shard_past_the_file_size_limit_fails_its_writes_and_commits_nothing(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", TOO_BIG, str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ok"]
