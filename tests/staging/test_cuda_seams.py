"""The CUDA path's decisions, shown on the CPU through stand-ins and recorded call sequences.

Each test stands for a defect a GPU would show (tests/test_cuda_edges.py shows them there): the
legacy default stream of `__cuda_array_interface__`, the writer's threads in relaxed capture mode, a
stale error after a refused pin, pinning off the caller's thread and unpinning at close(), one copy
stream per producer stream, and write() inside a graph capture.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tensorsink import AsyncWriter, GraphCaptureError
from tensorsink import arrays as arrays_module
from tensorsink.staging import Stager, cudart
from tensorsink.staging import pool as pool_module
from tensorsink.staging.engine import CudaEngine, _EventCompletion
from tests.staging.fake import FakeEngine, stage_on


class _Runtime:
    """A stand-in CUDA runtime recording the calls tensorsink makes through ctypes."""

    def __init__(self, calls: list[tuple[str, Any]]) -> None:
        self.calls = calls

    def cudaThreadExchangeStreamCaptureMode(self, mode: Any) -> int:
        self.calls.append(("capture mode", mode._obj.value, threading.current_thread().name))
        return 0

    def cudaGetLastError(self) -> int:
        self.calls.append(("get last error", None, threading.current_thread().name))
        return 0


@pytest.fixture
def runtime(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    calls: list[tuple[str, Any]] = []
    monkeypatch.setattr(cudart, "runtime", lambda: _Runtime(calls))
    return calls


def _in_thread(target: Any, name: str = "worker") -> None:
    thread = threading.Thread(target=target, name=name)
    thread.start()
    thread.join()


def test_stream_1_is_the_legacy_default_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[tuple[str, int]] = []
    monkeypatch.setattr(torch.cuda, "default_stream", lambda device: made.append(("default", 0)) or "D")
    monkeypatch.setattr(
        torch.cuda, "ExternalStream", lambda handle, device: made.append(("external", handle)) or "E"
    )
    device = torch.device("cpu")
    assert arrays_module.producer_stream(1, device) == "D"  # torch asserts on ExternalStream(1)
    assert arrays_module.producer_stream(2, device) == "E"  # per-thread default: a stream of its own
    assert arrays_module.producer_stream(0x7F00, device) == "E"
    assert made == [("default", 0), ("external", 2), ("external", 0x7F00)]


def test_only_the_writers_own_threads_relax_their_capture_mode_once(runtime: list[Any]) -> None:
    def owned() -> None:
        cudart.own_thread()
        cudart.before_cuda()
        cudart.before_cuda()

    _in_thread(cudart.before_cuda, "callers-thread")  # not marked: a producer's capture stays as it is
    cudart.before_cuda()
    _in_thread(owned, "tensorsink-x")
    assert runtime == [("capture mode", cudart.CAPTURE_MODE_RELAXED, "tensorsink-x")]


def test_event_waits_relax_first_on_the_writers_threads(runtime: list[Any]) -> None:
    class Event:
        device = None  # a torch.cuda.Event's device before it is recorded

        def synchronize(self) -> None:
            runtime.append(("synchronize", None, threading.current_thread().name))

    def wait() -> None:
        cudart.own_thread()
        _EventCompletion(Event(), []).wait()  # type: ignore[arg-type]

    _in_thread(wait)
    assert [call[0] for call in runtime] == ["capture mode", "synchronize"]


def test_every_thread_of_the_writer_that_may_call_cuda_is_its_own(tmp_path: Path) -> None:
    seen: list[bool] = []

    def look() -> None:
        seen.append(getattr(cudart._state, "owned", False))

    with AsyncWriter(tmp_path, engine="python") as writer:
        writer.pool.submit(look).result()  # staging waits and custom writers run here
        writer._engine._executor.submit(look).result()  # the Python engine's threads complete writes
    assert seen == [True, True]


def test_a_refused_pin_clears_the_threads_last_error(
    runtime: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    class Cudart:
        def cudaHostRegister(self, address: int, nbytes: int, flags: int) -> int:
            runtime.append(("register", nbytes, threading.current_thread().name))
            return 712  # cudaErrorHostMemoryAlreadyRegistered

    monkeypatch.setattr(torch.cuda, "cudart", Cudart)
    fallback: list[int] = []
    monkeypatch.setattr(
        pool_module, "_torch_pinned", lambda nbytes: fallback.append(nbytes) or torch.empty(nbytes)
    )
    buffer, _ = pool_module.pinned_buffer(1 << 16)
    assert buffer.numel() == 1 << 16
    assert [call[0] for call in runtime] == ["register", "get last error"]
    assert fallback == [1 << 16]


class _Pins:
    """pinned_buffer as a recording stand-in: which thread pins and unpins, and when."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def __call__(self, nbytes: int) -> tuple[torch.Tensor, Any]:
        self.calls.append(("pin", threading.current_thread().name))
        return torch.empty(nbytes, dtype=torch.uint8), lambda: self.calls.append(
            ("unpin", threading.current_thread().name)
        )


