"""Staged writes on the ready route: the native engine's own threads wait for the copies from the
device (through C functions, as they call cudaEventSynchronize on a GPU), with no Python worker.

The stand-in device's copies land late into poisoned pool memory, from another thread; its waits are
C functions made with ctypes. On a GPU the same seam carries CUDA's functions: untested there until
the GPU suite runs it (tests/test_cuda.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from tensorsink import AsyncWriter, SaveFormat
from tensorsink.engine import available_engines
from tensorsink.staging import ALIGNMENT, Stager
from tests.staging.fake import POISON, FakeEngine, stage_on
from tests.support import assert_same, random_tensor, read_back

pytestmark = pytest.mark.skipif("native" not in available_engines(), reason="the native engine was not built")


def _writer(root: Path, engine: FakeEngine, **kwargs: object) -> AsyncWriter:
    writer = AsyncWriter(root, SaveFormat.SAFETENSORS, engine="native", **kwargs)  # type: ignore[arg-type]
    stage_on(writer, Stager(64 * ALIGNMENT, engine, pin=False))
    writer._stager.pool.buffer.fill_(POISON)
    return writer


def _pool_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("tensorsink_")}


def test_the_engines_threads_wait_for_the_copies_and_write_what_landed(tmp_path: Path) -> None:
    device = FakeEngine(delay=0.1)
    with _writer(tmp_path, device, durability="none") as writer:
        sources = [device.put(random_tensor((33, 17), torch.float32, i)) for i in range(6)]
        handles = [writer.write(f"x{i}", source) for i, source in enumerate(sources)]
        paths = [handle.result(timeout=30)[0] for handle in handles]
        assert not _pool_threads()  # no Python worker was started for them
    for path, source in zip(paths, sources, strict=True):
        assert_same(read_back(path, SaveFormat.SAFETENSORS)["arr_0"], source)  # never the poison
    me = threading.get_ident()
    assert device.waited
    assert me not in device.waited  # waited for in the engine's threads
    # Each engine thread relaxed itself once, before its first wait, with the argument it was given.
    assert sorted({ident for ident, _ in device.set_up}) == sorted(set(device.waited))
    assert len(device.set_up) == len(set(device.set_up))
    assert {mode for _, mode in device.set_up} == {2}
    assert device.cleared == 0
    assert writer._stager.pool.in_use == 0


def test_a_failed_copy_fails_its_write_naming_the_key_and_gives_its_block_back(tmp_path: Path) -> None:
    device = FakeEngine(delay=0.01)
    device.wait_error = 700  # what cudaEventSynchronize returns for an illegal address, say
    writer = _writer(tmp_path, device)
    handle = writer.write("lost/sample", device.put(torch.ones(100)))
    with pytest.raises(OSError, match="copy from the device") as info:
        handle.result(timeout=30)
    assert "lost/sample" in str(info.value)
    assert device.cleared >= 1  # the thread's last error cleared after the failed wait
    with pytest.raises(OSError, match="copy from the device"):
        writer.flush()
    assert writer._stager.pool.in_use == 0
    assert not (tmp_path / "lost" / "sample.safetensors").exists()
    with pytest.raises(OSError, match="copy from the device"):
        writer.close()


def test_a_copy_engine_without_c_waits_goes_through_a_python_worker(tmp_path: Path) -> None:
    device = FakeEngine(delay=0.05)
    device.native = False
    with _writer(tmp_path, device) as writer:
        source = device.put(random_tensor((64,), torch.float16, 3))
        (path,) = writer.write("x", source).result(timeout=30)
    assert device.waited == []
    assert_same(read_back(path, SaveFormat.SAFETENSORS)["arr_0"], source)


def test_a_slow_done_callback_does_not_hold_the_pool(tmp_path: Path) -> None:
    """The blocks go back as the write settles, not behind the user's callbacks: a callback that
    blocks does not starve the next write of pool memory."""
    device = FakeEngine(delay=0.2)  # the callback is added while the write waits for its copy
    writer = AsyncWriter(tmp_path, SaveFormat.SAFETENSORS, engine="native")
    stage_on(writer, Stager(4 * ALIGNMENT, device, pin=False))  # room for one write at a time
    release = threading.Event()
    try:
        first = writer.write("a", device.put(torch.ones(3 * ALIGNMENT // 4)))
        first.add_done_callback(lambda _: release.wait(30))
        first.result(timeout=30)
        second = writer.write("b", device.put(torch.ones(3 * ALIGNMENT // 4)))  # needs the whole pool
        assert second.result(timeout=30)
    finally:
        release.set()
        writer.close()


@pytest.mark.parametrize(
    ("event", "device", "fails"),
    [(1, 0, False), (ord("5"), 0, True), (1, 3, True)],
    ids=["ok", "wait", "device"],
)
def test_cudas_functions_reach_the_engine_in_the_order_it_calls_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, event: int, device: int, fails: bool
) -> None:
    """cudart.event_wait's tuple, carried through the engine with C stand-ins for CUDA's functions:
    the wait is libc's isdigit() (0 for event 1, not for event ord("5")) and the device switch its abs()
    (0 for device 0, not for 3), so those fail as a CUDA error would, and event 1 on device 0 succeeds.
    A field out of place fails this."""
    from tensorsink.staging import cudart

    libc = ctypes.CDLL(None)
    runtime = SimpleNamespace(
        cudaEventSynchronize=libc.isdigit,
        cudaThreadExchangeStreamCaptureMode=libc.abs,
        cudaGetLastError=libc.getpid,
        cudaSetDevice=libc.abs,
    )
    monkeypatch.setattr(cudart, "runtime", lambda: runtime)
    wait = cudart.event_wait(event, device)
    assert wait is not None
    digit, size = (ctypes.cast(f, ctypes.c_void_p).value for f in (libc.isdigit, libc.abs))
    assert wait == (digit, event, size, cudart.CAPTURE_MODE_RELAXED, wait[4], size, device)
    device_engine = FakeEngine(delay=0.0)

    def landed_then_c(completion: Any) -> Any:
        completion.thread.join()  # the copy has landed: only the stand-ins are tested here
        return wait

    monkeypatch.setattr("tests.staging.fake._LateCompletion.native", landed_then_c)
    writer = _writer(tmp_path, device_engine)
    handle = writer.write("k", device_engine.put(torch.ones(10)))
    try:
        if fails:
            with pytest.raises(OSError, match="copy from the device"):
                handle.result(timeout=30)
        else:
            (path,) = handle.result(timeout=30)
            assert_same(read_back(path, SaveFormat.SAFETENSORS)["arr_0"], torch.ones(10))
    finally:
        with contextlib.suppress(OSError):
            writer.close()


def test_a_write_is_staged_once_its_copy_has_landed_never_before(tmp_path: Path) -> None:
    """staged() says the caller may overwrite its device tensors: never while the copy is on its way."""
    device = FakeEngine(delay=60)  # lands when the test says
    with _writer(tmp_path, device) as writer:
        source = device.put(torch.ones(256))
        handle = writer.write("k", source)
        assert not handle.wait_staged(0.3)
        assert not handle.staged()
        assert not handle.done()
        device.land.set()
        assert handle.wait_staged(30)
        assert handle.staged()
        handle.result(timeout=30)
    assert_same(read_back(tmp_path / "k.safetensors", SaveFormat.SAFETENSORS)["arr_0"], torch.ones(256))


def test_a_written_copy_is_not_waited_for_again_in_python(tmp_path: Path) -> None:
    """The engine's threads waited for it: the blocks go back without a second wait (on a GPU, a
    synchronize from the collecting thread), which only a failed write still needs."""
    device = FakeEngine(delay=0.05)
    with _writer(tmp_path, device) as writer:
        writer.write("k", device.put(torch.ones(64))).result(timeout=30)
        writer.flush()
        assert writer._stager.pool.in_use == 0
    assert device.waited
    assert device.python_waits == 0


def test_an_interruption_after_the_write_was_queued_neither_loses_nor_frees_its_block_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C lands as write_ready() returns: the write is queued, and its release is the engine's."""
    device = FakeEngine(delay=0.1)
    writer = _writer(tmp_path, device)
    stats = writer._stats
    real = stats.write_started

    def interrupted() -> None:
        monkeypatch.setattr(stats, "write_started", real)
        raise KeyboardInterrupt

    monkeypatch.setattr(stats, "write_started", interrupted)
    with pytest.raises(KeyboardInterrupt):
        writer.write("k", device.put(torch.ones(64)))
    writer.flush()
    pool = writer._stager.pool
    assert pool.in_use == 0
    assert pool.free_runs() == [(0, pool.capacity)]  # given back once, whole
    writer.close()
    assert_same(read_back(tmp_path / "k.safetensors", SaveFormat.SAFETENSORS)["arr_0"], torch.ones(64))


