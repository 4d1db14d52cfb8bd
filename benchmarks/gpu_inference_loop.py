"""A GPU inference loop with and without writing its outputs: what writing costs the producer.

Each step runs a chain of bf16 matmuls and emits an output of `--output-mib` MiB. Contenders, interleaved
round after round (medians):
  (a) no writing; (b) tensorsink; (c) .cpu() + torch.save on the caller;
  (d) the thread-pool peer: the caller does .cpu(), a ThreadPoolExecutor(4) runs torch.save.
Also: the pinned cudaMemcpy device-to-host peak on this GPU, tensorsink's end-to-end rate with no compute
into tmpfs (a lower bound of its device-to-host rate), and how full the pinned pool ran.

    python benchmarks/gpu_inference_loop.py --out /tmp/gpu-bench --json gpu-bench.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

import torch

from tensorsink import AsyncWriter, SaveFormat


def make_model(width: int, depth: int) -> list[torch.Tensor]:
    return [torch.randn(width, width, device="cuda", dtype=torch.bfloat16) / width**0.5 for _ in range(depth)]


def step(x: torch.Tensor, weights: list[torch.Tensor], rows: int) -> torch.Tensor:
    for w in weights:
        x = torch.tanh(x @ w)
    return x[:rows].float()


def pinned_peak(nbytes: int, repeats: int = 20) -> float:
    """GB/s of a plain device-to-host copy into pinned memory."""
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    host.copy_(device, non_blocking=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        host.copy_(device, non_blocking=True)
    end.record()
    end.synchronize()
    return nbytes * repeats / (start.elapsed_time(end) / 1e3) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("/tmp/tensorsink-gpu-bench"))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--width", type=int, default=8192)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--output-mib", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    weights = make_model(args.width, args.depth)
    rows = args.output_mib * 2**20 // (args.width * 4)
    x = torch.randn(args.width, args.width, device="cuda", dtype=torch.bfloat16)
    output_bytes = rows * args.width * 4
    pool_peaks: list[float] = []

    def none(root: Path) -> None:
        for _ in range(args.steps):
            step(x, weights, rows)
        torch.cuda.synchronize()

    def tensorsink(root: Path) -> None:
        with AsyncWriter(root, SaveFormat.SAFETENSORS, durability="none") as writer:
            for i in range(args.steps):
                writer.write(f"step_{i:05d}", step(x, weights, rows))
            torch.cuda.synchronize()
        stats = writer.stats()
        pool_peaks.append(stats.pinned_peak_bytes / max(1, stats.pinned_pool_bytes))

    def cpu_then_save(root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        for i in range(args.steps):
            torch.save(step(x, weights, rows).cpu(), root / f"step_{i:05d}.pt")

    def thread_pool(root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        pending: set[Future[None]] = set()
        with ThreadPoolExecutor(4) as pool:
            for i in range(args.steps):
                host = step(x, weights, rows).cpu()
                if len(pending) >= 256:
                    _, pending = wait(pending, return_when=FIRST_COMPLETED)
                pending.add(pool.submit(torch.save, host, root / f"step_{i:05d}.pt"))
        for f in pending:
            f.result()

    contenders: dict[str, Callable[[Path], None]] = {
        "(a) no writing": none,
        "(b) tensorsink": tensorsink,
        "(c) .cpu() + torch.save": cpu_then_save,
        "(d) thread-pool peer": thread_pool,
    }
    none(args.out)  # warm up kernels and the allocator
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for r in range(args.rounds):
        names = list(contenders)
        for name in names[r % len(names) :] + names[: r % len(names)]:
            root = args.out / name.split()[0].strip("()")
            shutil.rmtree(root, ignore_errors=True)
            start = time.perf_counter()
            contenders[name](root)
            times[name].append(time.perf_counter() - start)
            shutil.rmtree(root, ignore_errors=True)

    baseline = statistics.median(times["(a) no writing"])
    peak = pinned_peak(output_bytes)
    end_to_end = []
    for _ in range(3):
        root = Path("/dev/shm/tensorsink-gpu-bench")
        shutil.rmtree(root, ignore_errors=True)
        outputs = [torch.randn(output_bytes // 4, device="cuda") for _ in range(16)]
        torch.cuda.synchronize()
        start = time.perf_counter()
        with AsyncWriter(root, SaveFormat.NUMPY_NPY, durability="none") as writer:
            for i in range(args.steps):
                writer.write(f"o{i}", outputs[i % len(outputs)])
        end_to_end.append(output_bytes * args.steps / (time.perf_counter() - start) / 1e9)
        shutil.rmtree(root, ignore_errors=True)

    result = {
        "device": torch.cuda.get_device_name(),
        "output_mib": output_bytes / 2**20,
        "steps": args.steps,
        "steps_per_s": {name: args.steps / statistics.median(t) for name, t in times.items()},
        "slowdown_vs_no_writing": {name: statistics.median(t) / baseline - 1 for name, t in times.items()},
        "pinned_memcpy_peak_gb_s": peak,
        "tensorsink_end_to_end_gb_s_tmpfs": statistics.median(end_to_end),
        "pool_peak_fraction": max(pool_peaks) if pool_peaks else 0.0,
    }
    for name in contenders:
        print(
            f"{name:<26} {result['steps_per_s'][name]:8.2f} steps/s  "  # type: ignore[index]
            f"{100 * result['slowdown_vs_no_writing'][name]:+6.1f}% vs (a)"  # type: ignore[index]
        )
    rate = result["tensorsink_end_to_end_gb_s_tmpfs"]
    print(f"pinned D2H peak {peak:.1f} GB/s; tensorsink end to end {rate:.1f} GB/s")
    print(f"pinned pool peak: {100 * result['pool_peak_fraction']:.0f}% of the pool")  # type: ignore[operator]
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