def test_the_pool_is_pinned_and_unpinned_off_the_callers_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pins = _Pins()
    monkeypatch.setattr(pool_module, "pinned_buffer", pins)
    writer = AsyncWriter(tmp_path, "npy")
    engine = FakeEngine(0.0)
    stage_on(writer, Stager(1 << 20, engine))  # pinned, through the stand-in
    writer.write("a", engine.put(torch.arange(1000, dtype=torch.float32))).result()
    assert pins.calls == [("pin", "tensorsink-pin")], "the first CUDA write pins on the pin thread"
    writer.flush()
    assert len(pins.calls) == 1, "unpinned only by close()"
    writer.close()
    assert pins.calls == [("pin", "tensorsink-pin"), ("unpin", "tensorsink-unpin")]
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.arange(1000, dtype=np.float32))


def test_a_writer_that_never_needs_the_pool_does_not_pin_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pins = _Pins()
    monkeypatch.setattr(pool_module, "pinned_buffer", pins)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    prepared: list[int | None] = []
    monkeypatch.setattr(Stager, "prepare", lambda self, device=None: prepared.append(device))
    with AsyncWriter(tmp_path / "posix", backend="posix"):
        pass
    assert prepared == [0], "a job on a GPU pins at construction, off its thread"
    from tensorsink.backends import Route

    monkeypatch.setattr(Route, "__init__", lambda self, *args: None)  # kvikio cannot run on a CPU
    with AsyncWriter(tmp_path / "kvikio", backend="kvikio"):
        pass
    assert prepared == [0], "backend='kvikio' writes from device memory: no pool pinned for it"


class _Stream:
    made = 0

    def __init__(self, device: int, priority: int = 0) -> None:
        _Stream.made += 1
        self.device = device


def test_each_producer_stream_gets_its_own_copy_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    current = {"stream": 0xA}

    class Current:
        @property
        def cuda_stream(self) -> int:
            return current["stream"]

    monkeypatch.setattr(torch.cuda, "Stream", _Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Current())
    engine = CudaEngine()
    device = torch.device("cuda", 0)
    a = engine._copy_stream(device)
    assert engine._copy_stream(device) is a, "one producer, one copy stream"
    current["stream"] = 0xB
    b = engine._copy_stream(device)
    assert b is not a, "an idle producer's copies do not queue behind a busy one's wait"
    assert engine._copy_stream(torch.device("cuda", 1)) is not b
    for handle in range(CudaEngine.MAX_STREAMS * 2):
        current["stream"] = 0x1000 + handle
        engine._copy_stream(device)
    assert len(engine._streams) == CudaEngine.MAX_STREAMS


def test_a_write_inside_a_graph_capture_is_refused_and_the_writer_goes_on(tmp_path: Path) -> None:
    engine = FakeEngine(0.0)
    with AsyncWriter(tmp_path, "npy") as writer:
        stage_on(writer, Stager(1 << 20, engine, pin=False))
        engine.capture = True
        with pytest.raises(GraphCaptureError, match="captures a CUDA graph"):
            writer.write("in-capture", engine.put(torch.ones(4)))
        assert engine.copies == []
        assert writer._stager.pool.in_use == 0
        engine.capture = False
        writer.write("after", engine.put(torch.ones(4)))
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".npy"] == ["after.npy"]


@pytest.mark.parametrize(
    ("loaded", "cuda", "found"),
    [
        (["/w/nvidia/cu13/lib/libcudart.so.13", "/w/nvidia/cuda_runtime/lib/libcudart.so.12"], "12.8", 1),
        (["/usr/local/cuda/lib64/libcudart.so.12.8.90"], "12.8", 0),
        (["/a/libcudart.so.12", "/b/libcudart.so.12"], "12.8", None),  # two: neither is surely torch's
        (["/a/libcudart.so.13"], "12.8", None),
        (["/a/libcudart.so.12"], None, None),  # a CPU build of torch
        (["/a/libcudart-9a8b7c.so.12"], "12.8", None),  # a bundled, renamed copy: not found by name
    ],
)
def test_the_runtime_is_torchs_own_version(loaded: list[str], cuda: str | None, found: int | None) -> None:
    assert cudart._torchs_runtime(loaded, cuda) == (None if found is None else loaded[found])
