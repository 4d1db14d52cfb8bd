"""A GPU inference loop with and without writing its outputs: what writing costs the producer.

Each step runs a chain of bf16 matmuls and emits an output of `--output-mib` MiB. Contenders, interleaved
round after round (medians):
  (a) no writing; (b) tensorsink; (c) .cpu() + torch.save on the caller;
  (d) the thread-pool peer: the caller does .cpu(), a ThreadPoolExecutor(4) runs torch.save.

What is timed is the steady state. Before the clock starts, each contender's writer (or thread pool) is
made, tensorsink's backend is decided (`wait_backend`) and its pinned pool allocated, and `--warmup`
steps are written and flushed. The clock stops when the last step's output is computed and its last
`write()` (or submit, or save) has returned. The drain that follows (`close()`, the pool's last saves)
is reported apart, and so is tensorsink's `stats().blocked_seconds` over the timed steps. Files go to
`--out` (put it on the disk you care about, not tmpfs) with `--durability` (default file: the peers
fsync too); after each contender its files are synced and deleted, outside the timing.

Also:
  - the pinned device-to-host copy rate on a dedicated high-priority stream (as tensorsink's copy
    stream is), timed with events recorded on that stream;
  - tensorsink's end-to-end rate into tmpfs (`--tmpfs`) with no compute, its writer made and warmed
    up outside the timing;
  - a run larger than the page cache: `--large-gib` GiB of outputs with durability file, (a), (b)
    and (d). The default (4) fits a small disk and a 10-minute run; to really exceed the page cache
    set it above the host's memory (MemTotal is in the JSON), with that much free disk under --out.

    python benchmarks/gpu_inference_loop.py --out /scratch/gpu-bench --json gpu-inference-loop.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tensorsink import AsyncWriter, SaveFormat


def make_model(width: int, depth: int) -> list[torch.Tensor]:
    return [torch.randn(width, width, device="cuda", dtype=torch.bfloat16) / width**0.5 for _ in range(depth)]


def step(x: torch.Tensor, weights: list[torch.Tensor], rows: int) -> torch.Tensor:
    for w in weights:
        x = torch.tanh(x @ w)
    return x[:rows].float()


def save_pt(tensor: torch.Tensor, path: Path, durability: str) -> None:
    """torch.save with the fsyncs `durability` asks of tensorsink (the peers' equivalent)."""
    with open(path, "wb") as file:
        torch.save(tensor, file)
        if durability != "none":
            file.flush()
            os.fsync(file.fileno())
    if durability == "full":
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def pinned_d2h_gb_s(nbytes: int, repeats: int = 20) -> float:
    """GB/s of device-to-host copies into pinned memory on a high-priority side stream, timed with
    events on that stream."""
    device = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda")
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    stream = torch.cuda.Stream(priority=-1)
    stream.wait_stream(torch.cuda.current_stream())
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(stream):
        host.copy_(device, non_blocking=True)  # first touch, outside the timing
        start.record(stream)
        for _ in range(repeats):
            host.copy_(device, non_blocking=True)
        end.record(stream)
    end.synchronize()
    return nbytes * repeats / (start.elapsed_time(end) / 1e3) / 1e9


def meminfo() -> dict[str, int]:
    found = {}
    try:
        with open("/proc/meminfo") as lines:
            for line in lines:
                name, _, rest = line.partition(":")
                if name in ("MemTotal", "MemAvailable", "Cached"):
                    found[name.lower() + "_bytes"] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return found


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))] if ordered else 0.0


