"""The `tensorsink` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from . import bench
from .commit import sweep
from .manifest import JOURNAL_DIR, Manifest, verify


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tensorsink", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    sweep_parser = commands.add_parser(
        "sweep", help="remove temporaries left by killed writers (run it when no writer is active)"
    )
    sweep_parser.add_argument("root", help="the output root to clean")
    sweep_parser.add_argument("-q", "--quiet", action="store_true", help="print only the count")
    verify_parser = commands.add_parser(
        "verify",
        help="check files against the manifest: missing, extra, wrong size or CRC-32 (exit 1 if any)",
    )
    verify_parser.add_argument("root", help="an output root written with manifest=True")
    verify_parser.add_argument("--no-checksum", action="store_true", help="compare sizes only")
    verify_parser.add_argument("--workers", type=int, default=8, help="threads reading files (default 8)")
    verify_parser.add_argument("-q", "--quiet", action="store_true", help="print only the summary")
    manifest_parser = commands.add_parser("manifest", help="print the merged manifest of every journal")
    manifest_parser.add_argument("root", help="an output root written with manifest=True")
    bench_parser = commands.add_parser(
        "bench", help="measure throughput against the machine's ceiling and the usual ways of saving"
    )
    bench.add_arguments(bench_parser)
    args = parser.parse_args(argv)

    if args.command == "verify":
        return _verify(args)
    if args.command == "manifest":
        for line in Manifest.load(args.root).lines():
            print(line)
        return 0
    if args.command == "bench":
        return bench.run(args)
    if args.command == "sweep":
        removed = sweep(args.root)
        if not args.quiet:
            for path in removed:
                print(path)
        print(f"removed {len(removed)} temporar{'y' if len(removed) == 1 else 'ies'}", file=sys.stderr)
    return 0


def _verify(args: argparse.Namespace) -> int:
    if not (Path(args.root) / JOURNAL_DIR).is_dir():
        print(f"tensorsink verify: no journals in {Path(args.root) / JOURNAL_DIR}; "
              "was it written with AsyncWriter(..., manifest=True)?", file=sys.stderr)  # fmt: skip
        return 2
    report = verify(args.root, checksums=not args.no_checksum, workers=args.workers)
    problems = [("missing", report.missing), ("extra", report.extra), ("size mismatch", report.size_mismatch),
                ("checksum mismatch", report.checksum_mismatch), ("unreadable", report.unreadable),
                ("damaged journal line", report.damaged_journal)]  # fmt: skip
    if not args.quiet:
        for kind, paths in problems:
            for path in paths:
                print(f"{kind}: {path}")
    rate = report.checked / report.seconds if report.seconds > 0 else 0.0
    counts = ", ".join(f"{len(paths)} {kind}" for kind, paths in problems)
    what = "sizes and layouts" if args.no_checksum else "sizes, layouts and CRC-32"
    timing = f"{report.seconds:.2f} s ({rate:,.0f} files/s)"
    print(f"checked {what} of {report.checked:,} files in {timing}: {counts}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
