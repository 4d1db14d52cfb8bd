"""CUDA staging on a real GPU (marker `gpu`; skipped without CUDA).

A test that claims an ordering makes it observable: the value is produced into a poisoned buffer by a
copy or kernel queued behind a long sleep on the producer's stream, the test checks that the producer
is still busy when write() is called and when it returns, and the file must hold the produced bytes,
not the poison. Each test draws its own data (a seed taken from its node id), so a block left by an
earlier test cannot hold the expected bytes. These writers use backend="posix": the pinned path is
what is tested here, on a GDS host too (tests/test_gds.py tests kvikio's).
"""

from __future__ import annotations

import functools
import gc
import json
import math
import os
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import tensorsink
from tensorsink import AsyncWriter, SaveFormat
from tests.support import GatedFormat, assert_same, random_tensor, read_back, wait_for_waiter

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
POISON = 0xAB
#: Where a child process finds this checkout's package.
SRC = str(Path(tensorsink.__file__).resolve().parent.parent)

# Building blocks of the tests below and of tests/test_gds.py.


def seed_of(request: pytest.FixtureRequest) -> int:
    """A seed of the test's own (its node id's CRC), so no two tests draw the same data."""
    return zlib.crc32(request.node.nodeid.encode())


def report(request: pytest.FixtureRequest, name: str, value: object) -> None:
    """A figure of the test: printed, and a property of its JUnit XML record."""
    request.node.user_properties.append((name, value))
    print(f"{request.node.name}: {name} = {value}")


def warm_the_clock(seconds: float = 0.5) -> None:
    """Keep the GPU busy with 4096 x 4096 matmuls for about `seconds`, queued on the current stream.

    torch.cuda._sleep counts SM clock cycles, and the SM clock moves with load (345-1980 MHz on an
    H200): cycles counted at an idle clock would make every later sleep several times shorter than
    asked once the clock is up, and the still-busy checks would fail falsely."""
    a = torch.randn(4096, 4096, device="cuda")
    b = torch.empty_like(a)
    began = time.perf_counter()
    while time.perf_counter() - began < seconds:
        for _ in range(8):
            torch.matmul(a, a, out=b)
        torch.cuda.current_stream().synchronize()


def sleep_rates(*, warm: bool, cycles: int = 100_000_000, repeats: int = 3) -> list[float]:
    """SM cycles per second that torch.cuda._sleep counts, timed `repeats` times with events on a
    side stream; with `warm`, right behind warm_the_clock's matmuls, so the clock is at its load
    rate (gpu_smoke.py also reports the idle rate)."""
    stream = torch.cuda.Stream()
    rates = []
    with torch.cuda.stream(stream):
        torch.cuda._sleep(1_000_000)  # loads the kernel
        stream.synchronize()
        if warm:
            warm_the_clock()
        for _ in range(repeats):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record(stream)
            torch.cuda._sleep(cycles)
            end.record(stream)
            end.synchronize()
            rates.append(cycles / (start.elapsed_time(end) / 1e3))
    return rates


@functools.cache
def cycles_per_second() -> float:
    """Clock cycles per second of torch.cuda._sleep on this GPU under load: the fastest of three
    timings after warm matmuls, so that later sleeps last at least as long as asked (a lower clock
    later only makes them longer)."""
    rates = sleep_rates(warm=True)
    print(f"torch.cuda._sleep calibrated at {[round(r / 1e6) for r in rates]} MHz (warm); taking the most")
    return max(rates)


@pytest.fixture(scope="session", autouse=True)
def sleep_clock_property(record_testsuite_property: Callable[[str, object], None]) -> Iterator[None]:
    """The calibrated sleep rate, as a property of the JUnit test suite (once, if a test calibrated)."""
    yield
    if cycles_per_second.cache_info().currsize:
        record_testsuite_property("sleep_cycles_per_s", round(cycles_per_second()))


def busy(stream: torch.cuda.Stream, seconds: float) -> None:
    """Keep `stream` busy for about `seconds` (a spinning kernel) before what is queued next."""
    cycles = int(seconds * cycles_per_second())
    with torch.cuda.stream(stream):
        torch.cuda._sleep(cycles)


