"""Write GB/s of CUDA tensors: kvikio (compat or GDS, whatever this host gives) against pinned staging.

Interleaved rounds, medians; also what kvikio's statistics say carried the bytes.

    python benchmarks/gpu_backends.py --out /path/on/nvme --json gpu-backends.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch

from tensorsink import AsyncWriter, SaveFormat
from tensorsink.backends import probe


def run(root: Path, backend: str, outputs: list[torch.Tensor], durability: str) -> float:
    shutil.rmtree(root, ignore_errors=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    with AsyncWriter(
        root, SaveFormat.NUMPY_NPY, align=4096, backend=backend, durability=durability
    ) as writer:
        for i, output in enumerate(outputs):
            writer.write(f"o{i}", output)
    seconds = time.perf_counter() - start
    shutil.rmtree(root, ignore_errors=True)
    return sum(o.numel() * o.element_size() for o in outputs) / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("/tmp/tensorsink-gpu-backends"))
    parser.add_argument("--outputs", type=int, default=32)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--durability", default="file")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    verdict = probe.verdict_for(str(args.out))
    outputs = [torch.randn(args.mib << 18, device="cuda") for _ in range(args.outputs)]
    rates: dict[str, list[float]] = {"posix (pinned staging)": [], "kvikio": []}
    for r in range(args.rounds):
        order = list(rates) if r % 2 == 0 else list(reversed(rates))
        for name in order:
            rates[name].append(run(args.out / "run", name.split()[0], outputs, args.durability))
    result = {
        "device": torch.cuda.get_device_name(),
        "probe": {"kvikio_works": verdict.kvikio_works, "gds": verdict.gds, "reason": verdict.reason},
        "by_backend": verdict.by_backend,
        "gb_per_s": {name: statistics.median(values) for name, values in rates.items()},
    }
    for name, rate in result["gb_per_s"].items():  # type: ignore[attr-defined]
        print(f"{name:<24} {rate:6.2f} GB/s")
    print(f"probe: {verdict.reason}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
