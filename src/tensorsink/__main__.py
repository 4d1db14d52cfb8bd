"""The `tensorsink` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import bench
from .commit import sweep


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tensorsink", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    sweep_parser = commands.add_parser(
        "sweep", help="remove temporaries left by killed writers (run it when no writer is active)"
    )
    sweep_parser.add_argument("root", help="the output root to clean")
    sweep_parser.add_argument("-q", "--quiet", action="store_true", help="print only the count")
    bench_parser = commands.add_parser(
        "bench", help="measure throughput against the machine's ceiling and the usual ways of saving"
    )
    bench.add_arguments(bench_parser)
    args = parser.parse_args(argv)

    if args.command == "bench":
        return bench.run(args)
    if args.command == "sweep":
        removed = sweep(args.root)
        if not args.quiet:
            for path in removed:
                print(path)
        print(f"removed {len(removed)} temporar{'y' if len(removed) == 1 else 'ies'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
