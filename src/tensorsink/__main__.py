"""The `tensorsink` command line: clean up after killed jobs, check and print manifests, measure.

Each command imports only what it needs: the parser (and so `--help`) takes the benchmark's options
without the benchmark, `sweep` the commit protocol alone, `verify` and `manifest` the manifest; torch
and the contenders are imported by `bench` when it measures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__, bench  # bench's options only: measuring imports torch when it runs

if TYPE_CHECKING:
    from .manifest import VerifyReport

DESCRIPTION = """\
Command-line tools for the output folders of tensorsink's writers: remove the temporaries a killed job
left (sweep), check the files against the manifest a writer journaled (verify), print that manifest
(manifest), write the list of the shards under a root (shards), and measure writing on this machine
against its ceiling and the usual ways (bench)."""

EXIT_STATUS = """\
exit status:
  0    done, nothing wrong found (bench: measured)
  1    problems found: verify's faults, manifest's damaged journal lines,
       a temporary sweep could not remove
  2    bad usage, a ROOT that is not a folder, or (verify, manifest)
       a ROOT without journals; an s3:// ROOT that cannot be read
  141  standard output was closed early (a pipe into head)

'tensorsink COMMAND --help' describes each command."""

SWEEP_EXIT = """\
exit status:
  0    done (whether or not there was anything to remove)
  1    a temporary could not be removed (the error says which)
  2    bad usage, or ROOT is not a folder
  141  standard output was closed early (a pipe into head)"""

VERIFY_EXIT = """\
exit status:
  0    every journaled file is there and whole, and nothing else is
  1    problems found: each is printed as "<kind>: <path>"
  2    bad usage, ROOT is not a folder, or it holds no journals
       (it was not written with manifest=True); an s3:// ROOT that
       cannot be read (no such bucket, no credentials, no store at
       --endpoint-url, boto3 not installed)
  141  standard output was closed early (a pipe into head)"""

MANIFEST_EXIT = """\
exit status:
  0    printed
  1    printed, but damaged journal lines were skipped (named on standard error)
  2    bad usage, ROOT is not a folder, or it holds no journals
       (it was not written with manifest=True)
  141  standard output was closed early (a pipe into head)"""

SHARDS_EXIT = """\
exit status:
  0    written
  2    bad usage, ROOT is not a folder, or it holds no journals
  141  standard output was closed early (a pipe into head)"""

SHARDS_DESCRIPTION = """\
Write the list of every shard a ShardWriter committed under ROOT, in wids' format, atomically (what
ShardWriter.close() writes): after a job that was killed, or to merge the shards of several jobs."""

SWEEP_DESCRIPTION = """\
Remove the temporaries (.<name>.tsink-<hex>.partial) that killed writers left under ROOT, and print
their paths. Final files are never touched. Run it when no writer is writing under ROOT: a live writer's
temporaries look like a dead one's."""

VERIFY_DESCRIPTION = """\
Check every file a writer with manifest=True journaled under ROOT: missing files, extra files (not in
the manifest; a killed job's temporaries too), sizes, CRC-32 checksums, tensorsink formats whose layout
is not whole, and damaged journal lines. Prints each problem, then a summary line."""

MANIFEST_DESCRIPTION = """\
Print the merged manifest of every journal under ROOT (one per writer and DDP rank): one JSON line per
file, sorted by path, the latest record of each path."""

BENCH_HELP = "measure throughput against the machine's ceiling and the usual ways of saving"

#: The exit status when standard output is a pipe closed early: 128 + SIGPIPE, as a shell reports it.
BROKEN_PIPE = 141


