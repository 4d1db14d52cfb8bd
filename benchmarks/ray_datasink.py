"""TensorDatasink against Dataset.write_numpy on the same dataset, interleaved rounds.

    python benchmarks/ray_datasink.py --rows-kib 16 256 1024 --total-mib 128 --rounds 5

Each round writes the dataset once with each contender into a fresh folder (removed afterwards) and
times the whole `write_*` call; the table gives medians. Both write without fsync (tensorsink with
durability="none"): write_numpy never fsyncs. `--manifest` also journals and checksums every file.

The contenders: `write_numpy` (one file per block, written in place); `TensorDatasink` (one atomic
file per row) as it comes (64 MiB write tasks), and with `min_bytes_per_write=None` (one task per
block, fused with the map); and a minimal Datasink doing `np.save` to a temporary and `os.rename`
per row (one task per block), the cost of a file per row on this disk whoever writes it.
`--source materialized` writes a dataset already in the object store; `streamed` writes the map's
output as it is made (what an inference job does).
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
from ray.data import Datasink
from ray.data.block import BlockAccessor

from tensorsink.ray import TensorDatasink


class _RenamePerRow(Datasink[None]):
    """The floor for a file per row: np.save to a temporary, rename, nothing else."""

    def __init__(self, path: str) -> None:
        self.path = path

    def write(self, blocks: Any, ctx: Any) -> None:
        for block in blocks:
            batch = BlockAccessor.for_block(block).to_batch_format("numpy")
            for key, row in zip(batch["id"].tolist(), batch["x"], strict=True):
                final = os.path.join(self.path, f"{key}.npy")
                np.save(final + ".tmp.npy", row)
                os.rename(final + ".tmp.npy", final)


def _dataset(row_bytes: int, rows: int, blocks: int) -> Any:
    width = row_bytes // 4

    def make(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = batch["id"]
        return {"id": ids, "x": np.random.default_rng(int(ids[0])).random((len(ids), width), np.float32)}

    return ray.data.range(rows, override_num_blocks=blocks).map_batches(make)


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
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--source", choices=["materialized", "streamed"], default="materialized")
    parser.add_argument("--manifest", action="store_true", help="TensorDatasink journals and checksums")
    parser.add_argument("--out", default=".", help="folder to write under")
    args = parser.parse_args()

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    print(
        f"# {platform.node()}, {os.cpu_count()} CPUs, ray {ray.__version__}, "
        f"{datetime.date.today().isoformat()}, out={os.path.abspath(args.out)}, manifest={args.manifest}, "
        f"source={args.source}, {args.blocks} blocks, medians of {args.rounds} rounds"
    )
    print(
        "| row | rows | write_numpy GB/s | TensorDatasink GB/s (ratio) | one task per block GB/s (ratio) "
        "| np.save + rename per row GB/s (ratio) | rows/s (numpy / tensorsink) |"
    )
    print("|---|---|---|---|---|---|---|")
    for kib in args.rows_kib:
        row_bytes = kib << 10
        rows = max((args.total_mib << 20) // row_bytes, args.blocks)
        lazy = _dataset(row_bytes, rows, args.blocks)
        stored = lazy.materialize() if args.source == "materialized" else None
        total = rows * row_bytes

        def source(stored: Any = stored, lazy: Any = lazy) -> Any:
            return stored if stored is not None else lazy

        def sink(root: str, **options: Any) -> TensorDatasink:
            return TensorDatasink(
                root, key_column="id", columns=["x"], save_format="npy", durability="none",
                manifest=args.manifest, **options,
            )  # fmt: skip

        contenders: dict[str, Callable[[str], None]] = {
            "numpy": lambda root: source().write_numpy(root, column="x"),
            "sink": lambda root: source().write_datasink(sink(root)),
            "per_block": lambda root: source().write_datasink(sink(root, min_bytes_per_write=None)),
            "floor": lambda root: source().write_datasink(_RenamePerRow(root)),
        }
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for run in contenders.values():
            _timed(run, args.out)  # warm-up: workers started, code imported
        for _ in range(args.rounds):
            for name, run in contenders.items():
                times[name].append(_timed(run, args.out))
        median = {name: statistics.median(seconds) for name, seconds in times.items()}

        def rate(name: str, median: dict[str, float] = median, total: int = total) -> str:
            ratio = f" ({median['numpy'] / median[name]:.2f}x)" if name != "numpy" else ""
            return f"{total / median[name] / 1e9:.2f}{ratio}"

        print(
            f"| {kib} KiB | {rows:,} | {rate('numpy')} | {rate('sink')} | {rate('per_block')} | "
            f"{rate('floor')} | {rows / median['numpy']:,.0f} / {rows / median['sink']:,.0f} |",
            flush=True,
        )
        del stored, lazy
    ray.shutdown()


if __name__ == "__main__":
    main()
