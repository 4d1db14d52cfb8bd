"""The CUDA path at its edges, on a real GPU (marker `gpu`; skipped without CUDA).

Graph captures beside the writer's threads, a refused pin, producers on several streams, batches,
CuPy memory freed at once, two devices, and processes that end without close(). Each has a CPU twin
in tests/staging/test_cuda_seams.py that shows the decision through stand-ins.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tensorsink import GraphCaptureError, SaveFormat
from tensorsink.staging import cudart
from tensorsink.staging import pool as pool_module
from tests.support import assert_same, random_tensor
from tests.test_cuda import (
    _stored,
    _writer,
    busy,
    late_tensor,
    run_child,
    seed_of,
    sleep_clock_property,  # noqa: F401  (records the calibrated clock in JUnit)
    still_busy,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_a_graph_captured_while_the_writers_threads_wait_on_events(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Under the default (global) capture mode, a cudaEventSynchronize from another thread during a
    capture invalidates it; the writer's threads are relaxed, so the captures here must all succeed."""
    producer = torch.cuda.Stream()
    static = torch.zeros(1024, device="cuda")
    graphs = []
    with _writer(tmp_path) as writer:
        futures = []
        with torch.cuda.stream(producer):
            for i in range(20):  # completions every ~20 ms: the workers wait, wake and wait again
                busy(producer, 0.02)
                futures.append(writer.write(f"k{i}", torch.full((1 << 16,), float(i), device="cuda")))
        # capture_begin/end, not torch.cuda.graph(), whose entry synchronizes the device (and so
        # would wait for the producer: the captures would no longer overlap the writer's waits)
        capturing = torch.cuda.Stream()
        capturing.wait_stream(torch.cuda.current_stream())
        deadline = time.perf_counter() + 0.5
        with torch.cuda.stream(capturing):
            while time.perf_counter() < deadline:
                graph = torch.cuda.CUDAGraph()
                graph.capture_begin()  # global capture mode, the default
                static.add_(1)
                graph.capture_end()
                graphs.append(graph)
        still_busy(producer, "after the captures")
        for future in futures:
            future.result()
    for graph in graphs:
        graph.replay()
    torch.cuda.synchronize()
    assert static[0].item() == len(graphs)
    for i in range(20):
        assert _stored(tmp_path / f"k{i}.safetensors", SaveFormat.SAFETENSORS).eq(float(i)).all()