class _Formatter(argparse.HelpFormatter):
    """Fills plain paragraphs to the terminal's width; keeps paragraphs with indented lines as written
    (the exit status tables, the examples)."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = []
        for paragraph in text.split("\n\n"):
            if any(line.startswith(" ") for line in paragraph.splitlines()):
                paragraphs.append("\n".join(indent + line for line in paragraph.splitlines()))
            else:
                paragraphs.append(super()._fill_text(paragraph, width, indent))
        return "\n\n".join(paragraphs)


def build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The parser, and its `bench` subparser (for the errors of options that cannot run together)."""
    parser = argparse.ArgumentParser(
        prog="tensorsink",
        description=DESCRIPTION,
        epilog=EXIT_STATUS,
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"tensorsink {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_: str, description: str, epilog: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name, help=help_, description=description, epilog=epilog, formatter_class=_Formatter
        )

    sweep_parser = command(
        "sweep",
        "remove temporaries left by killed writers (run it when no writer is active)",
        SWEEP_DESCRIPTION,
        SWEEP_EXIT,
    )
    sweep_parser.add_argument("root", metavar="ROOT", help="the output root to clean")
    sweep_parser.add_argument(
        "-q", "--quiet", action="store_true", help="print only the count (on standard error)"
    )
    verify_parser = command(
        "verify",
        "check files against the manifest: missing, extra, wrong size or CRC-32 (exit 1 if any)",
        VERIFY_DESCRIPTION,
        VERIFY_EXIT,
    )
    verify_parser.add_argument(
        "root", metavar="ROOT",
        help="an output root written with manifest=True, or s3://BUCKET/PREFIX/ where S3SpoolingWriter "
        "uploaded one (checked in place by the CRC-32 the store keeps: nothing is downloaded)",
    )  # fmt: skip
    verify_parser.add_argument(
        "--endpoint-url", help="for s3:// roots: the S3-compatible store's URL (MinIO, Ceph ...)"
    )
    verify_parser.add_argument(
        "--no-checksum", action="store_true", help="compare sizes and layouts only, skip the CRC-32"
    )
    verify_parser.add_argument(
        "--workers", type=_positive, default=8, help="threads reading files (default: %(default)s)"
    )
    verify_parser.add_argument("-q", "--quiet", action="store_true", help="print only the summary")
    manifest_parser = command(
        "manifest",
        "print the merged manifest of every journal",
        MANIFEST_DESCRIPTION,
        MANIFEST_EXIT,
    )
    manifest_parser.add_argument("root", metavar="ROOT", help="an output root written with manifest=True")
    shards_parser = command(
        "shards",
        "write the shard list (wids' format) of every shard under ROOT",
        SHARDS_DESCRIPTION,
        SHARDS_EXIT,
    )
    shards_parser.add_argument("root", metavar="ROOT", help="an output root a ShardWriter wrote")
    shards_parser.add_argument(
        "--name", default="shards.json", help="the list's file name under ROOT (default: %(default)s)"
    )
    bench_parser = command("bench", BENCH_HELP, bench.DESCRIPTION, bench.EPILOG)
    bench.add_arguments(bench_parser)
    return parser, bench_parser


