"""`tensorsink verify` on a tree of many small files: files/s with and without CRC-32.

python benchmarks/verify_tree.py --files 100000 --root /tmp/verify-tree
"""

from __future__ import annotations

import argparse
import shutil
import statistics
from pathlib import Path

import torch

from tensorsink import AsyncWriter
from tensorsink.manifest import verify


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--bytes", type=int, default=4096)
    parser.add_argument("--root", type=Path, default=Path("verify-tree"))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    shutil.rmtree(args.root, ignore_errors=True)
    tensor = torch.rand(args.bytes // 4)
    with AsyncWriter(args.root, "npy", durability="none", manifest=True) as writer:
        for i in range(args.files):
            writer.write(f"d{i % 100:02d}/s{i}", tensor)
    print(f"{args.files:,} files of {args.bytes:,} bytes in 100 folders under {args.root}")
    for checksums in (True, False):
        rates = []
        for _ in range(args.rounds):
            report = verify(args.root, checksums=checksums)
            if not report.ok or report.checked != args.files:
                raise SystemExit(f"verify found problems in a clean tree: {report}")
            rates.append(report.checked / report.seconds)
        label = "sizes and CRC-32" if checksums else "sizes only"
        print(f"  {label:<16} median {statistics.median(rates):8,.0f} files/s over {args.rounds} runs")
    shutil.rmtree(args.root)


if __name__ == "__main__":
    main()
