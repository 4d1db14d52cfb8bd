"""Write GB/s of CUDA tensors: kvikio (GDS or its POSIX compat path, whatever this host gives) against
pinned staging, on the disk and in tmpfs; and what kvikio's writes in flight cost a producer on torch's
default stream.

Each contender gets one writer, made before any timing: the backend decided (`wait_backend`) and one
output written and flushed as a warm-up. Each round then times `--outputs` writes and the flush() that
commits them, contenders interleaved; medians. The contenders: each backend into `--out` with
`--durability` (file by default: with fsync this measures the disk), and each backend into `--tmpfs`
(/dev/shm) with durability none (what the writer itself costs, no disk in it). kvikio runs only where
the probe finds it can write. `bytes_by_backend` is each writer's own statistics over the timed rounds
("gds", "kvikio-posix" or "posix"): what carried the bytes, not the probe's 1 MiB, which is reported
apart.

The producer stall: kvikio 26.x makes the streams of its bounce buffers with CU_STREAM_DEFAULT, and
such streams synchronise with the legacy default stream, which is torch's default stream: a producer
there may wait behind each bounce copy (and each copy behind the producer's queue). Measured as the
step time of a matmul producer on the default stream and on a side stream, without writes and while
`--stall-outputs` kvikio writes (durability none) are in flight, steps counted until the writes are
done; the pinned path's writes in flight on the default stream are the control.

The JSON (`--json`) is rewritten after each contender's round and each part, so a run stopped part-way
keeps what it measured.

    python benchmarks/gpu_backends.py --out /path/on/nvme --json gpu-backends.json
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from gpu_inference_loop import Results
from tensorsink import AsyncWriter, SaveFormat
from tensorsink.backends import probe


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def _verdict(folder: Path) -> dict[str, Any]:
    found = probe.verdict_for(str(folder), 60)
    return {
        "kvikio_works": found.kvikio_works,
        "gds": found.gds,
        "label": found.label,
        "reason": found.reason,
        "report": found.report,  # what cuFile and kvikio said about the probe's 1 MiB
    }


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class Contender:
    """One writer, made and warmed up before any timing."""

    def __init__(self, root: Path, backend: str, durability: str, warm: torch.Tensor) -> None:
        shutil.rmtree(root, ignore_errors=True)
        self.root = root
        self.writer = AsyncWriter(
            root, SaveFormat.NUMPY_NPY, align=4096, backend=backend, durability=durability
        )
        try:
            self.chosen = self.writer.wait_backend(120)
            self.writer.write("warm", warm)
            self.writer.flush()
            (root / "warm.npy").unlink()
            self.warm = self.writer.stats().bytes_by_backend
        except BaseException:
            self.writer.close()
            raise

    def round(self, r: int, outputs: list[torch.Tensor], nbytes: int) -> float:
        """GB/s of one round: the writes and the flush that commits them."""
        torch.cuda.synchronize()
        start = time.perf_counter()
        for i, output in enumerate(outputs):
            self.writer.write(f"r{r}_o{i}", output)
        self.writer.flush()
        rate = nbytes / (time.perf_counter() - start) / 1e9
        for path in self.root.glob(f"r{r}_o*.npy"):  # outside the timing
            path.unlink()
        return rate

    def close(self) -> dict[str, int]:
        self.writer.close()
        shutil.rmtree(self.root, ignore_errors=True)
        return _delta(self.writer.stats().bytes_by_backend, self.warm)


def throughput(args: argparse.Namespace, results: Results, verdicts: dict[str, dict[str, Any]]) -> None:
    outputs = [torch.randn(args.mib << 18, device="cuda") for _ in range(args.outputs)]
    nbytes = sum(o.numel() * o.element_size() for o in outputs)
    torch.cuda.synchronize()
    places = {"disk": (args.out, args.durability)}
    if args.tmpfs.is_dir() and shutil.disk_usage(args.tmpfs).free > 1.5 * (nbytes + (args.mib << 20)):
        places["tmpfs"] = (args.tmpfs / "tensorsink-gpu-backends", "none")
    else:
        results.update(tmpfs_skipped=f"{args.tmpfs} is no folder, or has less than 1.5x {nbytes} bytes free")
    contenders: dict[str, Contender] = {}
    skipped: dict[str, str] = {}
    for place, (folder, durability) in places.items():
        for backend, label in (("posix", "posix (pinned staging)"), ("kvikio", "kvikio")):
            name = f"{label}, {place}, durability {durability}"
            verdict = verdicts.get(place)
            if backend == "kvikio" and not (verdict and verdict["kvikio_works"]):
                skipped[name] = verdict["reason"] if verdict else "no verdict for this folder"
                continue
            try:
                contenders[name] = Contender(folder / backend, backend, durability, outputs[0])
            except Exception as exc:
                skipped[name] = "the writer could not be made or warmed up: " + _error(exc)
    results.update(
        skipped=skipped, backend_chosen={name: c.chosen for name, c in contenders.items()}, bytes=nbytes
    )
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    try:
        for r in range(args.rounds):
            order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
            for name in order:
                gc.collect()  # outside the timing
                rates[name].append(contenders[name].round(r, outputs, nbytes))
                results.update(gb_per_s_per_round=rates)
    finally:
        by_backend = {}
        for name, contender in contenders.items():
            try:
                by_backend[name] = contender.close()
            except Exception as exc:
                by_backend[name] = {"close failed": _error(exc)}  # type: ignore[dict-item]
    medians = {name: statistics.median(values) for name, values in rates.items() if values}
    results.update("throughput", gb_per_s=medians, bytes_by_backend=by_backend)
    for name, rate in medians.items():
        print(f"{name:<48} {rate:6.2f} GB/s  carried by {by_backend[name]}", flush=True)
    for name, reason in skipped.items():
        print(f"{name:<48} not run: {reason}", flush=True)


def producer_stall(args: argparse.Namespace, results: Results, verdict: dict[str, Any]) -> None:
    """The producer's step time on the default stream and on a side stream, alone and while kvikio's
    (or, as the control, the pinned path's) writes are in flight."""
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    b = torch.empty_like(a)
    outputs = [torch.randn(args.mib << 18, device="cuda") for _ in range(args.stall_outputs)]
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    chunk = 20  # steps between checks of the writes (each check synchronizes the producer's stream)

    def produce(stream: torch.cuda.Stream, until: Any) -> tuple[float, int]:
        """Steps of 4 matmuls on `stream` in chunks until `until()` is true; (ms a step, steps)."""
        steps = 0
        with torch.cuda.stream(stream):
            stream.synchronize()
            began = time.perf_counter()
            while True:
                for _ in range(chunk):
                    for _ in range(4):
                        torch.matmul(a, a, out=b)
                steps += chunk
                stream.synchronize()
                if until(steps, time.perf_counter() - began):
                    break
            return 1e3 * (time.perf_counter() - began) / steps, steps

    def alone(stream: torch.cuda.Stream) -> dict[str, Any]:
        ms, steps = produce(stream, lambda steps, seconds: seconds >= args.stall_seconds)
        return {"step_ms": ms, "steps": steps}

    def with_writes(stream: torch.cuda.Stream, backend: str) -> dict[str, Any]:
        root = args.out / f"stall-{backend}"
        shutil.rmtree(root, ignore_errors=True)
        with AsyncWriter(
            root, SaveFormat.NUMPY_NPY, align=4096, backend=backend, durability="none"
        ) as writer:
            if writer.wait_backend(120) != backend:
                raise RuntimeError(f"the writer took {writer.wait_backend()} for backend={backend!r}")
            writer.write("warm", outputs[0]).result()
            torch.cuda.synchronize()
            began = time.perf_counter()
            futures = [writer.write(f"o{i}", output) for i, output in enumerate(outputs)]
            queued = time.perf_counter() - began
            ms, steps = produce(stream, lambda steps, seconds: all(f.done() for f in futures))
            writes = time.perf_counter() - began
            for future in futures:
                future.result()
        shutil.rmtree(root, ignore_errors=True)
        return {"step_ms": ms, "steps": steps, "writes_seconds": writes, "write_calls_seconds": queued}

    default = torch.cuda.default_stream()
    variants: dict[str, Any] = {
        "default stream, no writes": lambda: alone(default),
        "side stream, no writes": lambda: alone(side),
    }
    if verdict["kvikio_works"]:
        variants["default stream, kvikio writes in flight"] = lambda: with_writes(default, "kvikio")
        variants["side stream, kvikio writes in flight"] = lambda: with_writes(side, "kvikio")
    else:
        results.update(stall_kvikio_skipped=verdict["reason"])
    variants["default stream, pinned-path writes in flight (control)"] = lambda: with_writes(default, "posix")
    runs: dict[str, list[Any]] = {name: [] for name in variants}
    for r in range(args.stall_rounds):
        for name in list(variants) if r % 2 == 0 else list(reversed(variants)):
            gc.collect()
            try:
                runs[name].append(variants[name]())
            except Exception as exc:
                runs[name].append({"error": _error(exc)})
            results.update(stall_runs=runs)
    step_ms = {
        name: statistics.median(run["step_ms"] for run in done if "step_ms" in run)
        for name, done in runs.items()
        if any("step_ms" in run for run in done)
    }
    found: dict[str, Any] = {"step_ms": step_ms}
    for where in ("default", "side"):
        alone_ms = step_ms.get(f"{where} stream, no writes")
        loaded = step_ms.get(f"{where} stream, kvikio writes in flight")
        if alone_ms and loaded:
            found[f"{where}_stream_slowdown_with_kvikio"] = loaded / alone_ms
    results.update(producer_stall=found)
    for name, ms in step_ms.items():
        print(f"producer {name:<56} {ms:7.3f} ms a step", flush=True)
    errors = sorted({run["error"] for done in runs.values() for run in done if "error" in run})
    if errors:
        raise RuntimeError(f"runs failed (see stall_runs): {'; '.join(errors)}")
    results.update("producer_stall")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("/tmp/tensorsink-gpu-backends"))
    parser.add_argument("--tmpfs", type=Path, default=Path("/dev/shm"))
    parser.add_argument("--outputs", type=int, default=32)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--durability", default="file", choices=["none", "file", "full"])
    parser.add_argument("--stall-outputs", type=int, default=32, help="writes in flight under the producer")
    parser.add_argument("--stall-seconds", type=float, default=0.5, help="the producer's run alone")
    parser.add_argument("--stall-rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the figures here (after each part)")
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    results = Results(
        args.json,
        {
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "outputs": args.outputs,
            "mib": args.mib,
            "rounds": args.rounds,
            "durability": args.durability,
            "out": str(args.out),
            "tmpfs": str(args.tmpfs),
        },
    )
    verdicts = {"disk": _verdict(args.out)}
    if args.tmpfs.is_dir():
        (args.tmpfs / "tensorsink-gpu-backends").mkdir(exist_ok=True)
        try:
            verdicts["tmpfs"] = _verdict(args.tmpfs / "tensorsink-gpu-backends")
        except Exception as exc:
            results.update(tmpfs_probe_failed=_error(exc))
    results.update("probe", probe=verdicts["disk"], probe_tmpfs=verdicts.get("tmpfs"))
    print(f"probe: {verdicts['disk']['label'] or 'no kvikio'}: {verdicts['disk']['reason']}", flush=True)

    for part, run in (
        ("throughput", lambda: throughput(args, results, verdicts)),
        ("producer_stall", lambda: producer_stall(args, results, verdicts["disk"])),
    ):
        try:
            gc.collect()
            run()
        except Exception as exc:
            results.update(f"{part} (failed)", **{f"{part}_error": _error(exc)})
            print(f"{part} failed: {_error(exc)}", flush=True)
    shutil.rmtree(args.tmpfs / "tensorsink-gpu-backends", ignore_errors=True)
    if results.failed():
        raise SystemExit(f"failed: {', '.join(results.failed())}")


if __name__ == "__main__":
    main()
