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
from typing import Any, TextIO

import numpy as np
import torch

from ..options import Backend, DictMode, Durability, SaveFormat
from .contenders import Contender, Sample, contenders_for
from .workloads import Item, Workload, item_bytes

__all__ = ["BenchConfig", "Progress", "Row", "measure", "output_folder"]


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


class Progress:
    """A tqdm bar on a terminal; plain lines, one per finished round, in a batch job's log."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._bar: Any = None

    def start(self, total: int) -> None:
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


@contextmanager
def output_folder(out: Path | None) -> Iterator[Path]:
    """`out` (created if needed, left in place), or a temporary folder in the current one, removed."""
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        yield out
        return
    folder = Path(tempfile.mkdtemp(prefix="tensorsink-bench-", dir=Path.cwd()))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _count_files(root: Path) -> int:
    return sum(len([f for f in files if not f.startswith(".")]) for _, _, files in os.walk(root))


def _timed(
    contender: Contender, folder: Path, items: Sequence[Item], durability: Durability
) -> tuple[Sample, int]:
    root = Path(tempfile.mkdtemp(prefix="run-", dir=folder))
    try:
        sample = contender.run(root, items, durability)
        return sample, _count_files(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _ceiling_seconds(medians: dict[str, float], contenders: Sequence[Contender]) -> float:
    """The fastest bare loop; on a GPU no faster than the pinned copies that must come first."""
    disk = min(medians[c.name] for c in contenders if c.kind == "ceiling" and "bare loop" in c.name)
    copies = [medians[c.name] for c in contenders if c.kind == "ceiling" and "bare loop" not in c.name]
    return max([disk, *copies])


def measure(config: BenchConfig, folder: Path, progress: Progress) -> list[Row]:
    """Run every workload at every durability, contenders rotated each round; one Row per contender."""
    rows: list[Row] = []
    contenders = contenders_for(
        config.save_format, config.dict_mode, config.workers, config.backend, config.device
    )
    passes = len(config.durabilities) * config.rounds + 1  # + the warm-up
    progress.start(len(config.workloads) * passes * len(contenders))
    for workload in config.workloads:
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
                shift = round_ % len(contenders)
                for contender in contenders[shift:] + contenders[:shift]:
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
