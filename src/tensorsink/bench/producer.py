"""The producer workload: how much a writer slows the launch-bound loop it serves.

A step is `ops` tiny torch ops on the caller's thread (what a launch-bound step spends its CPU on), a
GIL-free wait standing in for the device's time, then one write of that step's output. Without a writer
the same loop is the baseline; the step ratio is a writer's median step over the baseline's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..options import Backend, DictMode, Durability, SaveFormat
from ..writer import AsyncWriter
from .contenders import SAVERS, PoolWriter, Saver
from .workloads import Workload

__all__ = ["ROTATION", "ProducerContender", "ProducerSample", "outputs_for", "produce", "producer_contenders"]

#: Outputs handed out in turn: distinct tensor objects with distinct contents, made before timing and
#: never modified, so no writer can skip work and none of them is rewritten while a write may hold it.
ROTATION = 8
#: Elements of the tensor the ops work on: few enough that an op costs its dispatch, not its arithmetic.
_OP_ELEMENTS = 256

Sink = Callable[[int, torch.Tensor], object]


@dataclass(frozen=True)
class ProducerSample:
    """One timed loop: each step's seconds, each write call's (none without a writer), then the drain."""

    step_seconds: list[float]
    call_seconds: list[float] = field(default_factory=list)
    #: From the last step to the last file committed (flush/close); not part of any step.
    drain_seconds: float | None = None
    #: Which backend carried the bytes, where the contender can tell.
    backend: str | None = None


@dataclass(frozen=True)
class ProducerContender:
    name: str
    kind: str  # "baseline", "tensorsink" or "peer"
    run: Callable[[Path, Workload, Sequence[torch.Tensor], Durability], ProducerSample]


def producer_contenders(
    save_format: SaveFormat, dict_mode: DictMode, workers: int, backend: Backend
) -> list[ProducerContender]:
    """The loop without a writer first (the baseline), then tensorsink and the usual thread pool."""
    return [
        ProducerContender("baseline: no writer", "baseline", _no_writer),
        ProducerContender(
            f"tensorsink {save_format.value}",
            "tensorsink",
            _tensorsink(save_format, dict_mode, workers, backend),
        ),
        ProducerContender(
            f"peer: thread pool + {save_format.value}", "peer", _thread_pool(SAVERS[save_format])
        ),
    ]


def outputs_for(workload: Workload) -> list[torch.Tensor]:
    """The outputs the steps hand out in turn: float32 CPU tensors of the workload's item size."""
    generator = torch.Generator().manual_seed(0)
    count = min(ROTATION, workload.count)
    return [torch.rand(max(1, workload.item_size // 4), generator=generator) for _ in range(count)]


def produce(
    workload: Workload, outputs: Sequence[torch.Tensor], sink: Sink | None
) -> tuple[list[float], list[float]]:
    """Run the workload's steps on this thread, handing step i's output to `sink(i, output)`.

    Returns each step's seconds and each sink call's; a step's time includes its sink call.
    """
    clock = time.perf_counter
    seed = torch.ones(_OP_ELEMENTS)
    # The device's time. time.sleep is clock_nanosleep with the GIL released, as a blocking device sync
    # releases it; a timed Event.wait (a condition variable) was no sharper here and noisier. Both wake
    # late by the kernel's timer slack and a wake-up, some 50-100 us at 1 ms, with no coarser granularity:
    # the baseline carries the same delay, so the ratio is unbiased, and the table shows the steps obtained.
    wait = workload.wait_us / 1e6
    steps: list[float] = []
    calls: list[float] = []
    for step in range(workload.count):
        began = clock()
        x = seed
        for op in range(workload.ops):
            x = x * 1.0001 if op % 2 == 0 else x + 1e-6  # one dispatch each, as a kernel launch would be
        if wait:
            time.sleep(wait)
        if sink is not None:
            called = clock()
            sink(step, outputs[step % len(outputs)])
            calls.append(clock() - called)
        steps.append(clock() - began)
    return steps, calls


def _no_writer(
    root: Path, workload: Workload, outputs: Sequence[torch.Tensor], durability: Durability
) -> ProducerSample:
    steps, _ = produce(workload, outputs, None)
    return ProducerSample(steps)


def _tensorsink(
    save_format: SaveFormat, dict_mode: DictMode, workers: int, backend: Backend
) -> Callable[[Path, Workload, Sequence[torch.Tensor], Durability], ProducerSample]:
    def run(
        root: Path, workload: Workload, outputs: Sequence[torch.Tensor], durability: Durability
    ) -> ProducerSample:
        with AsyncWriter(
            root, save_format, dict_mode, workers, durability=durability, backend=backend
        ) as writer:
            steps, calls = produce(workload, outputs, lambda step, output: writer.write(f"p/{step}", output))
            began = time.perf_counter()
            writer.close()
            drain = time.perf_counter() - began
        by_backend = writer.stats().bytes_by_backend
        used = "+".join(sorted(k for k, v in by_backend.items() if v)) or None
        return ProducerSample(steps, calls, drain, used)

    return run


def _thread_pool(
    save: Saver,
) -> Callable[[Path, Workload, Sequence[torch.Tensor], Durability], ProducerSample]:
    def run(
        root: Path, workload: Workload, outputs: Sequence[torch.Tensor], durability: Durability
    ) -> ProducerSample:
        folder = root / "p"
        folder.mkdir()
        with PoolWriter(save, folder, durability) as writer:
            steps, calls = produce(workload, outputs, writer.write)
            began = time.perf_counter()
            writer.close()
            drain = time.perf_counter() - began
        return ProducerSample(steps, calls, drain)

    return run
