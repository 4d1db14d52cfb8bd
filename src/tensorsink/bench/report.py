"""The benchmark's outputs: a table for people, JSON for tools, a PNG for slides."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .runner import ProducerRow, Row

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "chart",
    "header",
    "producer_summary",
    "producer_table",
    "summary",
    "table",
    "write_json",
    "write_plot",
]


def header(environment: Mapping[str, Any], config: Mapping[str, Any]) -> str:
    e = environment
    return "\n".join(
        [
            f"tensorsink {e['tensorsink']} bench, {e['date']}",
            f"  machine: {e['cpus']} CPUs, {e['platform']}, Python {e['python']}, torch {e['torch']}",
            f"  GPU: {e['gpu']}; kvikio/GDS: {e['kvikio']}",
            f"  write engine: {e.get('engine', 'unknown')}",
            f"  output folder: {e['filesystem']}",
            f"  tensorsink: format={config['format']}, dict_mode={config['dict_mode']}, "
            f"workers={config['workers']}, backend={config['backend']}, device={config['device']}; "
            f"median of {config['rounds']} interleaved rounds",
        ]
    )


def _groups(rows: Sequence[Row]) -> list[list[Row]]:
    return [list(g) for _, g in groupby(rows, key=lambda r: (r.workload, r.durability))]


def _producer_groups(rows: Sequence[ProducerRow]) -> list[list[ProducerRow]]:
    return [list(g) for _, g in groupby(rows, key=lambda r: (r.workload, r.durability))]


def _micros(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _size(nbytes: int) -> str:
    """A workload's size in a unit that shows it: 3.3 MB, not 0.00 GB."""
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def _spread(values: Sequence[float], digits: int) -> str:
    return f"{min(values):,.{digits}f}-{max(values):,.{digits}f}"


def table(rows: Sequence[Row], describe: Mapping[str, str]) -> str:
    """One block per workload and durability: GB/s, files/s and x ceiling as medians with their spread
    over the rounds (min-max), the caller's blocked time, write() p50/p99."""
    lines = []
    above = False
    for group in _groups(rows):
        first = group[0]
        lines += [
            "",
            f"{describe[first.workload]} ({_size(first.bytes)}), durability={first.durability}",
            f"  {'contender':<37} {'GB/s (min-max)':>17} {'files/s (min-max)':>24} {'blocked s':>9} "
            f"{'call p50 us':>11} {'p99 us':>8} {'x ceiling (min-max)':>20}",
        ]
        for r in group:
            rates = [r.bytes / s / 1e9 for s in r.seconds] or [r.gb_per_s]
            files = [r.files / s for s in r.seconds] or [r.files_per_s]
            ratios = [r.x_ceiling * r.median_seconds / s for s in r.seconds] or [r.x_ceiling]
            above = above or (r.kind != "ceiling" and r.x_ceiling > 1.0)
            lines.append(
                f"  {r.contender:<37} {r.gb_per_s:>5.2f} ({_spread(rates, 2):>9}) "
                f"{r.files_per_s:>8,.0f} ({_spread(files, 0):>13}) {r.blocked_seconds:>9.3f} "
                f"{_micros(r.call_p50_us):>11} {_micros(r.call_p99_us):>8} "
                f"{r.x_ceiling:>6.2f} ({_spread(ratios, 2):>11})"
            )
    if above:
        lines += [
            "",
            "  Above 1.00x the ceiling: faster than the bare loop's median in this run. The ceiling is",
            "  the faster of the bare C loops (one thread, one a core); a contender that overlaps more",
            "  work, or a round of the bare loop slowed by the machine, lands above it: read the spread.",
        ]
    return "\n".join(lines)