def test_write_inside_a_capture_is_refused_and_the_capture_survives(tmp_path: Path) -> None:
    x = torch.ones(1024, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with _writer(tmp_path) as writer:
        with torch.cuda.graph(graph):
            y = x * 2
            with pytest.raises(GraphCaptureError, match="captures a CUDA graph"):
                writer.write("inside", y)
        graph.replay()
        (path,) = writer.write("after", y).result()
    assert _stored(path, SaveFormat.SAFETENSORS).eq(2).all()


def test_a_cupy_array_deleted_right_after_write(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """torch's record_stream does nothing for memory CuPy allocated: the writer must hold the array
    itself until its copy ran, or CuPy's pool hands the memory to the next array."""
    cupy = pytest.importorskip("cupy")
    host = random_tensor((1 << 22,), torch.float32, seed_of(request)).numpy()
    with _writer(tmp_path, pinned_pool_bytes=128 << 20) as writer:
        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:
            busy(torch.cuda.ExternalStream(stream.ptr), 0.3)  # the copy must wait for this stream
            source = cupy.asarray(host)
            future = writer.write("freed", source)
            del source
            cupy.get_default_memory_pool().free_all_blocks()
            reuse = cupy.full(host.shape, -1.0, dtype=cupy.float32)  # the same memory, if it was freed
        (path,) = future.result()
        stream.synchronize()
        del reuse
    assert_same(_stored(path, SaveFormat.SAFETENSORS), torch.from_numpy(host))


def test_write_batch_of_cuda_tensors_behind_a_busy_producer(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    producer = torch.cuda.Stream()
    with _writer(tmp_path) as writer:
        target, expected = late_tensor(producer, (8, 4096), torch.float32, seed_of(request), 0.3)
        with torch.cuda.stream(producer):
            still_busy(producer, "at write_batch()")
            future = writer.write_batch([f"s{i}" for i in range(8)], {"y": target})
            still_busy(producer, "when write_batch() returned")
        paths = future.result()
    assert len(paths) == 8
    for i, path in enumerate(paths):
        assert_same(_load_mapping(path)["y"], expected[i])


def _load_mapping(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def test_committed_batch_writer_from_device_memory(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    from tensorsink.committed import CommittedBatchWriter  # no Ray needed

    producer = torch.cuda.Stream()
    writer = CommittedBatchWriter(tmp_path, backend="posix", pinned_pool_bytes=64 << 20)
    try:
        target, expected = late_tensor(producer, (4, 1000), torch.bfloat16, seed_of(request), 0.3)
        with torch.cuda.stream(producer):
            rows = writer.write([10, 11, 12, 13], target)
    finally:
        writer.close()
    assert list(rows["key"]) == ["10", "11", "12", "13"]
    for i, path in enumerate(rows["path"]):
        assert_same(_stored(Path(path), SaveFormat.SAFETENSORS), expected[i])


def test_an_idle_streams_write_is_staged_while_another_stream_is_busy(tmp_path: Path) -> None:
    """One copy stream per producer: b's copy must not queue behind a's wait for its busy stream."""
    a_stream, b_stream = torch.cuda.Stream(), torch.cuda.Stream()
    a, b = torch.ones(1 << 16, device="cuda"), torch.full((1 << 16,), 2.0, device="cuda")
    torch.cuda.synchronize()
    with _writer(tmp_path) as writer:
        with torch.cuda.stream(a_stream):
            busy(a_stream, 2.0)
            first = writer.write("a", a)
        with torch.cuda.stream(b_stream):
            began = time.perf_counter()
            second = writer.write("b", b)
            assert second.wait_staged(1.0), "b waited for a's stream"
            staged_after = time.perf_counter() - began
        still_busy(a_stream, "when b was staged")
        first.result()
    assert staged_after < 1.0
    assert _stored(tmp_path / "b.safetensors", SaveFormat.SAFETENSORS).eq(2).all()


def test_a_refused_pin_leaves_no_stale_error_for_the_next_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """cudaHostRegister of memory registered already fails; torch's wrapper leaves that error as the
    thread's last error, and the next kernel launch would raise it."""
    memory = pool_module.mmap.mmap(
        -1, 1 << 20, flags=pool_module.mmap.MAP_PRIVATE | pool_module.mmap.MAP_ANONYMOUS
    )
    monkeypatch.setattr(pool_module.mmap, "mmap", lambda *args, **kwargs: memory)  # the same pages twice
    first, unpin = pool_module.pinned_buffer(1 << 20)
    try:
        second, _ = pool_module.pinned_buffer(1 << 20)  # refused: falls back to torch's pinned memory
        assert second.data_ptr() != first.data_ptr()
        assert torch.ones(4, device="cuda").sum().item() == 4  # raises a stale error if one was left
        assert cudart.clear_last_error() == 0
    finally:
        unpin()


def test_close_unpins_the_pool(tmp_path: Path) -> None:
    writer = _writer(tmp_path)
    writer.write("a", torch.ones(1024, device="cuda")).result()
    buffer = writer._stager.pool.buffer
    writer.close()
    register = torch.cuda.cudart().cudaHostRegister
    assert int(register(buffer.data_ptr(), buffer.numel(), 0)) == 0, "still pinned after close()"
    torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_one_write_from_two_devices(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    zero, one = torch.cuda.Stream(device=0), torch.cuda.Stream(device=1)
    seed = seed_of(request)
    with _writer(tmp_path) as writer:
        a, expected_a = late_tensor(zero, (1 << 16,), torch.float32, seed, 0.3)
        with torch.cuda.device(1):
            b, expected_b = late_tensor(one, (1 << 16,), torch.float32, seed + 1, 0.3)
        (path,) = writer.write("two", {"a": a, "b": b}).result()
    stored = _load_mapping(path)
    assert_same(stored["a"], expected_a)
    assert_same(stored["b"], expected_b)


def test_a_script_that_ends_with_copies_in_flight_writes_them_all(tmp_path: Path) -> None:
    found = run_child(
        """
import json, sys, torch
from tensorsink import AsyncWriter
from tests.test_cuda import busy
writer = AsyncWriter(sys.argv[1], "npy", backend="posix", pinned_pool_bytes=64 << 20)
producer = torch.cuda.Stream()
with torch.cuda.stream(producer):
    busy(producer, 0.5)
    for i in range(16):
        writer.write(f"s{i}", torch.full((1 << 18,), float(i), device="cuda"))
print(json.dumps({"queued": 16}))  # no close(): the exit finishes the writes
""",
        str(tmp_path),
    )
    assert found == {"queued": 16}
    for i in range(16):
        assert np.load(tmp_path / f"s{i}.npy").min() == float(i)


def test_a_child_that_makes_a_writer_and_exits_at_once_does_not_hang(tmp_path: Path) -> None:
    """The pool is pinned in the background at construction (CUDA is initialised): the exit waits for
    the pin and unpins, instead of tearing down under a thread inside cudaHostRegister."""
    began = time.perf_counter()
    found = run_child(
        """
import json, sys, torch
torch.ones(1, device="cuda")
from tensorsink import AsyncWriter
writer = AsyncWriter(sys.argv[1], pinned_pool_bytes=1 << 30)  # pinned in the background from here
print(json.dumps({"made": True}))
""",
        str(tmp_path),
        timeout=120,
    )
    assert found == {"made": True}
    assert time.perf_counter() - began < 120


def test_the_engines_threads_wait_for_cuda_copies_themselves(tmp_path: Path) -> None:
    """npy and safetensors: the engine's C threads wait for the copy's event through the runtime torch
    loaded (cudart.event_wait), so the write's handle is the engine's and no Python worker starts."""
    import threading

    from tensorsink import AsyncWriter
    from tensorsink.engine import available_engines

    if "native" not in available_engines():
        pytest.skip("the native engine was not built")
    source = torch.arange(1 << 20, device="cuda", dtype=torch.float32)
    writer = AsyncWriter(
        tmp_path, SaveFormat.SAFETENSORS, durability="none", backend="posix", engine="native"
    )
    try:
        handle = writer.write("x", source)
        assert cudart.runtime() is not None, "the CUDA runtime torch loaded was not found by name"
        assert type(handle).__name__ == "Handle", "a Python worker waited for the copy"
        handle.result(timeout=60)
        assert handle.staged()
        assert not [t.name for t in threading.enumerate() if t.name.startswith("tensorsink_")]
    finally:
        writer.close()
    assert_same(_stored(tmp_path / "x.safetensors", SaveFormat.SAFETENSORS), source.cpu())
    assert writer._stager.pool.in_use == 0
