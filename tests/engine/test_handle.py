"""The native engine's write handle: what write() returns on the ready route, settled in C."""

from __future__ import annotations

import threading
from concurrent.futures import FIRST_COMPLETED, TimeoutError, wait
from pathlib import Path

import pytest
import torch

from tensorsink import AsyncWriter, WriteFuture

pytest.importorskip("tensorsink.engine.native", reason="the native engine was not built")
from tensorsink.engine.native import Handle


def test_a_ready_write_returns_a_handle_with_a_futures_uses(tmp_path: Path) -> None:
    with AsyncWriter(tmp_path, "safetensors", engine="native") as writer:
        handle = writer.write("a/b", torch.arange(10))
        assert isinstance(handle, Handle)
        assert handle.result(timeout=10) == [tmp_path / "a" / "b.safetensors"]
        assert all(isinstance(path, Path) for path in handle.result())
        assert handle.done()
        assert not handle.running()
        assert handle.staged()
        assert handle.wait_staged(0)
        assert handle.exception() is None
        assert handle.cancel() is False
        assert handle.cancelled() is False
        assert "done" in repr(handle)
        seen: list[object] = []
        handle.add_done_callback(seen.append)  # settled: runs at once, on this thread
        assert seen == [handle]
    with pytest.raises(TypeError, match="made by the engine"):
        Handle()


def test_a_handle_becomes_a_concurrent_futures_future(tmp_path: Path) -> None:
    with AsyncWriter(tmp_path, "npy", engine="native") as writer:
        handles = [writer.write(f"k{i}", torch.ones(1000)) for i in range(8)]
        futures = [h.as_future() for h in handles]
        done, _ = wait(futures, timeout=10)
        assert len(done) == 8
        assert futures[3].result() == [tmp_path / "k3.npy"]
    assert isinstance(WriteFuture().as_future(), WriteFuture)  # the Python engine's: itself


def test_a_failed_write_raises_from_its_handle_and_the_writer_the_same_exception(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_bytes(b"")
    writer = AsyncWriter(tmp_path, "npy", engine="native")
    handle = writer.write("blocker/x", torch.ones(3))
    failure = handle.exception(timeout=10)
    assert isinstance(failure, NotADirectoryError)
    assert any("'blocker/x'" in note for note in failure.__notes__)
    with pytest.raises(NotADirectoryError) as raised:
        handle.result()
    assert raised.value is failure
    with pytest.raises(NotADirectoryError) as again:
        writer.write("fine", torch.ones(3))
    assert again.value is failure
    with pytest.raises(NotADirectoryError):
        writer.close()
    assert writer.stats().errors == 1


def _held(gate: threading.Event):  # type: ignore[no-untyped-def]
    """A save function that waits for `gate` before it writes: holds its write (and its budget)."""

    def save(path: Path, value: object) -> None:
        gate.wait(10)
        path.write_bytes(b"x")

    return save


def test_callbacks_added_while_pending_run_on_the_callback_thread_before_flush_returns(
    tmp_path: Path,
) -> None:
    writer = AsyncWriter(tmp_path, "npy", engine="native", max_inflight=1)
    gate = threading.Event()
    blocker = writer.write_batch(["slow"], [torch.ones(3)], save=_held(gate), suffix=".bin")
    box: list[object] = []
    thread = threading.Thread(target=lambda: box.append(writer.write("after", torch.ones(3))))
    thread.start()  # waits for room: the budget holds one write
    gate.set()
    thread.join(10)
    handle = box[0]
    ran: list[str] = []
    handle.add_done_callback(lambda h: ran.append(threading.current_thread().name))  # type: ignore[attr-defined]
    assert handle.result(timeout=10) == [tmp_path / "after.npy"]  # type: ignore[attr-defined]
    writer.flush()  # returns after the callbacks of the writes it waited for
    assert len(ran) == 1
    assert ran[0] in ("MainThread", "tensorsink-callbacks")  # settled already, or handed on
    assert blocker.result() == [tmp_path / "slow.bin"]
    writer.close()


def test_result_times_out_while_the_write_is_held(tmp_path: Path) -> None:
    writer = AsyncWriter(tmp_path, "npy", engine="native")
    gate = threading.Event()
    held = writer.write("held", torch.ones(3))  # a ready-route handle, settled by the C threads
    slow = writer.write_batch(["slow"], [torch.ones(3)], save=_held(gate), suffix=".bin")
    with pytest.raises(TimeoutError):
        slow.result(timeout=0.01)
    gate.set()
    writer.close()
    assert wait([slow.as_future(), held.as_future()], 10, FIRST_COMPLETED).done