def summary(rows: Sequence[Row]) -> str:
    """A line per workload and durability a newcomer can read: tensorsink against the ceiling and peers."""
    lines = ["", "In short (higher is better; 1.00 is the bare write loop):"]
    for group in _groups(rows):
        ours = next(r for r in group if r.kind == "tensorsink")
        peers = {r.contender: r for r in group if r.kind == "peer"}
        torch_save = peers.get("peer: torch.save per sample")
        best_peer = max(peers.values(), key=lambda r: r.gb_per_s)
        versus = (
            f", {torch_save.median_seconds / ours.median_seconds:.1f}x torch.save per sample"
            if torch_save
            else ""
        )
        lines.append(
            f"  {ours.workload:>8} | {ours.durability:<4}: tensorsink at {ours.x_ceiling:.2f}x the ceiling"
            f"{versus}, {best_peer.median_seconds / ours.median_seconds:.1f}x the best peer "
            f"({best_peer.contender.removeprefix('peer: ')}); its caller was blocked "
            f"{ours.blocked_seconds:.3f} s of {ours.median_seconds:.3f} s"
        )
    return "\n".join(lines)


def producer_table(rows: Sequence[ProducerRow], describe: Mapping[str, str]) -> str:
    """One block per producer workload: the step against the loop without a writer, the calls, the drain.

    Times in microseconds but the drain's; step and call p99 are over every step of every round.
    """
    lines = []
    for group in _producer_groups(rows):
        first = group[0]
        lines += [
            "",
            f"{describe[first.workload]}, durability={first.durability}",
            f"  {'contender':<31}  {'step us':>7}  {'step ratio':>10}  {'loop ratio':>10}  {'step p99':>8}  "
            f"{'call p50 us':>11}  {'call p99':>8}  {'files/s':>7}  {'drain s':>7}",
        ]
        for r in group:
            rate = "-" if r.files_per_s is None else f"{r.files_per_s:,.0f}"
            drain = "-" if r.drain_seconds is None else f"{r.drain_seconds:.3f}"
            lines.append(
                f"  {r.contender:<31}  {r.median_step_us:>7,.0f}  {r.step_ratio:>10.3f}  "
                f"{r.loop_ratio:>10.3f}  {r.step_p99_us:>8,.0f}  {_micros(r.call_p50_us):>11}  "
                f"{_micros(r.call_p99_us):>8}  {rate:>7}  {drain:>7}"
            )
    return "\n".join(lines)


def producer_summary(rows: Sequence[ProducerRow]) -> str:
    """A line per producer workload: how much each writer slows the step, and what is left to drain."""
    lines = ["", "Producer loop (step ratio: median step over the loop without a writer; 1.00 is untouched):"]
    for group in _producer_groups(rows):
        base = next(r for r in group if r.kind == "baseline")
        ours = next(r for r in group if r.kind == "tensorsink")
        peers = [r for r in group if r.kind == "peer"]
        others = "".join(
            f", {p.contender.removeprefix('peer: ')} {p.step_ratio:.2f}x (drain {p.drain_seconds or 0:.3f} s)"
            for p in peers
        )
        lines.append(
            f"  {ours.workload} | {ours.durability}: tensorsink {ours.step_ratio:.2f}x "
            f"({ours.median_step_us:,.0f} us a step against {base.median_step_us:,.0f} us; "
            f"drain {ours.drain_seconds or 0:.3f} s){others}"
        )
    return "\n".join(lines)


def write_json(
    path: Path,
    environment: Mapping[str, Any],
    config: Mapping[str, Any],
    rows: Sequence[Row],
    producer_rows: Sequence[ProducerRow] = (),
) -> None:
    document = {
        "environment": dict(environment),
        "config": dict(config),
        "results": [asdict(r) for r in rows],
        "producer": [asdict(r) for r in producer_rows],
    }
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


_COLOURS = {"ceiling": "#9e9e9e", "baseline": "#9e9e9e", "tensorsink": "#1f77b4", "peer": "#ff7f0e"}
#: Below this many bytes per output a panel's throughput is labelled in files/s: what limits small files
#: is the files, not the bytes.
SMALL_FILE_BYTES = 1 << 20