def still_busy(stream: torch.cuda.Stream, when: str) -> None:
    assert not stream.query(), (
        f"the producer was idle {when}: the test proves nothing, or write() waited{_calibration()}"
    )


def _calibration() -> str:
    """What the sleeps were calibrated at, for a failure's message (nothing if they were not)."""
    if not cycles_per_second.cache_info().currsize:
        return ""
    return f" (sleeps calibrated at {cycles_per_second() / 1e6:.0f} MHz)"


def poisoned(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A contiguous CUDA tensor whose every byte is POISON."""
    count = math.prod(shape) * dtype.itemsize
    return torch.full((count,), POISON, dtype=torch.uint8, device="cuda").view(dtype).view(shape)


def pattern(nbytes: int, seed: int) -> torch.Tensor:
    """`nbytes` bytes of a seeded integer hash, made on the device (fast for large sizes)."""
    x = torch.arange(nbytes, dtype=torch.int64, device="cuda") + (seed % 1_000_003) * 0x9E3779B1
    x = x * 0x5851F42D4C957F2D
    x = x ^ (x >> 29)
    x = x * 0x2545F4914F6CDD1D
    return ((x >> 32) & 0xFF).to(torch.uint8)


def late(stream: torch.cuda.Stream, target: torch.Tensor, source: torch.Tensor, seconds: float) -> None:
    """Queue on `stream` a sleep of about `seconds`, then target.copy_(source): until then `target`
    holds what it held before (poison), which is what a copy not ordered after `stream` reads."""
    cycles = int(seconds * cycles_per_second())
    stream.wait_stream(torch.cuda.current_stream())  # after whatever made `source` and `target`
    source.record_stream(stream)  # both were made on another stream, and outlive this call there
    target.record_stream(stream)
    with torch.cuda.stream(stream):
        torch.cuda._sleep(cycles)
        target.copy_(source)


def late_tensor(
    stream: torch.cuda.Stream, shape: tuple[int, ...], dtype: torch.dtype, seed: int, seconds: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor]:
    """A CUDA tensor that `stream` fills with seeded random bytes after a sleep, and those bytes on
    the host."""
    expected = random_tensor(shape, dtype, seed)
    source = expected.cuda()
    target = poisoned(shape, dtype)
    torch.cuda.synchronize()
    late(stream, target, source, seconds)
    return target, expected


def run_child(code: str, *args: str, timeout: float = 180) -> dict[str, Any]:
    """Run `code` in a fresh Python process (this checkout's package first on its path); the JSON
    object it prints last."""
    path = os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p)
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        env=dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1"),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"the child failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    found: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return found


WriterFactory = Callable[..., AsyncWriter]


def check_source_is_kept_alive(
    root: Path, seed: int, make_writer: WriterFactory, save_format: SaveFormat
) -> None:
    """write(x), `del x`, then a tensor of the same size made and filled on the same stream at once:
    the caching allocator hands out x's block again unless the writer still holds it (or recorded
    its use on another stream), and the file would then hold the second tensor's bytes."""
    nbytes = 64 << 20  # copying it takes milliseconds, filling the second one microseconds
    with make_writer(root, save_format) as writer:
        producer = torch.cuda.Stream()
        first, second = pattern(nbytes, seed), pattern(nbytes, seed + 1)
        expected = first.cpu()
        torch.cuda.synchronize()
        with torch.cuda.stream(producer):
            busy(producer, 0.3)
            value = torch.empty(nbytes, dtype=torch.uint8, device="cuda")  # from the producer's pool
            value.copy_(first)
            address = value.data_ptr()
            still_busy(producer, "at write()")
            future = writer.write("kept", value)
            del value
            again = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
            again.copy_(second)
            still_busy(producer, "after the second tensor was queued")
            reused = again.data_ptr() == address
        (path,) = future.result()
        torch.cuda.synchronize()
    stored = read_back(path, save_format)
    assert_same(stored["arr_0"] if isinstance(stored, dict) else stored, expected)
    assert not reused, "the written tensor's block was handed out again while the write needed it"


def check_copy_under_a_graph_replay(
    root: Path, seed: int, make_writer: WriterFactory, save_format: SaveFormat
) -> None:
    """copy=True on a CUDA graph's static output, replayed again at once after each write()."""
    elements, steps = 1 << 18, 6
    # under 2**27, so that x * 3 + 7 cannot overflow
    inputs = [pattern(elements * 4, seed + i).view(torch.int32) >> 4 for i in range(steps)]
    static_in = torch.zeros(elements, dtype=torch.int32, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up before capture, as torch.cuda.graphs asks
        for _ in range(3):
            static_in * 3 + 7
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = static_in * 3 + 7
    static_out.fill_(-1)
    torch.cuda.synchronize()
    expected = [x.cpu() * 3 + 7 for x in inputs]
    producer = torch.cuda.Stream()
    futures = []
    with make_writer(root, save_format) as writer:
        with torch.cuda.stream(producer):
            busy(producer, 0.4)
            for step, x in enumerate(inputs):
                static_in.copy_(x)
                graph.replay()  # on the current stream: overwrites static_out
                still_busy(producer, f"at write() {step}")
                future = writer.write(f"g{step}", static_out, copy=True)
                assert future.staged(), "copy=True lets the caller overwrite the output at once"
                futures.append(future)
            still_busy(producer, "after the last write()")
        paths = [future.result()[0] for future in futures]
    torch.cuda.synchronize()
    for path, values in zip(paths, expected, strict=True):
        stored = read_back(path, save_format)
        assert_same(stored["arr_0"] if isinstance(stored, dict) else stored, values)


def check_a_waiting_worker_sleeps(
    request: pytest.FixtureRequest, root: Path, make_writer: WriterFactory, value: torch.Tensor
) -> None:
    """A worker waiting for a long kernel sleeps (blocking-sync events): the process uses little CPU
    over about a second of it. A spinning wait costs one core for the whole wait."""
    seed = seed_of(request)
    with make_writer(root, SaveFormat.NUMPY_NPY) as writer:
        warm = pattern(4096, seed + 1)
        writer.write("warm", warm).result()  # streams, pool, kernels and the backend made first
        source = pattern(value.numel(), seed)
        expected = source.cpu()
        producer = torch.cuda.Stream()
        cycles_per_second()  # calibrated (which waits by spinning) before the measurement
        gc.collect()  # the pools of earlier writers unpinned now, not in the timed window
        torch.cuda.synchronize()
        cpu, wall = time.process_time(), time.perf_counter()
        late(producer, value, source, 1.0)
        with torch.cuda.stream(producer):  # write() orders after the caller's current stream
            still_busy(producer, "at write()")
            future = writer.write("slow", value)
        (path,) = future.result()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    report(request, "wall_s", round(wall, 3))
    report(request, "cpu_s", round(cpu, 3))
    assert_same(np.load(path), expected)
    assert wall > 0.7, "the write did not wait for the producer's kernel"
    assert cpu < 0.3 * wall, f"{cpu:.2f} s of CPU time while waiting {wall:.2f} s for the device"


# The tests.


def _writer(root: Path, save_format: SaveFormat = SaveFormat.SAFETENSORS, **kwargs: Any) -> AsyncWriter:
    kwargs.setdefault("pinned_pool_bytes", 64 << 20)
    writer = AsyncWriter(root, save_format, durability="none", backend="posix", **kwargs)
    writer._stager.pool.buffer.fill_(POISON)  # unwritten staging bytes would show in the files
    return writer


def _stored(path: Path, save_format: SaveFormat) -> Any:
    stored = read_back(path, save_format)
    return stored["arr_0"] if isinstance(stored, dict) else stored


def _chain(x: torch.Tensor) -> torch.Tensor:
    for _ in range(4):
        x = torch.tanh(x @ x)
    return x[:2048].float()


def test_producer_still_computing_gives_final_values_and_write_does_not_wait(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    producer = torch.cuda.Stream()
    generator = torch.Generator(device="cuda").manual_seed(seed_of(request))
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16, generator=generator) / 64
    _chain(x)  # load the kernels and cuBLAS, and fill the allocator's cache, before timing matters
    output = poisoned((2048, 4096), torch.float32)
    torch.cuda.synchronize()
    with _writer(tmp_path, pinned_pool_bytes=256 << 20) as writer:
        with torch.cuda.stream(producer):
            busy(producer, 0.5)
            torch.mul(_chain(x), 3, out=output)  # the last kernel writes the poisoned buffer
            still_busy(producer, "at write()")
            future = writer.write("final", output)
            still_busy(producer, "when write() returned")
        (path,) = future.result()
    torch.cuda.synchronize()
    final = output.cpu()
    assert not final.view(torch.uint8).eq(POISON).all(), "the producer never wrote its output"
    assert_same(_stored(path, SaveFormat.SAFETENSORS), final)


@pytest.mark.parametrize("save_format", list(SaveFormat))
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool, torch.uint8]
)
def test_random_data_every_format(
    tmp_path: Path, request: pytest.FixtureRequest, save_format: SaveFormat, dtype: torch.dtype
) -> None:
    if dtype is torch.bfloat16 and save_format in (SaveFormat.NUMPY_NPY, SaveFormat.NUMPY_NPZ):
        pytest.skip("numpy has no bfloat16")
    producer = torch.cuda.Stream()
    with _writer(tmp_path, save_format) as writer, torch.cuda.stream(producer):
        target, expected = late_tensor(producer, (257, 33), dtype, seed_of(request), 0.15)
        still_busy(producer, "at write()")
        future = writer.write("r", target[:, 1:])  # a strided view of what the producer writes
        still_busy(producer, "when write() returned")
        (path,) = future.result()
    assert_same(_stored(path, save_format), expected[:, 1:])


