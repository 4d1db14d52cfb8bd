"""A map_batches predictor's ways to get its outputs onto disk, interleaved rounds.

    python benchmarks/ray_predictor.py --row-kib 256 --rows 1024 --batch-size 32 --compute-ms 20

The predictor stands in for a GPU model: each batch "computes" for `--compute-ms` off the CPU (a
sleep, as a GPU kernel leaves the CPU free), then makes a float32 output of `--row-kib` per row. The
contenders, each run to the end (`take_all`), into a fresh folder, without fsync:

- `helper`: `CommittedBatchWriter` in the actor, two calls at a time per actor
  (`max_concurrent_calls_per_actor=2, enable_true_multi_threading=True`: without the latter Ray Data
  runs a class's calls one at a time whatever the former says): one batch's files are written while
  the next is computed; returns (key, path, bytes) rows.
- `helper, one call at a time`: the same without that overlap.
- `np.save per row`: the UDF calls `np.save` on each row's final path (no temporary) and returns
  (key, path) rows; two calls at a time, like `helper`.
- `Ray writes`: the UDF returns the outputs, `write_numpy` writes them (one file per block), so every
  output goes through Ray's object store.
- `no writes`: the UDF computes and makes its outputs, and returns only the keys: the floor (actor
  start-up, compute, Ray's own work) that the others add their writing to.

The table gives medians, and each contender's time above the floor's.
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
import torch

from tensorsink.ray import CommittedBatchWriter


class _Model:
    """`compute_ms` off the CPU per batch, then an output of `row_bytes` per row (its id, repeated)."""

    def __init__(self, row_bytes: int, compute_ms: float) -> None:
        self.width = row_bytes // 4
        self.compute_s = compute_ms / 1000

    def __call__(self, ids: np.ndarray) -> torch.Tensor:
        time.sleep(self.compute_s)
        out = torch.empty((len(ids), self.width), dtype=torch.float32)
        out.copy_(torch.as_tensor(ids, dtype=torch.float32)[:, None].expand_as(out))
        return out


class _HelperPredictor:
    def __init__(self, root: str, row_bytes: int, compute_ms: float) -> None:
        self.model = _Model(row_bytes, compute_ms)
        self.writer = CommittedBatchWriter(root, save_format="npy", durability="none", manifest=False)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.writer.write(batch["id"], self.model(batch["id"]))


class _NpSavePredictor:
    def __init__(self, root: str, row_bytes: int, compute_ms: float) -> None:
        self.model = _Model(row_bytes, compute_ms)
        self.root = root

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.model(batch["id"]).numpy()
        paths = []
        for key, row in zip(batch["id"].tolist(), outputs, strict=True):
            paths.append(os.path.join(self.root, f"{key}.npy"))
            np.save(paths[-1], row)
        return {"key": batch["id"], "path": np.array(paths, dtype=object)}


class _KeysOnly:
    def __init__(self, root: str, row_bytes: int, compute_ms: float) -> None:
        self.model = _Model(row_bytes, compute_ms)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.model(batch["id"])
        return {"key": batch["id"]}


class _ReturningPredictor:
    def __init__(self, root: str, row_bytes: int, compute_ms: float) -> None:
        self.model = _Model(row_bytes, compute_ms)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"id": batch["id"], "y": self.model(batch["id"]).numpy()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--row-kib", type=int, default=256)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--compute-ms", type=float, default=30.0, help="per batch")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=".", help="folder to write under")
    args = parser.parse_args()

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    row_bytes = args.row_kib << 10
    total = args.rows * row_bytes
    batches = -(-args.rows // args.batch_size)

    def predicted(cls: type, root: str, calls: int) -> Any:
        return ray.data.range(args.rows, override_num_blocks=max(batches // 4, 1)).map_batches(
            cls,
            fn_constructor_args=(root, row_bytes, args.compute_ms),
            batch_size=args.batch_size,
            compute=ray.data.ActorPoolStrategy(
                size=1, max_concurrent_calls_per_actor=calls, enable_true_multi_threading=calls > 1
            ),
        )

    contenders: dict[str, Callable[[str], None]] = {
        "helper": lambda root: predicted(_HelperPredictor, root, 2).take_all() and None,
        "helper, one call at a time": lambda root: predicted(_HelperPredictor, root, 1).take_all() and None,
        "np.save per row": lambda root: predicted(_NpSavePredictor, root, 2).take_all() and None,
        "Ray writes (write_numpy)": lambda root: predicted(_ReturningPredictor, root, 2).write_numpy(
            root, column="y"
        ),
        "no writes": lambda root: predicted(_KeysOnly, root, 2).take_all() and None,
    }
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for round_ in range(args.rounds + 1):  # round 0 warms up: imports, workers
        for name, run in contenders.items():
            root = tempfile.mkdtemp(dir=args.out)
            try:
                began = time.perf_counter()
                run(root)
                if round_:
                    times[name].append(time.perf_counter() - began)
            finally:
                shutil.rmtree(root)
    ray.shutdown()

    print(
        f"# {platform.node()}, {os.cpu_count()} CPUs, ray {ray.__version__}, "
        f"{datetime.date.today().isoformat()}, out={os.path.abspath(args.out)}; {args.rows} rows of "
        f"{args.row_kib} KiB in batches of {args.batch_size}, {args.compute_ms:g} ms compute a batch, "
        f"one actor, medians of {args.rounds} rounds"
    )
    print("| predictor | s | rows/s | GB/s | time / helper's | s above the floor |")
    print("|---|---|---|---|---|---|")
    helper = statistics.median(times["helper"])
    floor = statistics.median(times["no writes"])
    for name, seconds in times.items():
        median = statistics.median(seconds)
        print(
            f"| {name} | {median:.2f} | {args.rows / median:,.0f} | {total / median / 1e9:.2f} | "
            f"{median / helper:.2f}x | {median - floor:+.2f} |"
        )
    compute_s = batches * args.compute_ms / 1000
    print(f"# compute alone: {batches} batches x {args.compute_ms:g} ms = {compute_s:.2f} s")


if __name__ == "__main__":
    main()
