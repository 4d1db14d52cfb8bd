"""What each engine design costs the producer per file: the measurement behind the native engine.

A write engine off the interpreter can be threads in a C extension (the native engine) or a writer
process fed through shared memory (torch.distributed.checkpoint's PROCESS mode, nvidia-resiliency-ext).
Both leave the file I/O to someone else; they differ in what the producer's thread itself pays per
file. This times, interleaved, on the caller's thread, for one output of `--size` bytes:

- native: `write()` into an AsyncWriter on the native engine (everything the caller does per file);
- process, minimum: what a process design cannot avoid on the caller: copying the payload into a
  shared-memory slot, and one small message on a pipe to the writer process (no pickling, no queue
  feeder thread: the cheapest such design, not a full one);
- python engine: `write()` on the pure-Python engine, for reference.

    python benchmarks/engine_choice.py --size 64KiB --count 2000 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import tempfile
import time
from multiprocessing import shared_memory

import torch

from tensorsink import AsyncWriter
from tensorsink.bench.workloads import parse_size


def native_or_python(engine: str, root: str, tensors: list[torch.Tensor], count: int) -> list[float]:
    calls = []
    with AsyncWriter(root, "safetensors", durability="none", engine=engine) as writer:
        for i in range(count):
            start = time.perf_counter()
            writer.write(f"e/{i}", tensors[i % len(tensors)])
            calls.append(time.perf_counter() - start)
    return calls


def process_minimum(tensors: list[torch.Tensor], count: int) -> list[float]:
    size = tensors[0].numel() * tensors[0].element_size()
    slots = 64
    memory = shared_memory.SharedMemory(create=True, size=size * slots)
    reader, writer = os.pipe()
    drained = 0
    calls = []
    try:
        view = memory.buf
        for i in range(count):
            start = time.perf_counter()
            slot = i % slots
            source = tensors[i % len(tensors)].reshape(-1).view(torch.uint8).numpy()
            view[slot * size : (slot + 1) * size] = source.data  # the payload copy into shared memory
            os.write(writer, struct.pack("<QQ48s", slot, size, f"e/{i}".encode()))  # one message
            calls.append(time.perf_counter() - start)
            if i % slots == slots - 1:  # stand-in for the writer process consuming messages
                drained += len(os.read(reader, 64 * slots))
    finally:
        os.close(reader)
        os.close(writer)
        del view
        memory.close()
        memory.unlink()
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("64KiB"))
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="/dev/shm")
    args = parser.parse_args()
    tensors = [torch.randn(args.size // 4) for _ in range(8)]
    results: dict[str, list[float]] = {"native": [], "process, minimum": [], "python engine": []}
    for round_ in range(args.rounds + 1):  # the first round warms up and is not counted
        for name in list(results)[round_ % 3 :] + list(results)[: round_ % 3]:
            with tempfile.TemporaryDirectory(dir=args.out) as root:
                if name == "process, minimum":
                    calls = process_minimum(tensors, args.count)
                else:
                    calls = native_or_python(name.split()[0], root, tensors, args.count)
            if round_:
                results[name].append(statistics.median(calls))
    print(f"per-file cost on the caller's thread, {args.size:,} bytes, median of {args.rounds} rounds:")
    for name, medians in results.items():
        print(f"  {name:18s} {statistics.median(medians) * 1e6:8.1f} us")


if __name__ == "__main__":
    main()
