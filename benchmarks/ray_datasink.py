"""TensorDatasink against Dataset.write_numpy on the same materialized dataset, interleaved rounds.

    python benchmarks/ray_datasink.py --rows-kib 16 256 1024 --total-mib 128 --rounds 3

Each round writes the dataset once with each contender into a fresh folder (removed afterwards) and
times the whole `write_*` call; the table gives medians. Both write without fsync (tensorsink with
durability="none"): write_numpy never fsyncs. `--manifest` also journals and checksums every file.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import ray

from tensorsink.ray import TensorDatasink


def _dataset(row_bytes: int, rows: int, blocks: int) -> Any:
    width = row_bytes // 4

    def make(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = batch["id"]
        return {"id": ids, "x": np.random.default_rng(int(ids[0])).random((len(ids), width), np.float32)}

    return ray.data.range(rows, override_num_blocks=blocks).map_batches(make).materialize()


def _timed(run: Callable[[str], None], parent: str) -> float:
    root = tempfile.mkdtemp(dir=parent)
    try:
        began = time.perf_counter()
        run(root)
        return time.perf_counter() - began
    finally:
        shutil.rmtree(root)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows-kib", type=int, nargs="+", default=[16, 256, 1024])
    parser.add_argument("--total-mib", type=int, default=128, help="dataset size per row size")
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--manifest", action="store_true", help="TensorDatasink journals and checksums")
    parser.add_argument("--out", default=".", help="folder to write under")
    args = parser.parse_args()

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    print(
        f"# {platform.node()}, {os.cpu_count()} CPUs, ray {ray.__version__}, "
        f"{datetime.date.today().isoformat()}, out={os.path.abspath(args.out)}, manifest={args.manifest}"
    )
    print("| row | rows | write_numpy GB/s | TensorDatasink GB/s | rows/s (numpy / tensorsink) | ratio |")
    print("|---|---|---|---|---|---|")
    for kib in args.rows_kib:
        row_bytes = kib << 10
        rows = max((args.total_mib << 20) // row_bytes, args.blocks)
        ds = _dataset(row_bytes, rows, args.blocks)
        total = rows * row_bytes

        def numpy_write(root: str, ds: Any = ds) -> None:
            ds.write_numpy(root, column="x")

        def sink_write(root: str, ds: Any = ds) -> None:
            ds.write_datasink(
                TensorDatasink(
                    root, key_column="id", columns=["x"], save_format="npy", durability="none",
                    manifest=args.manifest,
                )
            )  # fmt: skip

        times: dict[str, list[float]] = {"numpy": [], "sink": []}
        _timed(numpy_write, args.out)  # warm-up: workers started, code imported
        _timed(sink_write, args.out)
        for _ in range(args.rounds):
            times["numpy"].append(_timed(numpy_write, args.out))
            times["sink"].append(_timed(sink_write, args.out))
        numpy_s, sink_s = statistics.median(times["numpy"]), statistics.median(times["sink"])
        print(
            f"| {kib} KiB | {rows:,} | {total / numpy_s / 1e9:.2f} | {total / sink_s / 1e9:.2f} | "
            f"{rows / numpy_s:,.0f} / {rows / sink_s:,.0f} | {numpy_s / sink_s:.2f}x |",
            flush=True,
        )
        del ds
    ray.shutdown()


if __name__ == "__main__":
    main()
