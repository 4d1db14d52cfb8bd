"""`tensorsink bench`: throughput against the machine's ceiling and the usual ways of saving tensors."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
from pathlib import Path

import torch

from ..options import Backend, DictMode, Durability, SaveFormat
from .environment import describe
from .report import header, producer_summary, producer_table, summary, table, write_json, write_plot
from .runner import BenchConfig, ProducerRow, Progress, Row, measure, measure_producer, output_folder
from .workloads import PRESETS, Workload, parse_size

__all__ = [
    "BenchConfig",
    "ProducerRow",
    "Row",
    "Workload",
    "add_arguments",
    "config_from",
    "parse_size",
    "run",
]

DEFAULT_WORKLOADS = ("mid", "small", "mapping")
#: What `--workload all` runs: the throughput workloads. A producer run takes half a minute or more, so
#: it runs only when named.
ALL_WORKLOADS = tuple(name for name, w in PRESETS.items() if not w.producer)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    presets = ", ".join(w.describe() for w in PRESETS.values())
    parser.add_argument(
        "--workload", nargs="+", choices=[*PRESETS, "all"], default=list(DEFAULT_WORKLOADS),
        help=f"which outputs to write (default: {' '.join(DEFAULT_WORKLOADS)}; "
        f"all: {' '.join(ALL_WORKLOADS)}); {presets}. A producer workload times a launch-bound loop "
        "with and without a writer, at the first durability given",
    )  # fmt: skip
    parser.add_argument("--size", type=_size, help='bytes per output, like "64MiB" (overrides the workload)')
    parser.add_argument(
        "--count", type=_positive, help="outputs per round, steps for a producer (overrides the workload)"
    )
    parser.add_argument(
        "--ops",
        type=_non_negative,
        help="tiny torch ops per producer step (overrides the producer workloads)",
    )
    parser.add_argument(
        "--wait-us", type=_non_negative,
        help="GIL-free wait per producer step, in microseconds, standing in for device time (0: none)",
    )  # fmt: skip
    parser.add_argument(
        "--format", default=SaveFormat.SAFETENSORS.value, choices=[f.value for f in SaveFormat]
    )
    parser.add_argument(
        "--dict-mode", choices=[m.value for m in DictMode],
        help="for mappings (default: split for npy, single otherwise)",
    )  # fmt: skip
    parser.add_argument("--workers", type=_positive, default=4)
    parser.add_argument(
        "--durability", nargs="+", choices=[d.value for d in Durability],
        default=[d.value for d in Durability], help="measured one after another (default: all)",
    )  # fmt: skip
    parser.add_argument("--backend", default=Backend.AUTO.value, choices=[b.value for b in Backend])
    parser.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto",
        help="where the outputs live (default: CUDA when there is a GPU)",
    )  # fmt: skip
    parser.add_argument(
        "--rounds", type=_positive, default=3, help="interleaved rounds; medians are reported"
    )
    parser.add_argument(
        "--out", type=Path, help="folder to write in (default: a temporary folder here, removed afterwards)"
    )
    parser.add_argument("--json", type=Path, help="write every figure and the machine's description here")
    parser.add_argument("--plot", type=Path, help="write a PNG chart here (needs tensorsink[bench])")


def _size(text: str) -> int:
    try:
        return parse_size(text)
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


def _device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("tensorsink bench: --device cuda, but torch sees no CUDA device")
    cuda = choice == "cuda" or (choice == "auto" and torch.cuda.is_available())
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


def _overridden(preset: Workload, args: argparse.Namespace) -> Workload:
    """The preset with the sizes and counts given; a producer's ops and wait too."""
    workload = dataclasses.replace(
        preset, item_size=args.size or preset.item_size, count=args.count or preset.count
    )
    if not preset.producer:
        return workload
    ops = preset.ops if args.ops is None else args.ops
    wait_us = preset.wait_us if args.wait_us is None else args.wait_us
    return dataclasses.replace(workload, ops=ops, wait_us=wait_us)


def config_from(args: argparse.Namespace) -> BenchConfig:
    chosen = [n for name in args.workload for n in (ALL_WORKLOADS if name == "all" else [name])]
    names = list(dict.fromkeys(chosen))
    producer = [name for name in names if PRESETS[name].producer]
    if (args.ops is not None or args.wait_us is not None) and not producer:
        raise SystemExit(
            "tensorsink bench: --ops and --wait-us apply to a producer workload: add --workload producer"
        )
    workloads = [_overridden(PRESETS[name], args) for name in names]
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
    """The `tensorsink bench` command: measure, print the tables, write the JSON and the plot."""
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise SystemExit("tensorsink bench: --plot needs matplotlib: pip install 'tensorsink[bench]'")
    config = config_from(args)
    with output_folder(args.out) as folder:
        environment = describe(folder, config.device)
        print(header(environment, config.as_dict()), flush=True)
        progress = Progress()
        try:
            rows = measure(config, folder, progress)
            producer_rows: list[ProducerRow] = measure_producer(config, folder, progress)
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
        write_plot(args.plot, rows, title, producer_rows)
        print(f"chart written to {args.plot}")
    sys.stdout.flush()
    return 0