def main(argv: Sequence[str] | None = None) -> int:
    parser, bench_parser = build_parser()
    args = parser.parse_args(argv)
    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "sweep": _sweep,
        "verify": _verify,
        "manifest": _manifest,
        "shards": _shards,
        "bench": _bench,
    }
    try:
        code = commands[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit where it cannot be caught
    except BrokenPipeError:
        _silence_stdout()
        return BROKEN_PIPE
    except _Refused as refused:
        print(f"tensorsink {args.command}: {refused}", file=sys.stderr)
        return 2
    except bench.UsageError as refused:
        bench_parser.error(str(refused))  # the usage line and the message; exit 2
    return code


class _Refused(Exception):
    """A root the command cannot work on: exit 2 with the message."""


def _silence_stdout() -> None:
    """Point standard output at /dev/null, so the interpreter's last flush raises no second error."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):  # replaced by a stream without a descriptor
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _folder(root: str) -> Path:
    path = Path(root)
    if not path.exists():
        raise _Refused(f"no such folder: {root}")
    if not path.is_dir():
        raise _Refused(f"not a folder: {root}")
    return path


def _journaled(root: str) -> Path:
    """ROOT, if it holds at least one journal."""
    from .manifest import JOURNAL_DIR

    path = _folder(root)
    if not any((path / JOURNAL_DIR).glob("journal-*.jsonl")):
        raise _Refused(
            f"no journals in {path / JOURNAL_DIR}; was it written with AsyncWriter(..., manifest=True)?"
        )
    return path


def _sweep(args: argparse.Namespace) -> int:
    from .commit import sweep

    root = _folder(args.root)
    try:
        removed = sweep(root)
    except OSError as exc:
        print(f"tensorsink sweep: could not remove {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 1
    if not args.quiet:
        for path in removed:
            print(path)
    sys.stdout.flush()
    print(f"removed {len(removed)} temporar{'y' if len(removed) == 1 else 'ies'}", file=sys.stderr)
    return 0


def _shards(args: argparse.Namespace) -> int:
    from .options import Durability, check_shard_list
    from .shards.index import publish_journaled

    root = str(_journaled(args.root).resolve())
    try:
        check_shard_list(args.name, argument="--name")
    except ValueError as exc:
        raise _Refused(str(exc)) from None
    path = publish_journaled(root, args.name, Durability.FILE)
    listed = json.loads(path.read_text())["shardlist"]
    print(path)
    samples = sum(shard["nsamples"] for shard in listed)
    print(f"listed {len(listed)} shards, {samples:,} samples", file=sys.stderr)
    return 0


def _manifest(args: argparse.Namespace) -> int:
    from .manifest import Manifest

    manifest = Manifest.load(_journaled(args.root))
    for line in manifest.lines():
        print(line)
    if manifest.damaged:
        sys.stdout.flush()
        damaged = len(manifest.damaged)
        print(
            f"tensorsink manifest: skipped {damaged} damaged journal line{'s' * (damaged != 1)}",
            file=sys.stderr,
        )
        return 1
    return 0


def _verify(args: argparse.Namespace) -> int:
    if args.root.startswith("s3://"):
        report = _verify_s3(args)
    else:
        from .manifest import verify

        root = _journaled(args.root)
        report = verify(root, checksums=not args.no_checksum, workers=args.workers)
    problems = [("missing", report.missing), ("extra", report.extra), ("size mismatch", report.size_mismatch),
                ("checksum mismatch", report.checksum_mismatch), ("unreadable", report.unreadable),
                ("damaged journal line", report.damaged_journal)]  # fmt: skip
    if args.no_checksum:  # nothing was compared: a count of 0 would claim the checksums matched
        problems = [(kind, paths) for kind, paths in problems if kind != "checksum mismatch"]
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


def _verify_s3(args: argparse.Namespace) -> VerifyReport:
    """verify_prefix for an s3:// ROOT. What keeps the prefix from being read at all (no such bucket,
    no credentials, no store at the endpoint, no boto3) is refused in one line, as a local ROOT that is
    not a folder is: exit 2, never a traceback, and never 1, which says the files were checked."""
    from .upload import _import, split_s3_url, verify_prefix

    try:
        bucket, prefix = split_s3_url(args.root)
        errors = _import("botocore.exceptions")
        if prefix and not prefix.endswith("/"):  # a ROOT is a folder, with or without its "/"
            prefix += "/"
    except (ValueError, ImportError) as exc:
        raise _Refused(str(exc)) from None
    try:
        return verify_prefix(
            bucket,
            prefix,
            checksums=not args.no_checksum,
            workers=args.workers,
            endpoint_url=args.endpoint_url,
        )
    except FileNotFoundError as exc:  # no journal under the prefix
        raise _Refused(str(exc)) from None
    except errors.NoCredentialsError as exc:
        raise _Refused(
            f"cannot read {args.root}: {exc}; give boto3 credentials (AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or ~/.aws/credentials)"
        ) from None
    except errors.EndpointConnectionError as exc:
        where = f"--endpoint-url {args.endpoint_url}" if args.endpoint_url else "the default AWS endpoint"
        raise _Refused(f"cannot read {args.root}: {exc}; is {where} the store's address?") from None
    except (errors.BotoCoreError, errors.ClientError) as exc:  # NoSuchBucket, AccessDenied ...
        raise _Refused(f"cannot read {args.root}: {exc}") from None


def _bench(args: argparse.Namespace) -> int:
    return bench.run(args)


if __name__ == "__main__":
    sys.exit(main())