def test_a_write_the_engine_refuses_has_its_settled_callable_called_with_none(tmp_path: Path) -> None:
    from tensorsink.engine.base import Settled

    writer = AsyncWriter(tmp_path, SaveFormat.SAFETENSORS, engine="native")
    called: list[object] = []
    try:
        with pytest.raises(TypeError):
            writer._engine.write_ready(["k"], [("not", "a file")], 1, None, Settled(called.append))
    finally:
        writer.close()
    assert called == [None]


@pytest.mark.parametrize("batch_kind", ["tensor", "mapping", "sequence"])
def test_write_batch_of_device_tensors_is_waited_for_by_the_engine(tmp_path: Path, batch_kind: str) -> None:
    device = FakeEngine(delay=0.1)
    rows = [random_tensor((5, 3), torch.float32, i) for i in range(4)]
    with _writer(tmp_path, device) as writer:
        if batch_kind == "tensor":
            batch: object = device.put(torch.stack(rows))
        elif batch_kind == "mapping":
            batch = {"x": device.put(torch.stack(rows)), "n": device.put(torch.arange(4))}
        else:
            batch = [device.put(row.clone()) for row in rows]
        paths = writer.write_batch([f"s/{i}" for i in range(4)], batch).result(timeout=30)
        assert not _pool_threads()
    assert len(paths) == 4
    assert device.waited
    assert device.python_waits == 0
    for i, path in enumerate(sorted(paths)):
        stored = read_back(path, SaveFormat.SAFETENSORS)
        assert_same(stored["x"] if batch_kind == "mapping" else stored["arr_0"], rows[i])
        if batch_kind == "mapping":
            assert int(stored["n"]) == i
    assert writer._stager.pool.in_use == 0


