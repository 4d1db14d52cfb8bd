"""Interleaved measurement: every contender, round after round, in the same process and folder."""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO, TypeVar

import numpy as np
import torch

from ..options import Backend, DictMode, Durability, SaveFormat
from .contenders import Contender, Sample, contenders_for
from .producer import ProducerContender, ProducerSample, outputs_for, producer_contenders
from .workloads import Item, Workload, item_bytes

__all__ = ["BenchConfig", "ProducerRow", "Progress", "Row", "measure", "measure_producer", "output_folder"]


@dataclass(frozen=True)
class BenchConfig:
    workloads: Sequence[Workload]
    durabilities: Sequence[Durability] = (Durability.NONE, Durability.FILE, Durability.FULL)
    save_format: SaveFormat = SaveFormat.SAFETENSORS
    dict_mode: DictMode = DictMode.SINGLE
    workers: int = 4
    backend: Backend = Backend.AUTO
    rounds: int = 3
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"rounds must be at least 1, got {self.rounds}")
        if not self.workloads or not self.durabilities:
            raise ValueError("a benchmark needs at least one workload and one durability")

    def as_dict(self) -> dict[str, Any]:
        return {
            "workloads": [asdict(w) for w in self.workloads],
            "durabilities": [d.value for d in self.durabilities],
            "format": self.save_format.value,
            "dict_mode": self.dict_mode.value,
            "workers": self.workers,
            "backend": self.backend.value,
            "rounds": self.rounds,
            "device": str(self.device),
        }


@dataclass(frozen=True)
class Row:
    """One contender's figures on one workload at one durability: medians over the rounds."""

    workload: str
    durability: str
    contender: str
    kind: str
    items: int
    files: int
    bytes: int
    seconds: list[float]
    median_seconds: float
    gb_per_s: float
    files_per_s: float
    #: The caller's time inside its per-item calls (all of it, for a contender that writes inline).
    blocked_seconds: float
    call_p50_us: float | None
    call_p99_us: float | None
    x_ceiling: float
    backend: str | None


@dataclass(frozen=True)
class ProducerRow:
    """One contender's figures on a producer workload: medians over the rounds (`_us` in microseconds)."""

    workload: str
    durability: str
    contender: str
    kind: str
    steps: int
    ops: int
    wait_us: int
    item_size: int
    #: Files written in the round that wrote fewest (0 for the baseline).
    files: int
    #: Each round's median step.
    step_us: list[float]
    median_step_us: float
    #: Over every step of every round: the stalls a median does not show.
    step_p99_us: float
    #: The headline: the median step over the baseline's; 1.0 means the writer costs the loop nothing.
    step_ratio: float
    #: The whole loop (the sum of its steps), and its ratio to the baseline's: what the stalls add up to.
    loop_seconds: float
    loop_ratio: float
    #: The write() call (tensorsink) or the submit call (the pool); None for the baseline.
    call_p50_us: float | None
    call_p99_us: float | None
    #: Files over the loop and the drain together; None for the baseline.
    files_per_s: float | None
    #: From the last step to the last file committed, apart from the steps; None for the baseline.
    drain_seconds: float | None
    backend: str | None


