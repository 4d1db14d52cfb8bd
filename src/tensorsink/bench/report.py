"""The benchmark's outputs: a table for people, JSON for tools, a PNG for slides."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from itertools import groupby
from pathlib import Path
from typing import Any

from .runner import Row

__all__ = ["header", "summary", "table", "write_json", "write_plot"]


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


def write_json(
    path: Path, environment: Mapping[str, Any], config: Mapping[str, Any], rows: Sequence[Row]
) -> None:
    document = {
        "environment": dict(environment),
        "config": dict(config),
        "results": [asdict(r) for r in rows],
    }
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


_COLOURS = {"ceiling": "#9e9e9e", "tensorsink": "#1f77b4", "peer": "#ff7f0e"}


def write_plot(path: Path, rows: Sequence[Row], title: str) -> None:
    """A PNG: one panel per workload and durability, a bar of GB/s per contender."""
    try:
        import matplotlib
    except ImportError as exc:
        raise RuntimeError("--plot needs matplotlib: pip install 'tensorsink[bench]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(rows)
    height = sum(0.3 * len(g) + 0.8 for g in groups)
    figure, axes = plt.subplots(len(groups), 1, figsize=(9, height), squeeze=False)
    for axis, group in zip(axes[:, 0], groups, strict=True):
        names = [r.contender for r in reversed(group)]
        values = [r.gb_per_s for r in reversed(group)]
        axis.barh(names, values, color=[_COLOURS[r.kind] for r in reversed(group)])
        axis.set_title(f"{group[0].workload}, durability={group[0].durability}", fontsize=9)
        axis.tick_params(labelsize=8)
        axis.set_xlabel("GB/s", fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout(rect=(0, 0, 1, 0.98))
    figure.savefig(path, format="png", dpi=100)
    plt.close(figure)