def test_a_copied_device_write_is_staged_at_once_and_waited_for_by_the_engine(tmp_path: Path) -> None:
    """copy=True: snapshotted on the device in stream order, so the caller may overwrite its tensor as
    soon as write() returns; the copy to the pool is still the engine's to wait for."""
    device = FakeEngine(delay=60)  # lands when the test says
    with _writer(tmp_path, device) as writer:
        source = device.put(torch.ones(256))
        handle = writer.write("k", source, copy=True)
        assert handle.staged()
        assert not handle.done()
        source.fill_(7.0)  # the caller reuses its buffer at once
        device.land.set()
        handle.result(timeout=30)
    assert device.snapshots == 1
    assert device.waited
    assert not _pool_threads()
    assert_same(read_back(tmp_path / "k.safetensors", SaveFormat.SAFETENSORS)["arr_0"], torch.ones(256))


def test_a_copied_host_write_is_staged_at_once(tmp_path: Path) -> None:
    writer = AsyncWriter(tmp_path, SaveFormat.SAFETENSORS, engine="native")
    try:
        source = np.ones((64, 64), np.float32)
        handle = writer.write("k", {"a": source, "b": source}, copy=True)  # a mapping: not the plain route
        assert handle.staged()
        source[:] = 3
        handle.result(timeout=30)
    finally:
        writer.close()
    stored = read_back(tmp_path / "k.safetensors", SaveFormat.SAFETENSORS)
    assert (stored["a"] == 1).all()
