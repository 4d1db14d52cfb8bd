"""`tensorsink bench`: throughput against the machine's ceiling and the usual ways of saving tensors.

The options and their checks import neither torch nor the contenders, so `tensorsink bench --help` and
a refused option answer at once; `run` imports what measuring needs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from ..options import Backend, DictMode, Durability, SaveFormat
from .workloads import PRESETS, Workload, format_size, parse_size, size_label

if TYPE_CHECKING:
    import torch

    from .runner import BenchConfig, ProducerRow, Row

__all__ = [
    "BenchConfig",
    "ProducerRow",
    "Row",
    "UsageError",
    "Workload",
    "add_arguments",
    "config_from",
    "parse_size",
    "run",
]

_FROM_RUNNER = {"BenchConfig", "ProducerRow", "Row"}


def __getattr__(name: str) -> Any:
    """The runner's types, imported (with torch) when first asked for."""
    if name in _FROM_RUNNER:
        from . import runner

        return getattr(runner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class UsageError(ValueError):
    """Options that cannot run together, or that this machine cannot run: refused before anything runs."""


DEFAULT_WORKLOADS = ("mid", "small", "mapping")
#: What `--workload all` runs: the throughput workloads. A producer run takes half a minute or more, so
#: it runs only when named.
ALL_WORKLOADS = tuple(name for name, w in PRESETS.items() if not w.producer)

DESCRIPTION = """\
Write outputs shaped like an inference job's and measure, interleaved round after round in one process:
the machine's ceiling (a bare open/write/close/rename loop), tensorsink, and the usual ways of saving
(torch.save, np.save, safetensors per sample; a thread pool). Every contender gets the same durability.
Prints GB/s, files/s, the caller's blocked time and the ratio to the ceiling for each workload and
durability, then a line per workload in plain words."""

EPILOG = """\
examples:
  tensorsink bench                   # mid, small, mapping at none, file, full
  tensorsink bench --workload large --size 512MiB --count 2 --durability file
  tensorsink bench --workload small mid --count small=200 mid=16 --rounds 1
  tensorsink bench --format npy --out /scratch --json bench.json --plot bench.png

exit status:
  0    measured
  2    options refused (nothing was run or written)"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    presets = "; ".join(w.describe() for w in PRESETS.values())
    parser.add_argument(
        "--workload", nargs="+", choices=[*PRESETS, "all"], default=list(DEFAULT_WORKLOADS), metavar="NAME",
        help=f"which outputs to write (default: {' '.join(DEFAULT_WORKLOADS)}; "
        f"all: {' '.join(ALL_WORKLOADS)}). {presets}. A producer workload times a launch-bound loop "
        "with and without a writer, at the first durability given, and runs only when named",
    )  # fmt: skip
    parser.add_argument(
        "--size", type=_size,
        help='bytes per output, like "64MiB" or "64MB", for every workload run (default: each its own)',
    )  # fmt: skip
    parser.add_argument(
        "--count", nargs="+", type=_count, metavar="[NAME=]N",
        help="outputs per round (steps, for a producer) instead of the workload's own: N when one "
        "workload runs, NAME=N for each workload to change when several run (the others keep theirs)",
    )  # fmt: skip
    parser.add_argument(
        "--ops",
        type=_non_negative,
        help="tiny torch ops per producer step (default: the producer workload's own)",
    )
    parser.add_argument(
        "--wait-us", type=_non_negative,
        help="GIL-free wait per producer step, in microseconds, standing in for device time (0: none; "
        "default: the producer workload's own)",
    )  # fmt: skip
    parser.add_argument(
        "--format", default=SaveFormat.SAFETENSORS.value, choices=[f.value for f in SaveFormat],
        help="the format tensorsink and the thread pool write (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--dict-mode", choices=[m.value for m in DictMode],
        help="for mappings (default: split for npy, single otherwise)",
    )  # fmt: skip
    parser.add_argument(
        "--workers", type=_positive, default=4, help="tensorsink's write threads (default: %(default)s)"
    )
    parser.add_argument(
        "--durability", nargs="+", choices=[d.value for d in Durability],
        default=[d.value for d in Durability], help="measured one after another (default: all)",
    )  # fmt: skip
    parser.add_argument(
        "--backend", default=Backend.AUTO.value, choices=[b.value for b in Backend],
        help="how tensorsink's bytes reach the file: auto picks kvikio only where GPUDirect Storage "
        "works (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto",
        help="where the outputs live (default: auto, CUDA when there is a GPU)",
    )  # fmt: skip
    parser.add_argument(
        "--rounds", type=_positive, default=3,
        help="interleaved rounds; medians are reported (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=Path, metavar="FOLDER",
        help="write in a temporary folder inside FOLDER (default: the current folder); the temporary "
        "folder is removed afterwards, and so is FOLDER if the bench had to create it",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, help="write every figure and the machine's description here")
    parser.add_argument(
        "--plot", type=Path,
        help="write a PNG chart here: each contender's ratio to the ceiling and the caller's blocked "
        "time (needs tensorsink[bench])",
    )  # fmt: skip


class Size(NamedTuple):
    """`--size`: the bytes, and the size as it was written, for the tables."""

    nbytes: int
    text: str


def _size(text: str) -> Size:
    try:
        return Size(parse_size(text), size_label(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None


def _positive(text: str) -> int:
    value = _whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = _whole(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _count(text: str) -> tuple[str | None, int]:
    """`N`, or `NAME=N` for one workload."""
    name, equals, number = text.rpartition("=")
    if not equals:
        return None, _positive(text)
    if name not in PRESETS:
        raise argparse.ArgumentTypeError(f"{text!r}: no workload {name!r} (choose from {', '.join(PRESETS)})")
    return name, _positive(number)


def _device(choice: str) -> torch.device:
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but torch sees no CUDA device")
    cuda = choice == "cuda" or (choice == "auto" and torch.cuda.is_available())
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


def _counts(entries: list[tuple[str | None, int]] | None, names: list[str]) -> dict[str, int]:
    """Each workload's `--count`: a plain N for the one workload run, or NAME=N entries."""
    if not entries:
        return {}
    plain = [count for name, count in entries if name is None]
    if plain and (len(entries) > 1 or len(names) > 1):
        if len(entries) > 1:
            raise UsageError("--count takes one N, or NAME=N for each workload to change")
        raise UsageError(
            f"--count {plain[0]} with several workloads ({', '.join(names)}) would give each of them "
            f"{plain[0]} outputs, whatever their size: name the ones to change, like "
            f"--count {names[0]}={plain[0]}, or run one workload"
        )
    if plain:
        return {names[0]: plain[0]}
    counts = {name: count for name, count in entries if name is not None}
    if stray := [name for name in counts if name not in names]:
        raise UsageError(f"--count {stray[0]}=...: {stray[0]} is not run (running: {', '.join(names)})")
    return counts


def _overridden(preset: Workload, args: argparse.Namespace, count: int | None) -> Workload:
    """The preset with the size and count given; a producer's ops and wait too."""
    workload = dataclasses.replace(preset, count=count or preset.count)
    if args.size is not None:  # a Size from the command line, or bytes from a caller's Namespace
        size = args.size if isinstance(args.size, Size) else Size(args.size, format_size(args.size))
        workload = dataclasses.replace(workload, item_size=size.nbytes, size_text=size.text)
    if not preset.producer:
        return workload
    ops = preset.ops if args.ops is None else args.ops
    wait_us = preset.wait_us if args.wait_us is None else args.wait_us
    return dataclasses.replace(workload, ops=ops, wait_us=wait_us)


def config_from(args: argparse.Namespace) -> BenchConfig:
    """The run the options ask for; a `UsageError` says why options cannot run."""
    from .runner import BenchConfig

    chosen = [n for name in args.workload for n in (ALL_WORKLOADS if name == "all" else [name])]
    names = list(dict.fromkeys(chosen))
    producer = [name for name in names if PRESETS[name].producer]
    if (args.ops is not None or args.wait_us is not None) and not producer:
        raise UsageError("--ops and --wait-us apply to a producer workload: add --workload producer")
    counts = _counts(args.count, names)
    workloads = [_overridden(PRESETS[name], args, counts.get(name)) for name in names]
    save_format = SaveFormat(args.format)
    default_mode = DictMode.SPLIT if save_format is SaveFormat.NUMPY_NPY else DictMode.SINGLE
    return BenchConfig(
        workloads=workloads,
        durabilities=[Durability(d) for d in dict.fromkeys(args.durability)],
        save_format=save_format,
        dict_mode=DictMode(args.dict_mode) if args.dict_mode else default_mode,
        workers=args.workers,
        backend=Backend(args.backend),
        rounds=args.rounds,
        device=_device(args.device),
    )


def run(args: argparse.Namespace) -> int:
    """The `tensorsink bench` command: measure, print the tables, write the JSON and the plot.

    Raises `UsageError` before anything is written for options that cannot run.
    """
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib: pip install 'tensorsink[bench]'")
    config = config_from(args)

    from .environment import describe
    from .report import header, producer_summary, producer_table, summary, table, write_json, write_plot
    from .runner import Progress, measure, measure_producer, output_folder

    stack = contextlib.ExitStack()
    try:
        folder = stack.enter_context(output_folder(args.out))
    except OSError as exc:
        raise UsageError(f"--out {args.out}: {exc.strerror or exc}") from None
    with stack:  # the folder is removed however the measurement ends
        environment = describe(folder, config.device)
        print(header(environment, config.as_dict()), flush=True)
        progress = Progress()
        try:
            rows = measure(config, folder, progress)
            producer_rows = measure_producer(config, folder, progress)
        finally:
            progress.close()
    described = {w.name: w.describe() for w in config.workloads}
    if rows:
        print(table(rows, described))
        print(summary(rows))
    if producer_rows:
        print(producer_table(producer_rows, described))
        print(producer_summary(producer_rows))
    if args.json:
        write_json(args.json, environment, config.as_dict(), rows, producer_rows)
        print(f"\nfigures written to {args.json}")
    if args.plot:
        title = f"tensorsink bench, {environment['date']}, {environment['cpus']} CPUs"
        write_plot(args.plot, rows, title, producer_rows, described)
        print(f"chart written to {args.plot}")
    sys.stdout.flush()
    return 0