class Progress:
    """A tqdm bar on a terminal; plain lines, one per finished round, in a batch job's log."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._bar: Any = None

    def start(self, total: int) -> None:
        self.close()
        if self._stream.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self._bar = tqdm(total=total, unit="run", file=self._stream, leave=False)

    def step(self, label: str) -> None:
        if self._bar is not None:
            self._bar.set_description(label, refresh=False)
            self._bar.update()

    def line(self, text: str) -> None:
        if self._bar is None:
            print(text, file=self._stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


@contextmanager
def output_folder(out: Path | None) -> Iterator[Path]:
    """A temporary folder inside `out` (default: the current folder), removed with all it holds.

    `out` is created if needed (with its missing parents); what was created is removed again, if the
    bench left it empty. A folder that was there before is left as it was.
    """
    base = Path.cwd() if out is None else out
    created = [folder for folder in (base, *base.parents) if not folder.exists()]  # deepest first
    base.mkdir(parents=True, exist_ok=True)
    try:
        folder = Path(tempfile.mkdtemp(prefix="tensorsink-bench-", dir=base))
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        for made in created:
            try:
                made.rmdir()
            except OSError:  # not empty (something else wrote there) or already gone
                break


def _count_files(root: Path) -> int:
    """The outputs under `root`: no temporary, and nothing in a hidden folder (the journals)."""
    count = 0
    for _, folders, files in os.walk(root):
        folders[:] = [name for name in folders if not name.startswith(".")]
        count += len([name for name in files if not name.startswith(".")])
    return count


def _timed(
    contender: Contender, folder: Path, items: Sequence[Item], durability: Durability
) -> tuple[Sample, int]:
    root = Path(tempfile.mkdtemp(prefix="run-", dir=folder))
    try:
        sample = contender.run(root, items, durability)
        return sample, _count_files(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


_C = TypeVar("_C")


def _rotated(contenders: Sequence[_C], round_: int) -> list[_C]:
    """The contenders in this round's order: each round starts one further on, so no contender is
    always first (a cold cache) or always last."""
    shift = round_ % len(contenders)
    return [*contenders[shift:], *contenders[:shift]]


def _ceiling_seconds(medians: dict[str, float], contenders: Sequence[Contender]) -> float:
    """The fastest bare loop; on a GPU no faster than the pinned copies that must come first."""
    disk = min(medians[c.name] for c in contenders if c.kind == "ceiling" and "bare loop" in c.name)
    copies = [medians[c.name] for c in contenders if c.kind == "ceiling" and "bare loop" not in c.name]
    return max([disk, *copies])


def _timed_producer(
    contender: ProducerContender,
    folder: Path,
    workload: Workload,
    outputs: Sequence[torch.Tensor],
    durability: Durability,
) -> tuple[ProducerSample, int]:
    root = Path(tempfile.mkdtemp(prefix="run-", dir=folder))
    try:
        sample = contender.run(root, workload, outputs, durability)
        return sample, _count_files(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def measure(config: BenchConfig, folder: Path, progress: Progress) -> list[Row]:
    """Run every workload at every durability, contenders rotated each round; one Row per contender."""
    rows: list[Row] = []
    workloads = [w for w in config.workloads if not w.producer]
    if not workloads:
        return rows
    contenders = contenders_for(
        config.save_format, config.dict_mode, config.workers, config.backend, config.device
    )
    passes = len(config.durabilities) * config.rounds + 1  # + the warm-up
    progress.start(len(workloads) * passes * len(contenders))
    for workload in workloads:
        items = workload.items(config.device)
        total = sum(item_bytes(item) for item in items)
        for contender in contenders:  # warm-up, not counted: first-touch page faults, caches, imports
            progress.step(f"{workload.name} | warm-up | {contender.name}")
            _timed(contender, folder, items, config.durabilities[0])
        for durability in config.durabilities:
            samples: dict[str, list[Sample]] = {c.name: [] for c in contenders}
            files: dict[str, int] = {}
            label = f"{workload.name} | {durability.value}"
            started = time.perf_counter()
            for round_ in range(config.rounds):
                for contender in _rotated(contenders, round_):
                    progress.step(f"{label} | {contender.name}")
                    sample, count = _timed(contender, folder, items, durability)
                    samples[contender.name].append(sample)
                    files.setdefault(contender.name, count)
                elapsed = time.perf_counter() - started
                progress.line(f"{label}: round {round_ + 1}/{config.rounds} done ({elapsed:.1f} s)")
            medians = {name: statistics.median(s.seconds for s in runs) for name, runs in samples.items()}
            ceiling = _ceiling_seconds(medians, contenders)
            for contender in contenders:
                runs = samples[contender.name]
                median = medians[contender.name]
                calls = [c for s in runs for c in s.call_seconds]
                blocked = statistics.median(
                    sum(s.call_seconds) if s.call_seconds else s.seconds for s in runs
                )
                p50, p99 = (np.percentile(calls, [50, 99]) * 1e6).tolist() if calls else (None, None)
                rows.append(
                    Row(
                        workload=workload.name,
                        durability=durability.value,
                        contender=contender.name,
                        kind=contender.kind,
                        items=len(items),
                        files=files[contender.name],
                        bytes=total,
                        seconds=[s.seconds for s in runs],
                        median_seconds=median,
                        gb_per_s=total / median / 1e9,
                        files_per_s=files[contender.name] / median,
                        blocked_seconds=blocked,
                        call_p50_us=p50,
                        call_p99_us=p99,
                        x_ceiling=ceiling / median,
                        backend=runs[-1].backend,
                    )
                )
    return rows


def measure_producer(config: BenchConfig, folder: Path, progress: Progress) -> list[ProducerRow]:
    """Run every producer workload at the first durability, contenders rotated each round."""
    rows: list[ProducerRow] = []
    workloads = [w for w in config.workloads if w.producer]
    if not workloads:
        return rows
    contenders = producer_contenders(config.save_format, config.dict_mode, config.workers, config.backend)
    durability = config.durabilities[0]  # a producer run is long; one durability is its story
    progress.start(len(workloads) * (config.rounds + 1) * len(contenders))
    for workload in workloads:
        outputs = outputs_for(workload)
        for contender in contenders:  # warm-up, not counted: page faults, the writers' threads, imports
            progress.step(f"{workload.name} | warm-up | {contender.name}")
            _timed_producer(contender, folder, workload, outputs, durability)
        samples: dict[str, list[ProducerSample]] = {c.name: [] for c in contenders}
        files: dict[str, list[int]] = {c.name: [] for c in contenders}
        label = f"{workload.name} | {durability.value}"
        started = time.perf_counter()
        for round_ in range(config.rounds):
            for contender in _rotated(contenders, round_):
                progress.step(f"{label} | {contender.name}")
                sample, count = _timed_producer(contender, folder, workload, outputs, durability)
                samples[contender.name].append(sample)
                files[contender.name].append(count)
            elapsed = time.perf_counter() - started
            progress.line(f"{label}: round {round_ + 1}/{config.rounds} done ({elapsed:.1f} s)")
        baseline = next(c for c in contenders if c.kind == "baseline")
        base = samples[baseline.name]
        for contender in contenders:
            rows.append(
                _producer_row(
                    workload, durability, contender, samples[contender.name], files[contender.name], base
                )
            )
    return rows


def _producer_row(
    workload: Workload,
    durability: Durability,
    contender: ProducerContender,
    runs: Sequence[ProducerSample],
    files: Sequence[int],
    baseline: Sequence[ProducerSample],
) -> ProducerRow:
    """One contender's rounds, reduced: medians over the rounds, ratios to the baseline's medians."""
    base_step = statistics.median(statistics.median(s.step_seconds) for s in baseline)
    base_loop = statistics.median(sum(s.step_seconds) for s in baseline)
    step_medians = [statistics.median(s.step_seconds) for s in runs]
    median_step = statistics.median(step_medians)
    loop = statistics.median(sum(s.step_seconds) for s in runs)
    calls = [c for s in runs for c in s.call_seconds]
    p50, p99 = (np.percentile(calls, [50, 99]) * 1e6).tolist() if calls else (None, None)
    drains = [s.drain_seconds for s in runs if s.drain_seconds is not None]
    rates = [
        count / (sum(s.step_seconds) + (s.drain_seconds or 0.0)) for s, count in zip(runs, files, strict=True)
    ]
    return ProducerRow(
        workload=workload.name,
        durability=durability.value,
        contender=contender.name,
        kind=contender.kind,
        steps=workload.count,
        ops=workload.ops,
        wait_us=workload.wait_us,
        item_size=workload.item_size,
        files=min(files),
        step_us=[m * 1e6 for m in step_medians],
        median_step_us=median_step * 1e6,
        step_p99_us=float(np.percentile([t for s in runs for t in s.step_seconds], 99) * 1e6),
        step_ratio=median_step / base_step,
        loop_seconds=loop,
        loop_ratio=loop / base_loop,
        call_p50_us=p50,
        call_p99_us=p99,
        files_per_s=statistics.median(rates) if contender.kind != "baseline" else None,
        drain_seconds=statistics.median(drains) if drains else None,
        backend=runs[-1].backend,
    )
