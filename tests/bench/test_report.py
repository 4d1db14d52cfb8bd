"""The chart `tensorsink bench --plot` draws: one figure, ratios on a shared scale, values on the bars."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tensorsink.bench.report import chart, write_plot
from tensorsink.bench.runner import ProducerRow, Row

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CONTENDERS = [("ceiling: bare loop in C, 1 thread", "ceiling"), ("tensorsink npy", "tensorsink"),
              ("peer: torch.save per sample", "peer")]  # fmt: skip


def _rows(workload: str, durability: str, item_size: int, seconds: list[float]) -> list[Row]:
    """A group of rows as `measure` makes them: 10 outputs of `item_size`, the first contender the ceiling."""
    rows = []
    for (name, kind), median in zip(CONTENDERS, seconds, strict=True):
        total = 10 * item_size
        blocked = median if kind != "tensorsink" else median / 20
        rows.append(
            Row(
                workload=workload,
                durability=durability,
                contender=name,
                kind=kind,
                items=10,
                files=10,
                bytes=total,
                seconds=[median],
                median_seconds=median,
                gb_per_s=total / median / 1e9,
                files_per_s=10 / median,
                blocked_seconds=blocked,
                call_p50_us=None,
                call_p99_us=None,
                x_ceiling=seconds[0] / median,
                backend=None,
            )
        )
    return rows


def _texts(axis: Any) -> list[str]:
    return [text.get_text().strip() for text in axis.texts]


def test_one_figure_with_a_shared_ratio_scale_values_and_blocked_time() -> None:
    small = _rows("small", "file", 16 << 10, [0.1, 0.125, 0.4])
    large = _rows("large", "file", 64 << 20, [2.0, 1.0, 4.0])  # tensorsink above the ceiling: 2x
    figure = chart([*small, *large], "title", describe={"small": "small: 10 tensors of 16 KiB"})
    axes = figure.get_axes()
    assert len(axes) == 4, "two rows (a workload at a durability each), two columns"
    ratio_axes, blocked_axes = axes[0::2], axes[1::2]
    limits = {axis.get_xlim() for axis in ratio_axes}
    assert len(limits) == 1, "every row's ratios on one scale"
    assert limits.pop()[1] > 2.0, "the largest ratio fits"
    assert ratio_axes[0].get_title(loc="left") == "small: 10 tensors of 16 KiB, durability=file"
    assert ratio_axes[1].get_title(loc="left") == "large, durability=file"
    small_ratios, large_ratios = (_texts(axis) for axis in ratio_axes)
    assert small_ratios == ["1.00x  (100 files/s)", "0.80x  (80 files/s)", "0.25x  (25 files/s)"]
    assert large_ratios == ["1.00x  (0.34 GB/s)", "2.00x  (0.67 GB/s)", "0.50x  (0.17 GB/s)"]
    assert _texts(blocked_axes[0]) == ["100 ms (100%)", "6.25 ms (5%)", "400 ms (100%)"]
    assert _texts(blocked_axes[1]) == ["2.00 s (100%)", "50 ms (5%)", "4.00 s (100%)"]
    bars = [patch.get_width() for patch in ratio_axes[1].patches]
    assert bars == pytest.approx([1.0, 2.0, 0.5])
    ticks = sorted(ratio_axes[0].get_yticklabels(), key=lambda label: -label.get_position()[1])
    assert [label.get_text() for label in ticks] == [name for name, _ in CONTENDERS], "first on top"


def test_blocked_time_shares_a_scale_within_a_workload_only() -> None:
    rows = [*_rows("mid", "none", 2 << 20, [0.1, 0.2, 0.3]), *_rows("mid", "full", 2 << 20, [1.0, 1.0, 2.0]),
            *_rows("small", "none", 16 << 10, [0.01, 0.01, 0.02])]  # fmt: skip
    axes = chart(rows, "title").get_axes()
    blocked = axes[1::2]
    assert blocked[0].get_xlim() == blocked[1].get_xlim()
    assert blocked[2].get_xlim() != blocked[0].get_xlim()
    assert blocked[2].get_xlim()[1] > 0.02
    assert blocked[2].get_xlim()[1] < 0.1, "the small workload is not drawn on the mid one's scale"


def test_producer_rows_get_step_ratios_and_call_latency(tmp_path: Path) -> None:
    def row(name: str, kind: str, ratio: float, p99: float | None) -> ProducerRow:
        return ProducerRow(
            workload="producer", durability="file", contender=name, kind=kind, steps=10, ops=3, wait_us=0,
            item_size=4096, files=0 if p99 is None else 10, step_us=[ratio * 100], median_step_us=ratio * 100,
            step_p99_us=ratio * 200, step_ratio=ratio, loop_seconds=ratio, loop_ratio=ratio,
            call_p50_us=None if p99 is None else p99 / 4, call_p99_us=p99,
            files_per_s=None if p99 is None else 10.0, drain_seconds=None, backend=None,
        )  # fmt: skip

    rows = [row("baseline: no writer", "baseline", 1.0, None), row("tensorsink npy", "tensorsink", 1.1, 40.0),
            row("peer: thread pool + npy", "peer", 1.6, 400.0)]  # fmt: skip
    figure = chart([], "title", rows)
    ratio, calls = figure.get_axes()
    assert _texts(ratio) == ["1.00x  (100 us a step)", "1.10x  (110 us a step)", "1.60x  (160 us a step)"]
    assert _texts(calls) == ["no writer", "p50 10 / p99 40 us", "p50 100 / p99 400 us"]
    path = tmp_path / "producer.png"
    write_plot(path, [], "title", rows)
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_the_table_shows_each_figures_spread_and_small_sizes_in_mb() -> None:
    from dataclasses import replace

    from tensorsink.bench.report import table

    rows = _rows("small", "none", 16 << 10, [0.1, 0.05, 0.4])
    rows[1] = replace(rows[1], seconds=[0.04, 0.05, 0.08], median_seconds=0.05)  # above the ceiling
    text = table(rows, {"small": "small: 10 tensors of 16 KiB"})
    assert "(0.2 MB)" in text
    assert "0.00 GB" not in text
    line = next(line for line in text.splitlines() if "tensorsink npy" in line)
    assert re.search(r" 200 \(\s*125-250\)", line), line  # files/s: 10 / 0.05, and 10 / 0.08 .. 10 / 0.04
    assert re.search(r" 2\.00 \(\s*1\.25-2\.50\)", line), line  # x ceiling: 0.1 / 0.05, and each round's
    assert "Above 1.00x the ceiling" in text


def test_the_header_names_the_write_engine() -> None:
    import torch

    from tensorsink.bench.environment import describe
    from tensorsink.bench.report import header

    environment = describe(Path("/tmp"), torch.device("cpu"))
    config = {"format": "npy", "dict_mode": "single", "workers": 4, "backend": "auto", "device": "cpu",
              "rounds": 3}  # fmt: skip
    assert f"write engine: {environment['engine']}" in header(environment, config)
    assert str(environment["engine"]).startswith(("native (C threads)", "python ("))
