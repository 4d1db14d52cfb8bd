"""A GPU inference loop with and without writing its outputs: what writing costs the producer.

Each step runs a chain of bf16 matmuls and emits an output of `--output-mib` MiB. Contenders, interleaved
round after round (medians):
  (a) no writing; (b) tensorsink; (c) .cpu() + torch.save on the caller;
  (d) the thread-pool peer: the caller does .cpu(), a ThreadPoolExecutor(4) runs torch.save.

What is timed is the steady state. Before the clock starts, each contender's writer (or thread pool) is
made, tensorsink's backend is decided (`wait_backend`) and its pinned pool allocated, and `--warmup`
steps are written and flushed; garbage is collected between contenders, outside the timing. The clock
stops when the last step's output is computed and its last `write()` (or submit, or save) has
returned. The drain that follows (`close()`, the pool's last saves) is reported apart, and so is
tensorsink's `stats().blocked_seconds` over the timed steps. tensorsink's pool is `--pool-mib` (128
by default): a few outputs, so that the timed steps run at the rate the writes are carried away, not
into an idle pool whose cost would all land in the drain; `outputs_per_s_with_drain` (steps over time
plus drain) is the rate that counts either way. Files go to `--out` (put it on the disk you care about,
not tmpfs) with `--durability` (default file: the peers fsync too); after each contender its files are
synced and deleted, outside the timing.

Also:
  - device-to-host copy rates into the pinned pool's own memory (a tensorsink PinnedPool: anonymous
    memory registered with cudaHostRegister), not cudaHostAlloc memory: the peak (plain copies on a
    high-priority side stream, timed with events and from the host), tensorsink's copy engine into
    the same pool blocks (host-timed the same way), and write() -> staged through a writer; the ratio
    of tensorsink's rate to the peak (goal: at least 0.85). cudaHostAlloc memory's peak is reported
    beside it for comparison;
  - tensorsink's end-to-end rate into tmpfs (`--tmpfs`, durability none, no compute): the copy, the
    encoding, the CRC-32 and the write together, not a device-to-host rate;
  - a run larger than the page cache: `--large-gib` GiB of outputs with durability file, (a), (b)
    and (d). The default (4) fits a small disk and a 10-minute run; to really exceed the page cache
    set it above the host's memory (MemTotal is in the JSON), with that much free disk under --out.

The JSON (`--json`) is rewritten after each contender's round and each measurement, so a run stopped
part-way keeps what it measured ("done" lists the parts that finished).

    python benchmarks/gpu_inference_loop.py --out /scratch/gpu-bench --json gpu-inference-loop.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
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

from json_file import write_whole
from tensorsink import AsyncWriter, SaveFormat
from tensorsink.staging import CudaEngine, PinnedPool


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


class Results:
    """The JSON, rewritten whole at each update (a run stopped part-way keeps what it measured)."""

    def __init__(self, path: Path | None, data: dict[str, Any]) -> None:
        self.path = path
        self.data = {**data, "done": []}
        self.save()

    def update(self, part: str | None = None, **values: Any) -> None:
        self.data.update(values)
        if part is not None:
            self.data["done"].append(part)
        self.save()

    def failed(self) -> list[str]:
        """The parts recorded as failed."""
        return [part for part in self.data["done"] if part.endswith("(failed)")]

    def save(self) -> None:
        if self.path is not None:
            write_whole(self.path, self.data)


def _gb_s(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def d2h_rates(nbytes: int, repeats: int, root: Path) -> dict[str, Any]:
    """Device-to-host GB/s of `nbytes` copies, `repeats` at a time, into a tensorsink PinnedPool's own
    memory (registered anonymous memory) and, for comparison, into cudaHostAlloc memory; tensorsink's
    copy engine into the same pool blocks; and write() -> staged through a writer.

    The peak and the engine are both host-timed from an idle device to the last copy's completion
    (the engine's copies cannot be bracketed by events on its private stream), so their ratio compares
    like with like; the peak is also timed with events on its stream."""
    device = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda")
    pool = PinnedPool(2 * nbytes)  # a block per copy in flight, as writes have
    blocks = [pool.allocate(nbytes)[0] for _ in range(2)]
    targets = [pool.view(block)[:nbytes] for block in blocks]
    found: dict[str, Any] = {"bytes": nbytes, "repeats": repeats}
    stream = torch.cuda.Stream(priority=-1)  # as tensorsink's copy stream

    def peak(host: list[torch.Tensor]) -> tuple[float, float]:
        """(GB/s timed with events, GB/s timed from the host) of plain copies on `stream`."""
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            host[0].copy_(device, non_blocking=True)  # first touch, outside the timing
        stream.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        began = time.perf_counter()
        with torch.cuda.stream(stream):
            start.record(stream)
            for i in range(repeats):
                host[i % len(host)].copy_(device, non_blocking=True)
            end.record(stream)
        end.synchronize()
        wall = time.perf_counter() - began
        return _gb_s(nbytes * repeats, start.elapsed_time(end) / 1e3), _gb_s(nbytes * repeats, wall)

    events, wall = peak(targets)
    found["registered_peak_events_gb_s"] = events
    found["registered_peak_host_timed_gb_s"] = wall
    allocated = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    found["cudahostalloc_peak_events_gb_s"], _ = peak(allocated)
    del allocated

    engine = CudaEngine()
    engine.copy([(targets[0], device)], engine.ready(device)).wait()  # its stream made, outside the timing
    torch.cuda.synchronize()
    began = time.perf_counter()
    completions = [
        engine.copy([(targets[i % len(targets)], device)], engine.ready(device)) for i in range(repeats)
    ]
    for completion in completions:
        completion.wait()
    found["tensorsink_engine_gb_s"] = _gb_s(nbytes * repeats, time.perf_counter() - began)
    found["tensorsink_engine_over_registered_peak"] = found["tensorsink_engine_gb_s"] / wall
    del completions, targets, blocks, pool

    shutil.rmtree(root, ignore_errors=True)
    try:
        # write() -> staged: the copies are queued by write(), a worker marks each staged once its
        # copy is done; durability none, and the pool holds every output
        outputs = [torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda") for _ in range(4)]
        with AsyncWriter(
            root,
            SaveFormat.NUMPY_NPY,
            durability="none",
            backend="posix",  # the pinned path, whatever this host's kvikio does
            pinned_pool_bytes=(repeats + 1) * nbytes,
        ) as writer:
            writer.write("warm", outputs[0]).wait_staged()
            writer.flush()
            torch.cuda.synchronize()
            began = time.perf_counter()
            futures = [writer.write(f"o{i}", outputs[i % len(outputs)]) for i in range(repeats)]
            for future in futures:
                future.wait_staged()
            staged = time.perf_counter() - began
        found["write_to_staged_gb_s"] = _gb_s(nbytes * repeats, staged)
        found["write_to_staged_over_registered_peak"] = found["write_to_staged_gb_s"] / wall
    finally:
        shutil.rmtree(root, ignore_errors=True)
    found["goal"] = "tensorsink_engine_over_registered_peak >= 0.85"
    return found


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

    def summary(self, steps: int) -> dict[str, Any]:
        """What the JSON keeps of one round (not every call's latency)."""
        return {
            "seconds": self.seconds,
            "drain_seconds": self.drain_seconds,
            "outputs_per_s_with_drain": steps / (self.seconds + self.drain_seconds),
            "call_p99_us": 1e6 * percentile(self.calls, 0.99),
            "blocked_seconds": self.blocked_seconds,
            **self.extra,
        }


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
        writer = AsyncWriter(
            root,
            SaveFormat.SAFETENSORS,
            durability=durability,
            backend=args.backend,
            pinned_pool_bytes=args.pool_mib << 20,
        )

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
            "pool_bytes": stats.pinned_pool_bytes,
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
    progress: Callable[[dict[str, list[dict[str, Any]]]], None] = lambda runs: None,
) -> dict[str, Any]:
    """Interleaved rounds of the chosen contenders; medians, and per-call percentiles over all rounds.
    `progress` is given every round of every contender so far, after each."""
    runs: dict[str, list[Run]] = {name: [] for name in chosen}
    for r in range(rounds):
        names = list(chosen)
        for name in names[r % len(names) :] + names[: r % len(names)]:
            root = out / name.split()[0].strip("()")
            shutil.rmtree(root, ignore_errors=True)
            gc.collect()  # outside the timing: no earlier contender's garbage collected inside it
            runs[name].append(chosen[name](root, steps))
            os.sync()  # outside the timing: no write-back left over for the next contender
            shutil.rmtree(root, ignore_errors=True)
            progress({n: [run.summary(steps) for run in done] for n, done in runs.items() if done})
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
            "outputs_per_s_with_drain": statistics.median(
                steps / (run.seconds + run.drain_seconds) for run in done
            ),
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
    """tensorsink's GB/s into tmpfs with no compute, end to end (the device-to-host copy, encoding,
    CRC-32 and write): writes of ready outputs, then flush()."""
    if not args.tmpfs.is_dir():
        return None
    count = min(args.steps, int(shutil.disk_usage(args.tmpfs).free * 0.8) // loop.output_bytes - 1)
    if count < 4:  # a small /dev/shm (containers often have 64 MiB)
        return None
    root = args.tmpfs / "tensorsink-gpu-bench"
    shutil.rmtree(root, ignore_errors=True)
    outputs = [torch.randn(loop.output_bytes // 4, device="cuda") for _ in range(16)]
    rates = []
    with AsyncWriter(
        root,
        SaveFormat.NUMPY_NPY,
        durability="none",
        backend=args.backend,
        pinned_pool_bytes=args.pool_mib << 20,
    ) as writer:
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
            f"drain {f['drain_seconds']:6.2f} s  {f['outputs_per_s_with_drain']:7.1f} outputs/s with it"
            f"{blocked}",
            flush=True,
        )


def attempt(results: Results, part: str, run: Callable[[], Any]) -> Any:
    """run(), its result under `part` in the JSON; a failure is recorded there and the next part runs."""
    try:
        value = run()
    except Exception as exc:
        results.update(f"{part} (failed)", **{part: {"error": f"{type(exc).__name__}: {exc}"}})
        print(f"{part} failed: {type(exc).__name__}: {exc}", flush=True)
        return None
    results.update(part, **{part: value})
    return value


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("/tmp/tensorsink-gpu-bench"))
    parser.add_argument("--steps", type=int, default=100, help="timed steps per contender and round")
    parser.add_argument("--warmup", type=int, default=5, help="steps written before the clock starts")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--width", type=int, default=8192)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--output-mib", type=int, default=32)
    parser.add_argument("--pool-mib", type=int, default=128, help="tensorsink's pinned pool")
    parser.add_argument("--durability", default="file", choices=["none", "file", "full"])
    parser.add_argument("--backend", default="auto", choices=["auto", "posix", "kvikio"])
    parser.add_argument(
        "--large-gib",
        type=float,
        default=4.0,
        help="GiB of outputs in the run meant to exceed the page cache (0: skip it); above MemTotal to do so",
    )
    parser.add_argument("--tmpfs", type=Path, default=Path("/dev/shm"))
    parser.add_argument("--d2h-repeats", type=int, default=16, help="copies of one output per D2H timing")
    parser.add_argument("--json", type=Path, help="write the figures here (after each part)")
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    memory = meminfo()
    results = Results(
        args.json,
        {
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "output_mib": args.output_mib,
            "pool_mib": args.pool_mib,
            "steps": args.steps,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "durability": args.durability,
            "out": str(args.out),
            "memory": memory,
            "meaning": {
                "outputs_per_s_with_drain": "timed steps over (timed seconds + drain seconds)",
                "d2h": "device-to-host copies into a tensorsink PinnedPool's registered memory; "
                "cudahostalloc_peak_events_gb_s is the same into cudaHostAlloc memory",
                "tensorsink_end_to_end_gb_s_tmpfs": "writes of ready outputs into tmpfs, durability none, "
                "then flush(): the copy, the encoding, the CRC-32 and the write; not a D2H rate",
            },
        },
    )
    loop = Loop(args)
    loop.warm()
    results.update(output_mib=loop.output_bytes / 2**20)
    facts: dict[str, Any] = {}
    every = contenders(loop, args, args.durability, facts)

    def progress(runs: dict[str, list[dict[str, Any]]]) -> None:
        results.update(rounds_so_far=runs, **facts)

    main_figures = measure(loop, every, args.out, args.steps, args.rounds, progress)
    results.update("contenders", contenders=main_figures, **facts)
    print(
        f"{results.data['device']}, {loop.output_bytes / 2**20:.0f} MiB outputs, durability {args.durability}"
    )
    print_table(
        f"steady state, {args.steps} steps after {args.warmup} warm-up, {args.rounds} rounds, "
        f"tensorsink's pool {args.pool_mib} MiB:",
        main_figures,
    )

    gc.collect()
    d2h = attempt(results, "d2h", lambda: d2h_rates(loop.output_bytes, args.d2h_repeats, args.out / "d2h"))
    if d2h is not None:
        print(
            f"D2H into the pool's registered memory: peak {d2h['registered_peak_events_gb_s']:.1f} GB/s "
            f"(events), {d2h['registered_peak_host_timed_gb_s']:.1f} GB/s (host-timed); tensorsink's "
            f"copy engine {d2h['tensorsink_engine_gb_s']:.1f} GB/s "
            f"({d2h['tensorsink_engine_over_registered_peak']:.2f} of the peak; goal 0.85), write() -> "
            f"staged {d2h['write_to_staged_gb_s']:.1f} GB/s; cudaHostAlloc memory's peak "
            f"{d2h['cudahostalloc_peak_events_gb_s']:.1f} GB/s",
            flush=True,
        )
    gc.collect()
    tmpfs = attempt(results, "tensorsink_end_to_end_gb_s_tmpfs", lambda: tmpfs_rate(loop, args))
    rate = "not run (no tmpfs, or too small)" if tmpfs is None else f"{tmpfs:.2f} GB/s"
    print(f"tensorsink end to end into tmpfs (copy, encoding, CRC-32, write; not a D2H rate): {rate}")

    large: dict[str, Any] | None = None
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
        results.update("large", large=large)
    if large is not None and "contenders" in large:
        print_table(
            f"{large['bytes'] / 2**30:.1f} GiB, durability file (exceeds memory: {large['exceeds_memory']}):",
            large["contenders"],
        )
    elif large is not None:
        print(f"large run skipped: {large['skipped']}")
    if results.failed():
        raise SystemExit(f"failed: {', '.join(results.failed())}")


if __name__ == "__main__":
    main()
