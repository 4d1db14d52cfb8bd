"""Write GB/s of CUDA tensors: kvikio (GDS or its POSIX compat path, whatever this host gives) against
pinned staging.

Each backend gets one writer, made before any timing: kvikio's settings (which restart its thread pool)
are applied, the backend decided (`wait_backend`) and one output written and flushed as a warm-up.
Each round then times `--outputs` writes and the flush() that commits them, backends interleaved;
medians. `bytes_by_backend` is each writer's own statistics over the timed rounds ("gds", "kvikio-posix"
or "posix"): what carried the bytes, not the probe's 1 MiB, which is reported apart.

    python benchmarks/gpu_backends.py --out /path/on/nvme --json gpu-backends.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from tensorsink import AsyncWriter, SaveFormat
from tensorsink.backends import probe


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("/tmp/tensorsink-gpu-backends"))
    parser.add_argument("--outputs", type=int, default=32)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--durability", default="file", choices=["none", "file", "full"])
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    verdict = probe.verdict_for(str(args.out), 60)
    outputs = [torch.randn(args.mib << 18, device="cuda") for _ in range(args.outputs)]
    nbytes = sum(o.numel() * o.element_size() for o in outputs)
    torch.cuda.synchronize()

    wanted = {"posix (pinned staging)": "posix", "kvikio": "kvikio"}
    writers: dict[str, AsyncWriter] = {}
    roots: dict[str, Path] = {}
    chosen: dict[str, str] = {}
    skipped: dict[str, str] = {}
    warm: dict[str, dict[str, int]] = {}
    for name, backend in wanted.items():
        if backend == "kvikio" and not verdict.kvikio_works:
            skipped[name] = verdict.reason
            continue
        root = args.out / backend
        shutil.rmtree(root, ignore_errors=True)
        writer = AsyncWriter(
            root, SaveFormat.NUMPY_NPY, align=4096, backend=backend, durability=args.durability
        )
        chosen[name] = writer.wait_backend(120)
        writer.write("warm", outputs[0])
        writer.flush()
        (root / "warm.npy").unlink()
        writers[name], roots[name] = writer, root
        warm[name] = writer.stats().bytes_by_backend

    rates: dict[str, list[float]] = {name: [] for name in writers}
    try:
        for r in range(args.rounds):
            order = list(writers) if r % 2 == 0 else list(reversed(writers))
            for name in order:
                writer = writers[name]
                torch.cuda.synchronize()
                start = time.perf_counter()
                for i, output in enumerate(outputs):
                    writer.write(f"r{r}_o{i}", output)
                writer.flush()
                rates[name].append(nbytes / (time.perf_counter() - start) / 1e9)
                for path in roots[name].glob(f"r{r}_o*.npy"):  # outside the timing
                    path.unlink()
    finally:
        for writer in writers.values():
            writer.close()
    by_backend = {name: _delta(writers[name].stats().bytes_by_backend, warm[name]) for name in writers}
    for root in roots.values():
        shutil.rmtree(root, ignore_errors=True)

    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "outputs": args.outputs,
        "mib": args.mib,
        "rounds": args.rounds,
        "durability": args.durability,
        "out": str(args.out),
        "probe": {
            "kvikio_works": verdict.kvikio_works,
            "gds": verdict.gds,
            "label": verdict.label,
            "reason": verdict.reason,
            "report": verdict.report,  # what cuFile and kvikio said about the probe's 1 MiB
        },
        "backend_chosen": chosen,
        "skipped": skipped,
        "gb_per_s": {name: statistics.median(values) for name, values in rates.items()},
        "gb_per_s_per_round": rates,
        "bytes_by_backend": by_backend,
    }
    for name, rate in result["gb_per_s"].items():
        print(f"{name:<24} {rate:6.2f} GB/s  carried by {by_backend[name]}")
    for name, reason in skipped.items():
        print(f"{name:<24} not run: {reason}")
    print(f"probe: {verdict.label or 'no kvikio'}: {verdict.reason}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
