"""Python's share of the write path off the caller's thread, and write_batch's cost per sample.

- Python function calls on threads other than the caller's, per file (a threading.setprofile hook),
  for 2,000 x 16 KiB safetensors in memory, durability none, with each engine: the ready route of the
  native engine completes in C, so only the reaper's periodic wake-ups show.
- The caller's time per sample of write_batch() of 64 x 16 KiB samples (a new folder each batch),
  with the writer idle at each call and with batches back to back.

    python benchmarks/thread_calls.py
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from types import FrameType
from typing import Any

import torch

from tensorsink import AsyncWriter

FILES = 2000


def calls_off_the_caller(engine: str) -> float:
    """Python calls made on other threads, per file written."""
    caller, counted = threading.current_thread(), [0]

    def count(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call" and threading.current_thread() is not caller:
            counted[0] += 1

    value = torch.randn(4096)
    with tempfile.TemporaryDirectory(dir="/dev/shm") as root:
        threading.setprofile(count)  # threads started from here on: the writer's
        try:
            with AsyncWriter(root, "safetensors", durability="none", engine=engine) as writer:
                for i in range(FILES):
                    writer.write(f"k{i}", value)
        finally:
            threading.setprofile(None)  # type: ignore[arg-type]
    return counted[0] / FILES


def batch_seconds_per_sample(*, idle: bool, rounds: int = 60, samples: int = 64) -> float:
    """The caller's time per sample of write_batch(); with `idle`, the writer has finished the batch
    before (flush() between calls, untimed), else the batches come back to back and the writer's
    threads share the cores with the caller."""
    batch = torch.randn(samples, 4096)
    keys = [[f"b{b}/{i}" for i in range(samples)] for b in range(rounds)]
    times = []
    with (
        tempfile.TemporaryDirectory(dir="/dev/shm") as root,
        AsyncWriter(root, "safetensors", durability="none") as writer,
    ):
        for b in range(rounds):
            if idle:
                writer.flush()
            began = time.perf_counter()
            writer.write_batch(keys[b], batch)
            times.append((time.perf_counter() - began) / samples)
    return statistics.median(times)


def main() -> None:
    for engine in ("native", "python"):
        print(f"{engine}: Python calls on other threads per file: {calls_off_the_caller(engine):.3f}")
    for idle in (True, False):
        per_sample = batch_seconds_per_sample(idle=idle) * 1e6
        when = "the writer idle at each call" if idle else "batches back to back"
        print(f"write_batch of 64 x 16 KiB, {when}: caller's time per sample, median {per_sample:.1f} us")


if __name__ == "__main__":
    main()
