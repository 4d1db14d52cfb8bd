"""The benchmark's outputs: a table for people, JSON for tools, a PNG for slides."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from itertools import groupby
from pathlib import Path
from typing import Any

from .runner import ProducerRow, Row

__all__ = ["header", "producer_summary", "producer_table", "summary", "table", "write_json", "write_plot"]


def header(environment: Mapping[str, Any], config: Mapping[str, Any]) -> str:
    e = environment
    return "\n".join(
        [
            f"tensorsink {e['tensorsink']} bench, {e['date']}",
            f"  machine: {e['cpus']} CPUs, {e['platform']}, Python {e['python']}, torch {e['torch']}",
            f"  GPU: {e['gpu']}; kvikio/GDS: {e['kvikio']}",
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


def table(rows: Sequence[Row], describe: Mapping[str, str]) -> str:
    """One block per workload and durability: GB/s, files/s, the caller's blocked time, write() p50/p99."""
    lines = []
    for group in _groups(rows):
        first = group[0]
        lines += [
            "",
            f"{describe[first.workload]} ({first.bytes / 1e9:.2f} GB), durability={first.durability}",
            f"  {'contender':<34} {'GB/s':>6} {'files/s':>8} {'blocked s':>9} "
            f"{'call p50 us':>11} {'p99 us':>8} {'x ceiling':>9}",
        ]
        for r in group:
            lines.append(
                f"  {r.contender:<34} {r.gb_per_s:>6.2f} {r.files_per_s:>8,.0f} {r.blocked_seconds:>9.3f} "
                f"{_micros(r.call_p50_us):>11} {_micros(r.call_p99_us):>8} {r.x_ceiling:>9.2f}"
            )
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


def write_plot(
    path: Path, rows: Sequence[Row], title: str, producer_rows: Sequence[ProducerRow] = ()
) -> None:
    """A PNG: one panel per workload and durability, a bar of GB/s (step ratio, for a producer) each."""
    try:
        import matplotlib
    except ImportError as exc:
        raise RuntimeError("--plot needs matplotlib: pip install 'tensorsink[bench]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: list[tuple[str, list[tuple[str, str, float]], str]] = [
        (
            f"{g[0].workload}, durability={g[0].durability}",
            [(r.contender, r.kind, r.gb_per_s) for r in g],
            "GB/s",
        )
        for g in _groups(rows)
    ]
    panels += [
        (
            f"{g[0].workload}, durability={g[0].durability}",
            [(r.contender, r.kind, r.step_ratio) for r in g],
            "step time / the loop's without a writer (lower is better)",
        )
        for g in _producer_groups(producer_rows)
    ]
    height = sum(0.3 * len(bars) + 0.8 for _, bars, _ in panels)
    figure, axes = plt.subplots(len(panels), 1, figsize=(9, height), squeeze=False)
    for axis, (heading, bars, unit) in zip(axes[:, 0], panels, strict=True):
        shown = list(reversed(bars))
        axis.barh([b[0] for b in shown], [b[2] for b in shown], color=[_COLOURS[b[1]] for b in shown])
        axis.set_title(heading, fontsize=9)
        axis.tick_params(labelsize=8)
        axis.set_xlabel(unit, fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout(rect=(0, 0, 1, 0.98))
    figure.savefig(path, format="png", dpi=100)
    plt.close(figure)