def test_mapping_mixes_device_and_host_tensors(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    seed = seed_of(request)
    producer = torch.cuda.Stream()
    gpu_expected = random_tensor((100,), torch.float32, seed)
    half_expected = random_tensor((3,), torch.float16, seed + 1)
    cpu = random_tensor((10,), torch.int64, seed + 2)
    gpu, half = poisoned((100,), torch.float32), poisoned((3,), torch.float16)
    with _writer(tmp_path) as writer:
        late(producer, gpu, gpu_expected.cuda(), 0.2)
        late(producer, half, half_expected.cuda(), 0.01)
        with torch.cuda.stream(producer):
            still_busy(producer, "at write()")
            (path,) = writer.write("m", {"gpu": gpu, "cpu": cpu, "half": half}).result()
    stored = read_back(path, SaveFormat.SAFETENSORS)
    assert_same(stored["gpu"], gpu_expected)
    assert_same(stored["cpu"], cpu)
    assert_same(stored["half"], half_expected)


def test_tensor_larger_than_the_pool(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    producer = torch.cuda.Stream()
    with _writer(tmp_path, SaveFormat.NUMPY_NPY, pinned_pool_bytes=4 << 20) as writer:
        # 20 MiB (and 3 bytes) through a 4 MiB pool: staged piece by piece by the worker
        source = pattern((20 << 20) + 3, seed_of(request))
        expected = source.cpu()
        target = poisoned(tuple(source.shape), torch.uint8)
        torch.cuda.synchronize()
        late(producer, target, source, 0.3)
        with torch.cuda.stream(producer):
            still_busy(producer, "at write()")
            (path,) = writer.write("big", target).result()
    assert_same(_stored(path, SaveFormat.NUMPY_NPY), expected)
    assert writer._stager.pool.in_use == 0
    assert writer.stats().bytes_by_backend == {"posix": (20 << 20) + 3}


def test_copy_true_lets_a_static_buffer_be_overwritten_at_once(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    seed = seed_of(request)
    values = [pattern(1 << 20, seed + step) for step in range(8)]
    static = poisoned((1 << 20,), torch.uint8)
    torch.cuda.synchronize()
    producer = torch.cuda.Stream()
    with _writer(tmp_path) as writer:
        futures = []
        with torch.cuda.stream(producer):
            busy(producer, 0.3)
            for step, value in enumerate(values):
                static.copy_(value)  # as a CUDA-graph replay would, on the same stream
                futures.append(writer.write(f"s{step}", static, copy=True))
            still_busy(producer, "after the last write()")
        paths = [f.result()[0] for f in futures]
    for path, value in zip(paths, values, strict=True):
        assert_same(_stored(path, SaveFormat.SAFETENSORS), value.cpu())


def test_copy_true_under_a_cuda_graph_replay(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    check_copy_under_a_graph_replay(tmp_path, seed_of(request), _writer, SaveFormat.SAFETENSORS)


def test_several_writer_threads_each_on_its_own_stream(tmp_path: Path) -> None:
    errors: list[BaseException] = []
    idle: list[int] = []
    with _writer(tmp_path, pinned_pool_bytes=32 << 20) as writer:

        def produce(thread: int) -> None:
            try:
                stream = torch.cuda.Stream()
                busy(stream, 0.2)
                with torch.cuda.stream(stream):
                    for i in range(20):
                        value = torch.full((1 << 18,), float(thread * 100 + i), device="cuda") * 1
                        if i == 0 and stream.query():
                            idle.append(thread)
                        writer.write(f"t{thread}/{i}", value)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=produce, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    assert not idle, f"threads {idle} had an idle stream at their first write(): nothing was ordered"
    for thread in range(4):
        for i in range(20):
            stored = _stored(tmp_path / f"t{thread}/{i}.safetensors", SaveFormat.SAFETENSORS)
            assert stored.eq(float(thread * 100 + i)).all()


class InterfaceOnly:
    """An array known only through __cuda_array_interface__ (version 3), naming `stream`."""

    def __init__(self, tensor: torch.Tensor, stream: int | None) -> None:
        self._tensor = tensor
        self._stream = stream

    @property
    def __cuda_array_interface__(self) -> dict[str, object]:
        interface = dict(self._tensor.__cuda_array_interface__)
        interface["version"] = 3
        interface["stream"] = self._stream
        return interface


def test_cuda_array_interface_object_is_ordered_after_its_stream(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    producer = torch.cuda.Stream()
    with _writer(tmp_path) as writer:
        target, expected = late_tensor(producer, (1 << 18,), torch.float32, seed_of(request), 0.3)
        # the caller's current stream is idle: only the interface's stream orders the copy
        still_busy(producer, "at write()")
        (path,) = writer.write("cai", InterfaceOnly(target, producer.cuda_stream)).result()
    assert_same(_stored(path, SaveFormat.SAFETENSORS), expected)


def test_cuda_array_interface_stream_1_is_the_legacy_default_stream(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    default = torch.cuda.default_stream()  # torch's default stream is the legacy one
    side = torch.cuda.Stream()  # non-blocking: it does not wait for the legacy stream by itself
    with _writer(tmp_path) as writer:
        target, expected = late_tensor(default, (1 << 18,), torch.int32, seed_of(request), 0.3)
        with torch.cuda.stream(side):
            still_busy(default, "at write()")
            future = writer.write("cai1", InterfaceOnly(target, 1))
            still_busy(default, "when write() returned")
        (path,) = future.result()
    assert_same(_stored(path, SaveFormat.SAFETENSORS), expected)


def test_cuda_array_interface_stream_none_is_taken_as_ready(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """stream None: the producer says the data is ready; write() neither fails nor synchronizes."""
    caller = torch.cuda.Stream()
    with _writer(tmp_path) as writer:
        expected = random_tensor((1 << 18,), torch.float16, seed_of(request))
        ready = expected.cuda()
        torch.cuda.synchronize()
        with torch.cuda.stream(caller):
            busy(caller, 0.3)
            future = writer.write("cainone", InterfaceOnly(ready, None))
            still_busy(caller, "when write() returned")
        (path,) = future.result()
    assert_same(_stored(path, SaveFormat.SAFETENSORS), expected)


def test_cupy_array_on_its_current_stream(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    cupy = pytest.importorskip("cupy")
    (cupy.arange(16, dtype=cupy.float32) * 3).sum().item()  # load the kernels
    host = (random_tensor((1 << 18,), torch.int32, seed_of(request)) >> 4).numpy()  # x * 3 fits
    source = cupy.asarray(host)
    output = cupy.full(host.shape, -1, dtype=cupy.int32)
    cupy.cuda.runtime.deviceSynchronize()
    with _writer(tmp_path) as writer:
        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:
            waiting = torch.cuda.ExternalStream(stream.ptr)  # the busy wait runs on cupy's stream
            busy(waiting, 0.3)
            cupy.multiply(source, 3, out=output)
            still_busy(waiting, "at write()")
            (path,) = writer.write("cupy", output).result()
        stream.synchronize()
    assert_same(_stored(path, SaveFormat.SAFETENSORS), torch.from_numpy(host * 3))


def test_written_source_deleted_and_its_size_reallocated_on_the_same_stream(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    def make(root: Path, save_format: SaveFormat) -> AsyncWriter:
        return _writer(root, save_format, pinned_pool_bytes=128 << 20)

    check_source_is_kept_alive(tmp_path, seed_of(request), make, SaveFormat.NUMPY_NPY)


def test_a_small_pool_never_hands_out_a_block_still_being_written(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Four 256 KiB writes fill a 1 MiB pool and are held at a gate with their blocks; the fifth
    write() must wait. Were a block handed out again early, a later copy would land in it while its
    first file is still to be written, and that file would hold the later value."""
    seed, count, nbytes = seed_of(request), 24, 256 << 10
    sources = [pattern(nbytes, seed + i) for i in range(count)]
    targets = [poisoned((nbytes,), torch.uint8) for _ in range(count)]
    torch.cuda.synchronize()
    writer = _writer(tmp_path, SaveFormat.NUMPY_NPY, pinned_pool_bytes=1 << 20, workers=4)
    gate = GatedFormat(writer._format)
    writer._use_format(gate)
    futures: list[object] = []
    problems: list[str] = []

    def produce() -> None:
        try:
            stream = torch.cuda.Stream()
            for i in range(count):
                late(stream, targets[i], sources[i], 0.02)
                if stream.query():
                    problems.append(f"the producer was idle at write {i}")
                with torch.cuda.stream(stream):
                    futures.append(writer.write(f"v{i}", targets[i]))
        except BaseException as exc:
            problems.append(repr(exc))

    producer = threading.Thread(target=produce)
    try:
        producer.start()
        for _ in range(4):
            assert gate.entered.acquire(timeout=30), "the first writes never reached the gate"
        wait_for_waiter(writer._stager.pool._cond)
        assert producer.is_alive(), "a device write waits while the pool has no room"
        assert len(futures) == 4
        gate.gate.set()
        producer.join(60)
        assert not producer.is_alive()
        writer.flush()
    finally:
        gate.gate.set()
        writer.close()
    assert not problems
    for i in range(count):
        assert_same(np.load(tmp_path / f"v{i}.npy"), sources[i].cpu())
    stats = writer.stats()
    assert stats.pinned_peak_bytes <= 1 << 20
    assert writer._stager.pool.in_use == 0


def test_a_worker_waiting_for_the_producer_uses_little_cpu(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    check_a_waiting_worker_sleeps(request, tmp_path, _writer, poisoned((4 << 20,), torch.uint8))


_POOL_CHILD = r"""
import json, sys, time
import torch
from tensorsink import AsyncWriter, SaveFormat

root, asked = sys.argv[1], int(sys.argv[2])
torch.ones(1, device="cuda")  # CUDA is initialised: the pool is pinned in the background at construction
stats = getattr(torch.cuda, "host_memory_stats", None)
before = stats().get("allocated_bytes.current") if stats else None
writer = AsyncWriter(root, SaveFormat.NUMPY_NPY, durability="none", backend="posix", pinned_pool_bytes=asked)
deadline = time.monotonic() + 10
while writer.stats().pinned_pool_bytes == 0 and time.monotonic() < deadline:
    time.sleep(0.01)
before_any_write = writer.stats().pinned_pool_bytes
value = (torch.arange(asked, device="cuda") % 251).to(torch.uint8)  # exactly the pool: one block
torch.cuda.synchronize()
(path,) = writer.write("whole", value).result()
pool = writer._stager.pool
after = stats().get("allocated_bytes.current") if stats else None
import numpy
report = {
    "capacity": pool.capacity,
    "buffer_bytes": pool.buffer.numel() * pool.buffer.element_size(),
    "pinned": bool(pool.buffer.is_pinned()),
    "stats_pool_bytes": writer.stats().pinned_pool_bytes,
    "before_any_write": before_any_write,
    "peak": writer.stats().pinned_peak_bytes,
    "torch_pinned_growth": None if before is None or after is None else after - before,
    "correct": bool(numpy.array_equal(numpy.load(path), value.cpu().numpy())),
}
writer.close()
print(json.dumps(report))
"""


def test_the_pool_pins_exactly_the_size_asked(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """1.5 times a power of two, in a fresh process (torch's pinned cache is empty there): no rounding
    up to 32 MiB, pinned before any write since CUDA was initialised, and all of it usable at once."""
    asked = 3 << 23  # 24 MiB
    found = run_child(_POOL_CHILD, str(tmp_path), str(asked))
    for name, value in found.items():
        report(request, name, value)
    assert found["correct"]
    assert found["capacity"] == asked
    assert found["buffer_bytes"] == asked
    assert found["pinned"]
    assert found["stats_pool_bytes"] == asked
    assert found["before_any_write"] == asked, "the pool was not pinned in the background at construction"
    assert found["peak"] == asked, "a write of the pool's whole size was not staged in one block"
    growth = found["torch_pinned_growth"]
    assert growth is None or growth <= asked, f"torch's pinned allocator took {growth} bytes for {asked}"


_FIRST_WRITES = r"""
import json, math, sys, time
import torch
from safetensors.torch import load_file
from tensorsink import AsyncWriter, SaveFormat

root, where, seconds, count = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
elements = 1 << 18  # 1 MiB of int32 a write
base = torch.arange(elements, dtype=torch.int32, device="cuda")
outputs = [torch.full((elements,), -1, dtype=torch.int32, device="cuda") for _ in range(count)]
torch.cuda._sleep(1000000)
a = torch.randn(4096, 4096, device="cuda")  # the clock up first, as tests/test_cuda.py's warm_the_clock
b = torch.empty_like(a)
began = time.perf_counter()
while time.perf_counter() - began < 0.5:
    for _ in range(8):
        torch.matmul(a, a, out=b)
    torch.cuda.synchronize()
rates = []
for _ in range(3):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(100000000)
    end.record()
    end.synchronize()
    rates.append(100000000 / (start.elapsed_time(end) / 1e3))
del a, b
torch.cuda.synchronize()
writer = AsyncWriter(root, SaveFormat.SAFETENSORS, durability="none")  # auto: nothing pinned or probed yet
producer = torch.cuda.default_stream() if where == "default" else torch.cuda.Stream()
latencies = []
with torch.cuda.stream(producer):
    torch.cuda._sleep(int(seconds * max(rates)))
    busy_before = not producer.query()
    for i, output in enumerate(outputs):
        torch.add(base, i, out=output)  # produced behind the sleep
        began = time.perf_counter()
        writer.write("o%d" % i, output)
        latencies.append(time.perf_counter() - began)
    busy_after = not producer.query()
backend = writer.wait_backend(120)
writer.close()
torch.cuda.synchronize()
host = base.cpu()
wrong = [
    i for i in range(count) if not torch.equal(load_file("%s/o%d.safetensors" % (root, i))["arr_0"], host + i)
]
ordered = sorted(latencies)
print(json.dumps({
    "first_s": latencies[0],
    "p50_s": ordered[len(ordered) // 2],
    "p99_s": ordered[math.ceil(0.99 * len(ordered)) - 1],
    "max_s": ordered[-1],
    "busy_before": busy_before,
    "busy_after": busy_after,
    "wrong": wrong,
    "backend": backend,
    "bytes_by_backend": writer.stats().bytes_by_backend,
    "sleep_cycles_per_s": round(max(rates)),
}))
"""


@pytest.mark.parametrize("where", ["default", "side"])
def test_first_and_p99_write_in_a_fresh_process_while_the_producer_sleeps(
    tmp_path: Path, request: pytest.FixtureRequest, where: str
) -> None:
    """The first write() of a fresh process (the default pool still being pinned by the thread that
    construction started, no backend verdict yet) and the next 99, each of a tensor produced behind a
    4 s kernel on the default stream or a side stream: none waits for the producer or the probe (the
    first may wait for the pinning, which must not wait for the device), every file holds its values."""
    seconds = 4.0
    found = run_child(_FIRST_WRITES, str(tmp_path), where, str(seconds), "100")
    for name, value in found.items():
        report(request, name, value)
    assert found["busy_before"], "the producer finished before the first write(): nothing was measured"
    assert found["busy_after"], "a write() waited for the producer"
    assert found["wrong"] == []
    assert found["first_s"] < 1.5, "the first write() waited for the device, or for the probe"
    assert found["p99_s"] < 0.05
