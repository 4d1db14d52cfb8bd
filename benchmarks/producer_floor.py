"""What the producer loop pays for the least a Python-side writer must do per step.

`tensorsink bench --workload producer` compares tensorsink with no writer at all. This puts floors
between the two, in the same loop (`produce`), interleaved round by round:

- noop: the sink is a Python function that does nothing (the price of one call, cold);
- future: the sink makes a concurrent.futures.Future, as any write() that returns one must;
- future + thread: the Future goes through a queue to a second Python thread that completes it, the
  least a writer does whose completion runs in Python;
- plan only: tensorsink's own checks and planning of the write (validate_key, plan_files), no writer;
- tensorsink: AsyncWriter.write.

Each line gives the step ratio (no writer's median step over this one's: 1.00 is untouched) and the
sink call's median. The last lines time the same planning in a tight loop, where the caches are warm:
the ratio between the two is how much colder a call is right after the producer's GIL-free wait.

    python benchmarks/producer_floor.py --ops 20 --wait-us 1000
    python benchmarks/producer_floor.py --ops 50 --wait-us 300
"""

from __future__ import annotations

import argparse
import queue
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path

import torch

from tensorsink import AsyncWriter
from tensorsink.bench.producer import outputs_for, produce
from tensorsink.bench.workloads import Workload
from tensorsink.formats import format_for
from tensorsink.options import DictMode, SaveFormat
from tensorsink.plan import plan_files, validate_key

Sink = Callable[[int, torch.Tensor], object]
_FORMAT = format_for(SaveFormat.SAFETENSORS, None)


def _plan(step: int, output: torch.Tensor) -> object:
    return plan_files("/nowhere", validate_key(f"p/{step}"), output, _FORMAT, DictMode.SINGLE)


@contextmanager
def _sink(kind: str, root: Path) -> Iterator[Sink | None]:
    if kind == "none":
        yield None
    elif kind == "noop":
        yield lambda step, output: None
    elif kind == "future":
        yield lambda step, output: Future()
    elif kind == "future + thread":
        handoff: queue.SimpleQueue[Future[None] | None] = queue.SimpleQueue()

        def complete() -> None:
            while (future := handoff.get()) is not None:
                future.set_result(None)

        thread = threading.Thread(target=complete)
        thread.start()
        try:
            yield lambda step, output: handoff.put(Future())
        finally:
            handoff.put(None)
            thread.join()
    elif kind == "plan only":
        yield _plan
    else:
        shutil.rmtree(root, ignore_errors=True)
        with AsyncWriter(root, "safetensors", durability="none") as writer:
            yield lambda step, output: writer.write(f"p/{step}", output)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ops", type=int, default=20)
    parser.add_argument("--wait-us", type=int, default=1000)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    workload = Workload("producer", 64 << 10, args.count, producer=True, ops=args.ops, wait_us=args.wait_us)
    outputs = outputs_for(workload)
    kinds = ["none", "noop", "future", "future + thread", "plan only", "tensorsink"]
    steps: dict[str, list[float]] = {kind: [] for kind in kinds}
    calls: dict[str, list[float]] = {kind: [] for kind in kinds}
    with tempfile.TemporaryDirectory(dir="/dev/shm") as scratch:
        for round_ in range(args.rounds + 1):  # the first round warms up
            for kind in kinds:
                with _sink(kind, Path(scratch) / "out") as sink:
                    step_seconds, call_seconds = produce(workload, outputs, sink)
                if round_:
                    steps[kind].append(statistics.median(step_seconds))
                    calls[kind].append(statistics.median(call_seconds) if call_seconds else 0.0)
    base = statistics.median(steps["none"])
    print(f"{args.ops} ops + {args.wait_us} us wait, 64 KiB outputs; medians of {args.rounds} rounds")
    print(f"  {'sink':18s} {'step us':>8s} {'ratio':>6s} {'call p50 us':>12s}")
    for kind in kinds:
        step = statistics.median(steps[kind])
        print(
            f"  {kind:18s} {step * 1e6:8.0f} {base / step:6.3f} {statistics.median(calls[kind]) * 1e6:12.1f}"
        )
    warm = []
    for step in range(args.count):
        began = time.perf_counter()
        _plan(step, outputs[step % len(outputs)])
        warm.append(time.perf_counter() - began)
    cold, warm_median = statistics.median(calls["plan only"]), statistics.median(warm)
    print(
        f"  plan only in a tight loop: {warm_median * 1e6:.1f} us; in the loop {cold / warm_median:.1f}x that"
    )


if __name__ == "__main__":
    main()
