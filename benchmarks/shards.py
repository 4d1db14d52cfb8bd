"""Shards against the alternatives, interleaved in one run: the goals of benchmarks/README.md's shard table.

- small: N x 1 KiB samples (float32, 256 each) by write_batch of 256, durability file: ShardWriter's
  samples/s against AsyncWriter's file per sample (run on fewer samples: the rate is compared);
  durability none: against webdataset.ShardWriter as its documentation uses it (a dict per sample);
  the caller's time per sample inside write_batch; the journal's bytes per sample beyond the key.
- large: 64 KiB samples, durability file: ShardWriter's bytes/s against a bare sequential write of
  the same bytes into one file (64 KiB writes, one fsync at the end).

python benchmarks/shards.py --target /tmp --rounds 3
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from tensorsink import AsyncWriter, ShardWriter

BATCH = 256


def _in_fresh_folder(target: Path, run: Callable[[Path], dict[str, float]]) -> dict[str, float]:
    root = Path(tempfile.mkdtemp(prefix="shards-bench-", dir=target))
    try:
        return run(root)
    finally:
        shutil.rmtree(root)


def shard_writer(data: torch.Tensor, keys: list[str], durability: str) -> Callable[[Path], dict[str, float]]:
    def run(root: Path) -> dict[str, float]:
        caller = 0.0
        start = time.perf_counter()
        with ShardWriter(root, save_format="npy", durability=durability) as writer:
            for i in range(0, len(keys), BATCH):
                began = time.perf_counter()
                writer.write_batch(keys[i : i + BATCH], data[i : min(i + BATCH, len(keys))])
                caller += time.perf_counter() - began
        seconds = time.perf_counter() - start
        journal = sum(p.stat().st_size for p in (root / ".tensorsink").glob("journal-*.jsonl"))
        beyond_key = (journal - sum(map(len, keys))) / len(keys)
        return {"seconds": seconds, "caller_us": caller / len(keys) * 1e6, "journal_beyond_key": beyond_key}

    return run


def async_writer(data: torch.Tensor, keys: list[str], durability: str) -> Callable[[Path], dict[str, float]]:
    def run(root: Path) -> dict[str, float]:
        start = time.perf_counter()
        with AsyncWriter(root, "npy", durability=durability) as writer:
            for i in range(0, len(keys), BATCH):
                writer.write_batch(keys[i : i + BATCH], data[i : min(i + BATCH, len(keys))])
        return {"seconds": time.perf_counter() - start}

    return run


def webdataset_writer(data: torch.Tensor, keys: list[str]) -> Callable[[Path], dict[str, float]]:
    import webdataset as wds

    def run(root: Path) -> dict[str, float]:
        start = time.perf_counter()
        with wds.ShardWriter(f"{root}/shard-%06d.tar", maxcount=1_000_000, maxsize=3e9, verbose=0) as sink:
            for i in range(0, len(keys), BATCH):
                batch = data[i : i + BATCH].numpy()  # what a loop over a model's outputs has in hand
                for key, sample in zip(keys[i : i + BATCH], batch, strict=True):
                    sink.write({"__key__": key, "npy": sample})
        return {"seconds": time.perf_counter() - start}

    return run


def bare_write(data: torch.Tensor) -> Callable[[Path], dict[str, float]]:
    view = memoryview(data.numpy()).cast("B")
    step = data[0].numel() * data.element_size()

    def run(root: Path) -> dict[str, float]:
        start = time.perf_counter()
        fd = os.open(root / "bare.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for offset in range(0, len(view), step):
                os.write(fd, view[offset : offset + step])
            os.fsync(fd)
        finally:
            os.close(fd)
        return {"seconds": time.perf_counter() - start}

    return run


def interleaved(
    target: Path, contenders: dict[str, Callable[[Path], dict[str, float]]], rounds: int
) -> dict[str, list[dict[str, float]]]:
    """Every contender once per round, the order rotated each round; a first, untimed warm-up round."""
    results: dict[str, list[dict[str, float]]] = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(rounds + 1):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            figures = _in_fresh_folder(target, contenders[name])
            if r:
                results[name].append(figures)
    return results


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", type=Path, default=Path("/tmp"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--count", type=int, default=100_000, help="1 KiB samples")
    parser.add_argument("--per-file-count", type=int, default=10_000, help="AsyncWriter's samples")
    parser.add_argument("--large-count", type=int, default=4_096, help="64 KiB samples")
    args = parser.parse_args()
    small = torch.randn(args.count, 256)
    keys = [f"emb/{i:08d}" for i in range(args.count)]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"{args.target}: median (min-max) of {args.rounds} interleaved rounds, samples/s unless said")

    runs = interleaved(
        args.target,
        {
            "ShardWriter file": shard_writer(small, keys, "file"),
            "AsyncWriter file": async_writer(small, keys[: args.per_file_count], "file"),
            "ShardWriter none": shard_writer(small, keys, "none"),
            "webdataset none": webdataset_writer(small, keys),
        },
        args.rounds,
    )
    counts = {"AsyncWriter file": args.per_file_count}
    rates = {
        name: [counts.get(name, args.count) / figures["seconds"] for figures in runs[name]] for name in runs
    }
    for name, values in rates.items():
        print(f"  {name:<18} {spread(values)}")
    for a, b in (("ShardWriter file", "AsyncWriter file"), ("ShardWriter none", "webdataset none")):
        ratios = [x / y for x, y in zip(rates[a], rates[b], strict=True)]
        print(f"  {a} / {b}: x{statistics.median(ratios):.1f} ({min(ratios):.1f}-{max(ratios):.1f})")
    caller = [f["caller_us"] for name in ("ShardWriter file", "ShardWriter none") for f in runs[name]]
    print(
        f"  caller's time in write_batch: {statistics.median(caller):.2f} us/sample (max {max(caller):.2f})"
    )
    journal = runs["ShardWriter none"][0]["journal_beyond_key"]
    print(f"  journal: {journal:.1f} bytes per sample beyond its key")
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024
    print(f"  peak RSS grew {grown:,.0f} MiB over the input's {small.nbytes / 2**20:,.0f} MiB")

    large = torch.randn(args.large_count, 16 << 10)  # 64 KiB samples
    large_keys = [f"field/{i:06d}" for i in range(args.large_count)]
    runs = interleaved(
        args.target,
        {"ShardWriter file": shard_writer(large, large_keys, "file"), "bare write": bare_write(large)},
        args.rounds,
    )
    gb = {name: [large.nbytes / f["seconds"] / 1e9 for f in runs[name]] for name in runs}
    ratios = [x / y for x, y in zip(gb["ShardWriter file"], gb["bare write"], strict=True)]
    print(f"  64 KiB samples: ShardWriter {np.median(gb['ShardWriter file']):.2f} GB/s, bare write "
          f"{np.median(gb['bare write']):.2f} GB/s, ratio x{statistics.median(ratios):.2f} "
          f"({min(ratios):.2f}-{max(ratios):.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