#: Behind a bar's value: the dashed ceiling line and the grid do not run through the figures.
_LABEL_BOX = {"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 0.4}


def _seconds(value: float) -> str:
    if value >= 1:
        return f"{value:.2f} s"
    if value >= 1e-3:
        return f"{value * 1e3:.3g} ms"
    return f"{value * 1e6:.3g} us"


def _throughput(row: Row, small: bool) -> str:
    return f"{row.files_per_s:,.0f} files/s" if small else f"{row.gb_per_s:.2f} GB/s"


@dataclass(frozen=True)
class _Panel:
    """One row of the chart: a workload at a durability, a bar per contender in each of two columns."""

    heading: str
    names: list[str]
    kinds: list[str]
    left: list[float]
    left_labels: list[str]
    right: list[float]
    right_labels: list[str]
    #: Panels with the same group share the right column's scale (one workload's durabilities).
    group: str
    #: Each left value's spread over the rounds (min, max), drawn as a whisker; None: not measured so.
    left_spread: list[tuple[float, float]] | None = None


def _ratio_spread(row: Row) -> tuple[float, float]:
    """The lowest and highest x-ceiling of a contender's rounds (its median's spread)."""
    ratios = [row.x_ceiling * row.median_seconds / s for s in row.seconds] or [row.x_ceiling]
    return min(ratios), max(ratios)


def _throughput_panel(group: Sequence[Row], describe: Mapping[str, str]) -> _Panel:
    first = group[0]
    heading = f"{describe.get(first.workload, first.workload)}, durability={first.durability}"
    small = first.bytes / max(first.items, 1) < SMALL_FILE_BYTES  # one unit for the whole panel
    return _Panel(
        heading=heading,
        names=[r.contender for r in group],
        kinds=[r.kind for r in group],
        left=[r.x_ceiling for r in group],
        left_labels=[f"{r.x_ceiling:.2f}x  ({_throughput(r, small)})" for r in group],
        left_spread=[_ratio_spread(r) for r in group],
        right=[r.blocked_seconds for r in group],
        right_labels=[
            f"{_seconds(r.blocked_seconds)} ({min(1.0, r.blocked_seconds / r.median_seconds):.0%})"
            for r in group
        ],
        group=f"throughput:{first.workload}",
    )


def _producer_panel(group: Sequence[ProducerRow], describe: Mapping[str, str]) -> _Panel:
    first = group[0]
    return _Panel(
        heading=f"{describe.get(first.workload, first.workload)}, durability={first.durability}",
        names=[r.contender for r in group],
        kinds=[r.kind for r in group],
        left=[r.step_ratio for r in group],
        left_labels=[f"{r.step_ratio:.2f}x  ({r.median_step_us:,.0f} us a step)" for r in group],
        right=[r.call_p99_us or 0.0 for r in group],
        right_labels=[
            "no writer"
            if r.call_p50_us is None or r.call_p99_us is None
            else f"p50 {r.call_p50_us:,.0f} / p99 {r.call_p99_us:,.0f} us"
            for r in group
        ],
        group="producer",
    )


def write_plot(
    path: Path,
    rows: Sequence[Row],
    title: str,
    producer_rows: Sequence[ProducerRow] = (),
    describe: Mapping[str, str] | None = None,
) -> None:
    """The chart of `chart()` as a PNG."""
    figure = chart(rows, title, producer_rows, describe)
    figure.savefig(path, format="png", dpi=100)


def chart(
    rows: Sequence[Row],
    title: str,
    producer_rows: Sequence[ProducerRow] = (),
    describe: Mapping[str, str] | None = None,
) -> Figure:
    """One figure for deciding: a row per workload and durability, each contender's ratio to the
    ceiling on a scale shared by every row (throughput on the bars: files/s for outputs under 1 MiB,
    else GB/s) and, beside it, the time its caller was blocked, on a scale shared by that workload's
    rows; for a producer, the step ratio and the write call's latency. `describe` titles the workloads."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
        from matplotlib.ticker import FuncFormatter
    except ImportError as exc:
        raise RuntimeError("--plot needs matplotlib: pip install 'tensorsink[bench]'") from exc

    names = describe or {}
    sections: list[tuple[list[_Panel], str, str]] = []
    if rows:
        sections.append(
            (
                [_throughput_panel(g, names) for g in _groups(rows)],
                "x the ceiling: time of the fastest bare write loop / its time (higher is better); "
                "whiskers: min-max over the rounds",
                "caller blocked inside its calls (its share of the run); lower is better",
            )
        )
    if producer_rows:
        sections.append(
            (
                [_producer_panel(g, names) for g in _producer_groups(producer_rows)],
                "step time / the loop's without a writer (1.00: untouched; lower is better)",
                "write call p99, us (lower is better)",
            )
        )
    panels = [panel for section, _, _ in sections for panel in section]
    heights = [len(panel.names) + 2.2 for panel in panels]
    # A Figure of its own, not pyplot's: no global state, no GUI backend, nothing to close.
    figure = Figure(figsize=(13, 0.19 * sum(heights) + 1.2), layout="constrained")
    grid = figure.add_gridspec(len(panels), 2, height_ratios=heights, width_ratios=(3, 2))
    index = 0
    for section, left_unit, right_unit in sections:
        left_axes: list[Any] = []
        right_by_group: dict[str, Any] = {}
        left_limit = 1.22 * max(
            max(max(p.left) for p in section),
            max((high for p in section for _, high in (p.left_spread or [])), default=0.0),
            1.0,
        )
        right_limits = {
            p.group: 1.7 * max(max(q.right) for q in section if q.group == p.group) or 1.0 for p in section
        }
        for number, panel in enumerate(section):
            left = figure.add_subplot(grid[index, 0], sharex=left_axes[0] if left_axes else None)
            right = figure.add_subplot(grid[index, 1], sharey=left, sharex=right_by_group.get(panel.group))
            left_axes.append(left)
            right_by_group.setdefault(panel.group, right)
            index += 1
            positions = list(range(len(panel.names)))[::-1]  # the first contender on top
            colours = [_COLOURS[kind] for kind in panel.kinds]
            left.barh(positions, panel.left, color=colours, height=0.7)
            if panel.left_spread is not None:  # the rounds' min-max: how much of a gap is noise
                low = [value - lo for value, (lo, _) in zip(panel.left, panel.left_spread, strict=True)]
                high = [hi - value for value, (_, hi) in zip(panel.left, panel.left_spread, strict=True)]
                left.errorbar(panel.left, positions, xerr=[low, high], fmt="none", ecolor="#212121",
                              elinewidth=0.8, capsize=2)  # fmt: skip
            right.barh(positions, panel.right, color=colours, height=0.7)
            left.axvline(1.0, color="#424242", linewidth=0.8, linestyle="--")
            last = number == len(section) - 1
            last_of_group = all(q.group != panel.group for q in section[number + 1 :])
            bars = (
                (left, panel.left, panel.left_labels, last),
                (right, panel.right, panel.right_labels, last_of_group),
            )
            for axis, values, labels, scaled in bars:
                for y, value, label in zip(positions, values, labels, strict=True):
                    axis.text(value, y, f" {label}", va="center", ha="left", fontsize=7, bbox=_LABEL_BOX)
                axis.tick_params(labelsize=7, labelbottom=scaled)
                axis.spines[["top", "right"]].set_visible(False)
                axis.grid(axis="x", color="#e0e0e0", linewidth=0.6)
                axis.set_axisbelow(True)
            left.set_yticks(positions, panel.names)
            right.tick_params(labelleft=False)
            left.set_xlim(0, left_limit)
            right.set_xlim(0, right_limits[panel.group])
            left.set_title(panel.heading, loc="left", fontsize=8.5, fontweight="bold")
            if panel.group != "producer":
                right.xaxis.set_major_formatter(
                    FuncFormatter(lambda value, _: _seconds(value) if value else "0")
                )
            if last:
                left.set_xlabel(left_unit, fontsize=8)
                right.set_xlabel(right_unit, fontsize=8)
    kinds = {kind for panel in panels for kind in panel.kinds}
    names_of = (("tensorsink", "tensorsink"), ("peer", "the usual ways"), ("ceiling", "the ceiling"),
              ("baseline", "no writer"))  # fmt: skip
    legend = [Patch(color=_COLOURS[kind], label=label) for kind, label in names_of if kind in kinds]
    figure.legend(handles=legend, loc="outside upper right", ncols=len(legend), fontsize=8, frameon=False)
    figure.suptitle(title, fontsize=10, x=0.01, ha="left")
    return figure
