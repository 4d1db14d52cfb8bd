"""Throughput of tensorsink on the CPU path against the machine's ceiling and two common designs.

Contenders run interleaved, round after round, each into a fresh directory; the table gives medians
and ratios. Durability is NONE for all but the rows named FILE and FULL.

    python benchmarks/throughput.py                      # /tmp (disk) and /dev/shm (memory)
    python benchmarks/throughput.py --rounds 7 --json out.json
    python benchmarks/throughput.py --targets /dev/shm --workloads small
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
import torch

from tensorsink import AsyncWriter, Durability, SaveFormat

Contender = Callable[[Path, list[torch.Tensor]], None]


def bare_loop(root: Path, tensors: list[torch.Tensor], indices: range | None = None) -> None:
    """The ceiling: open, write, close, rename of the same bytes, nothing else."""
    for i in indices if indices is not None else range(len(tensors)):
        data = memoryview(tensors[i].numpy()).cast("B")
        temporary, final = root / f".{i}.tmp", root / f"{i}.npy"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = data
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(temporary, final)


def bare_loop_per_core(root: Path, tensors: list[torch.Tensor]) -> None:
    cores = os.cpu_count() or 1
    threads = [
        threading.Thread(target=bare_loop, args=(root, tensors, range(c, len(tensors), cores)))
        for c in range(cores)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def tensorsink(durability: Durability, save_format: SaveFormat = SaveFormat.NUMPY_NPY) -> Contender:
    def run(root: Path, tensors: list[torch.Tensor]) -> None:
        with AsyncWriter(root, save_format, durability=durability) as writer:
            for i, tensor in enumerate(tensors):
                writer.write(str(i), tensor)

    return run


def thread_pool_peer(root: Path, tensors: list[torch.Tensor]) -> None:
    """ThreadPoolExecutor(4) + np.save to a temporary + os.replace; <= 256 futures, small items inline."""

    def save(i: int, array: np.ndarray) -> None:
        temporary = root / f".{i}.tmp.npy"
        np.save(temporary, array)
        os.replace(temporary, root / f"{i}.npy")

    pending: set[Future[None]] = set()
    with ThreadPoolExecutor(4) as pool:
        for i, tensor in enumerate(tensors):
            array = tensor.numpy()
            if array.nbytes < 64_000:
                save(i, array)
                continue
            if len(pending) >= 256:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    f.result()
            pending.add(pool.submit(save, i, array))
        for f in pending:
            f.result()


def torch_save_peer(root: Path, tensors: list[torch.Tensor]) -> None:
    """What most inference loops do: torch.save per sample, on the caller's thread."""
    for i, tensor in enumerate(tensors):
        torch.save(tensor, root / f"{i}.pt")


def write_call_latency(root: Path, count: int = 64, nbytes: int = 4 << 20) -> float:
    """Median seconds one write() call takes for a CPU tensor when no backpressure applies."""
    tensors = [torch.rand(nbytes // 4) for _ in range(count)]
    times = []
    with AsyncWriter(
        root, SaveFormat.NUMPY_NPY, durability=Durability.NONE, max_inflight_bytes=1 << 40
    ) as writer:
        for i, tensor in enumerate(tensors):
            start = time.perf_counter()
            writer.write(str(i), tensor)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(
    target: Path, contenders: dict[str, Contender], tensors: list[torch.Tensor], rounds: int
) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate who goes first
            root = Path(tempfile.mkdtemp(prefix="tsbench-", dir=target))
            try:
                start = time.perf_counter()
                contenders[name](root, tensors)
                times[name].append(time.perf_counter() - start)
            finally:
                shutil.rmtree(root)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--targets", nargs="+", default=["/tmp", "/dev/shm"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workloads", nargs="+", choices=["large", "small"], default=["large", "small"])
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    workloads: dict[str, list[torch.Tensor]] = {}
    if "large" in args.workloads:
        workloads["12 x 64 MiB"] = [torch.rand(16 << 20) for _ in range(12)]
    if "small" in args.workloads:
        workloads["6000 x 16 KiB"] = [torch.rand(4 << 10) for _ in range(6000)]
    contenders: dict[str, Contender] = {
        "ceiling: bare loop, 1 thread": bare_loop,
        f"ceiling: bare loop, {os.cpu_count()} threads": bare_loop_per_core,
        "tensorsink npy": tensorsink(Durability.NONE),
        "tensorsink safetensors": tensorsink(Durability.NONE, SaveFormat.SAFETENSORS),
        "tensorsink npz": tensorsink(Durability.NONE, SaveFormat.NUMPY_NPZ),
        "tensorsink pt": tensorsink(Durability.NONE, SaveFormat.PYTORCH_PT),
        "peer: thread pool + np.save": thread_pool_peer,
        "peer: torch.save per sample": torch_save_peer,
        "tensorsink npy, FILE": tensorsink(Durability.FILE),
        "tensorsink npy, FULL": tensorsink(Durability.FULL),
    }
    results: dict[str, object] = {
        "machine": f"{os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
        "rounds": args.rounds,
        "runs": [],
    }
    runs: list[dict[str, object]] = results["runs"]  # type: ignore[assignment]
    for target in map(Path, args.targets):
        for workload, tensors in workloads.items():
            total = sum(t.numel() * t.element_size() for t in tensors)
            chosen = dict(contenders)
            if str(target).startswith("/dev/shm"):  # fsync is free in memory: those rows say nothing there
                chosen = {k: v for k, v in chosen.items() if "FILE" not in k and "FULL" not in k}
            times = measure(target, chosen, tensors, args.rounds)
            ceiling = min(statistics.median(times[k]) for k in times if k.startswith("ceiling"))
            print(f"\n{target} | {workload} | {total / 2**20:,.0f} MiB | median of {args.rounds}")
            print(f"{'contender':<34} {'MiB/s':>9} {'files/s':>9} {'x ceiling':>10}")
            for name, samples in times.items():
                median = statistics.median(samples)
                mib_s = total / 2**20 / median
                print(f"{name:<34} {mib_s:>9,.0f} {len(tensors) / median:>9,.0f} {ceiling / median:>10.2f}")
                runs.append({"target": str(target), "workload": workload, "contender": name,
                             "seconds": samples, "x_ceiling": ceiling / median})  # fmt: skip
    latency_root = Path(
        tempfile.mkdtemp(prefix="tsbench-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None)
    )
    try:
        latencies = [write_call_latency(latency_root / str(r)) for r in range(3)]
    finally:
        shutil.rmtree(latency_root)
    latency_us = statistics.median(latencies) * 1e6
    results["write_call_median_us_4MiB"] = latency_us
    print(f"\nmedian write() call, 4 MiB CPU tensor, no backpressure: {latency_us:.1f} us")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
