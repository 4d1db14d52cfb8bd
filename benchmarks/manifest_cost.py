"""What the manifest costs: tensorsink with and without its journal (CRC-32 per file), interleaved.

python benchmarks/manifest_cost.py --target /tmp --rounds 7
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from tensorsink import AsyncWriter


def run(
    target: Path, tensors: list[torch.Tensor], manifest: bool, save_format: str, durability: str
) -> float:
    root = Path(tempfile.mkdtemp(prefix="manifest-cost-", dir=target))
    try:
        start = time.perf_counter()
        with AsyncWriter(root, save_format, durability=durability, manifest=manifest) as writer:
            for i, tensor in enumerate(tensors):
                writer.write(str(i), tensor)
        return time.perf_counter() - start
    finally:
        shutil.rmtree(root)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", type=Path, default=Path("/tmp"))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--durability", default="none")
    args = parser.parse_args()
    workloads = {
        "8 x 64 MiB": [torch.rand(16 << 20) for _ in range(8)],
        "2000 x 16 KiB": [torch.rand(4 << 10) for _ in range(2000)],
    }
    print(f"{args.target}, durability={args.durability}, median of {args.rounds} interleaved rounds")
    for name, tensors in workloads.items():
        for save_format in ("safetensors", "pt", "npz"):
            times: dict[bool, list[float]] = {True: [], False: []}
            for r in range(args.rounds + 1):
                for manifest in (r % 2 == 0, r % 2 == 1):
                    seconds = run(args.target, tensors, manifest, save_format, args.durability)
                    if r:
                        times[manifest].append(seconds)
            off, on = statistics.median(times[False]), statistics.median(times[True])
            total = sum(t.numel() * t.element_size() for t in tensors)
            rates = f"off {total / off / 1e9:5.2f} GB/s  on {total / on / 1e9:5.2f} GB/s"
            print(f"  {name:<14} {save_format:<12} {rates}  on/off time x{on / off:.2f}")


if __name__ == "__main__":
    main()