@dataclass
class Run:
    """One contender's timed steps in one round."""

    seconds: float
    drain_seconds: float
    calls: list[float]
    blocked_seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Loop:
    """The producer: `steps` steps, each output handed to `emit`, timed up to the last emit."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.weights = make_model(args.width, args.depth)
        self.rows = min(args.width, max(1, args.output_mib * 2**20 // (args.width * 4)))
        self.x = torch.randn(args.width, args.width, device="cuda", dtype=torch.bfloat16)
        self.output_bytes = self.rows * args.width * 4

    def warm(self) -> None:
        for _ in range(3):
            step(self.x, self.weights, self.rows)
        torch.cuda.synchronize()

    def run(
        self, steps: int, first: int, emit: Callable[[int, torch.Tensor], None]
    ) -> tuple[float, list[float]]:
        calls = []
        torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(first, first + steps):
            output = step(self.x, self.weights, self.rows)
            began = time.perf_counter()
            emit(i, output)
            calls.append(time.perf_counter() - began)
        computed = torch.cuda.Event(blocking=True)  # on the producer's stream: its last step's output
        computed.record()
        computed.synchronize()
        return time.perf_counter() - start, calls


def contenders(
    loop: Loop, args: argparse.Namespace, durability: str, facts: dict[str, Any]
) -> dict[str, Callable[[Path, int], Run]]:
    warmup = args.warmup

    def none(root: Path, steps: int) -> Run:
        loop.run(warmup, 0, lambda i, out: None)
        seconds, calls = loop.run(steps, warmup, lambda i, out: None)
        return Run(seconds, 0.0, calls)

    def tensorsink(root: Path, steps: int) -> Run:
        writer = AsyncWriter(root, SaveFormat.SAFETENSORS, durability=durability, backend=args.backend)

        def emit(i: int, out: torch.Tensor) -> None:
            writer.write(f"step_{i:05d}", out)

        try:
            facts["tensorsink_backend"] = writer.wait_backend(120)  # the probe, outside the timing
            loop.run(warmup, 0, emit)  # the pool pinned, the copy stream made
            writer.flush()
            before = writer.stats().blocked_seconds
            seconds, calls = loop.run(steps, warmup, emit)
            blocked = writer.stats().blocked_seconds - before
        except BaseException:
            with contextlib.suppress(Exception):
                writer.close()
            raise
        began = time.perf_counter()
        writer.close()
        drain = time.perf_counter() - began
        stats = writer.stats()
        extra = {
            "pool_peak_fraction": stats.pinned_peak_bytes / max(1, stats.pinned_pool_bytes),
            "bytes_by_backend": stats.bytes_by_backend,
        }
        return Run(seconds, drain, calls, blocked, extra)

    def cpu_then_save(root: Path, steps: int) -> Run:
        root.mkdir(parents=True, exist_ok=True)

        def emit(i: int, out: torch.Tensor) -> None:
            save_pt(out.cpu(), root / f"step_{i:05d}.pt", durability)

        loop.run(warmup, 0, emit)
        seconds, calls = loop.run(steps, warmup, emit)
        return Run(seconds, 0.0, calls)

    def thread_pool(root: Path, steps: int) -> Run:
        root.mkdir(parents=True, exist_ok=True)
        pending: set[Future[None]] = set()
        with ThreadPoolExecutor(4) as pool:

            def emit(i: int, out: torch.Tensor) -> None:
                nonlocal pending
                host = out.cpu()
                if len(pending) >= 256:
                    _, pending = wait(pending, return_when=FIRST_COMPLETED)
                pending.add(pool.submit(save_pt, host, root / f"step_{i:05d}.pt", durability))

            loop.run(warmup, 0, emit)
            wait(pending)
            seconds, calls = loop.run(steps, warmup, emit)
            began = time.perf_counter()
            for f in pending:
                f.result()
        return Run(seconds, time.perf_counter() - began, calls)

    return {
        "(a) no writing": none,
        "(b) tensorsink": tensorsink,
        "(c) .cpu() + torch.save": cpu_then_save,
        "(d) thread-pool peer": thread_pool,
    }


def measure(
    loop: Loop,
    chosen: dict[str, Callable[[Path, int], Run]],
    out: Path,
    steps: int,
    rounds: int,
) -> dict[str, Any]:
    """Interleaved rounds of the chosen contenders; medians, and per-call percentiles over all rounds."""
    runs: dict[str, list[Run]] = {name: [] for name in chosen}
    for r in range(rounds):
        names = list(chosen)
        for name in names[r % len(names) :] + names[: r % len(names)]:
            root = out / name.split()[0].strip("()")
            shutil.rmtree(root, ignore_errors=True)
            runs[name].append(chosen[name](root, steps))
            os.sync()  # outside the timing: no write-back left over for the next contender
            shutil.rmtree(root, ignore_errors=True)
    baseline = statistics.median(run.seconds for run in runs["(a) no writing"])
    figures: dict[str, Any] = {}
    for name, done in runs.items():
        seconds = statistics.median(run.seconds for run in done)
        calls = [c for run in done for c in run.calls]
        entry: dict[str, Any] = {
            "step_ms": 1e3 * seconds / steps,
            "steps_per_s": steps / seconds,
            "slowdown_vs_no_writing": seconds / baseline - 1,
            "drain_seconds": statistics.median(run.drain_seconds for run in done),
            "call_p50_us": 1e6 * percentile(calls, 0.50),
            "call_p99_us": 1e6 * percentile(calls, 0.99),
            "seconds_per_round": [run.seconds for run in done],
        }
        blocked = [run.blocked_seconds for run in done if run.blocked_seconds is not None]
        if blocked:
            entry["blocked_seconds"] = statistics.median(blocked)
        if done[-1].extra:
            entry.update(done[-1].extra)
        figures[name] = entry
    return figures


def tmpfs_rate(loop: Loop, args: argparse.Namespace) -> float | None:
    """tensorsink's GB/s into tmpfs with no compute: writes of ready outputs, then flush()."""
    if not args.tmpfs.is_dir():
        return None
    count = min(args.steps, int(shutil.disk_usage(args.tmpfs).free * 0.8) // loop.output_bytes - 1)
    if count < 4:  # a small /dev/shm (containers often have 64 MiB)
        return None
    root = args.tmpfs / "tensorsink-gpu-bench"
    shutil.rmtree(root, ignore_errors=True)
    outputs = [torch.randn(loop.output_bytes // 4, device="cuda") for _ in range(16)]
    rates = []
    with AsyncWriter(root, SaveFormat.NUMPY_NPY, durability="none", backend=args.backend) as writer:
        writer.wait_backend(120)
        writer.write("warm", outputs[0])
        writer.flush()
        for r in range(3):
            torch.cuda.synchronize()
            start = time.perf_counter()
            for i in range(count):
                writer.write(f"r{r}_o{i}", outputs[i % len(outputs)])
            writer.flush()
            rates.append(loop.output_bytes * count / (time.perf_counter() - start) / 1e9)
            for path in root.glob(f"r{r}_o*.npy"):
                path.unlink()
    shutil.rmtree(root, ignore_errors=True)
    return statistics.median(rates)


def print_table(title: str, figures: dict[str, Any]) -> None:
    print(title)
    for name, f in figures.items():
        blocked = f" blocked {f['blocked_seconds']:.3f} s" if "blocked_seconds" in f else ""
        print(
            f"  {name:<26} {f['step_ms']:8.2f} ms/step {100 * f['slowdown_vs_no_writing']:+7.1f}% vs (a)  "
            f"call p50/p99 {f['call_p50_us']:9.0f}/{f['call_p99_us']:9.0f} us  "
            f"drain {f['drain_seconds']:6.2f} s{blocked}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("/tmp/tensorsink-gpu-bench"))
    parser.add_argument("--steps", type=int, default=40, help="timed steps per contender and round")
    parser.add_argument("--warmup", type=int, default=5, help="steps written before the clock starts")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--width", type=int, default=8192)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--output-mib", type=int, default=32)
    parser.add_argument("--durability", default="file", choices=["none", "file", "full"])
    parser.add_argument("--backend", default="auto", choices=["auto", "posix", "kvikio"])
    parser.add_argument(
        "--large-gib",
        type=float,
        default=4.0,
        help="GiB of outputs in the run meant to exceed the page cache (0: skip it); above MemTotal to do so",
    )
    parser.add_argument("--tmpfs", type=Path, default=Path("/dev/shm"))
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    loop = Loop(args)
    loop.warm()
    facts: dict[str, Any] = {}
    every = contenders(loop, args, args.durability, facts)
    main_figures = measure(loop, every, args.out, args.steps, args.rounds)

    peak = pinned_d2h_gb_s(loop.output_bytes)
    tmpfs = tmpfs_rate(loop, args)

    large: dict[str, Any] | None = None
    memory = meminfo()
    if args.large_gib > 0:
        large_steps = max(1, int(args.large_gib * 2**30 // loop.output_bytes))
        total = large_steps * loop.output_bytes
        free = shutil.disk_usage(args.out).free
        if free < 1.2 * total:
            large = {"skipped": f"{free / 2**30:.1f} GiB free under {args.out}, {total / 2**30:.1f} needed"}
        else:
            chosen = {
                name: run
                for name, run in contenders(loop, args, "file", facts).items()
                if not name.startswith("(c)")
            }
            large = {
                "steps": large_steps,
                "bytes": total,
                "exceeds_memory": total > memory.get("memtotal_bytes", total),
                "contenders": measure(loop, chosen, args.out, large_steps, 1),
            }

    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "output_mib": loop.output_bytes / 2**20,
        "steps": args.steps,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "durability": args.durability,
        "out": str(args.out),
        "memory": memory,
        **facts,
        "contenders": main_figures,
        "pinned_d2h_copy_stream_gb_s": peak,
        "tensorsink_end_to_end_gb_s_tmpfs": tmpfs,
        "large": large,
    }
    print(f"{result['device']}, {loop.output_bytes / 2**20:.0f} MiB outputs, durability {args.durability}")
    print_table(
        f"steady state, {args.steps} steps after {args.warmup} warm-up, {args.rounds} rounds:", main_figures
    )
    rate = "not run (no tmpfs, or too small)" if tmpfs is None else f"{tmpfs:.2f} GB/s"
    print(f"pinned D2H on a copy stream {peak:.1f} GB/s; tensorsink end to end into tmpfs: {rate}")
    if large is not None and "contenders" in large:
        print_table(
            f"{large['bytes'] / 2**30:.1f} GiB, durability file (exceeds memory: {large['exceeds_memory']}):",
            large["contenders"],
        )
    elif large is not None:
        print(f"large run skipped: {large['skipped']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
