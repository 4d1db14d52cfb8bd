"""WriteFuture makes its Condition on first use: every way of looking at a future still sees it settle."""

from __future__ import annotations

import threading
from concurrent.futures import FIRST_COMPLETED, InvalidStateError, as_completed, wait
from pathlib import Path

import pytest
import torch

from tensorsink import AsyncWriter
from tensorsink.future import WriteFuture


def test_a_write_makes_no_condition_until_someone_looks(tmp_path: Path) -> None:
    with AsyncWriter(tmp_path, "npy", durability="none", engine="python") as writer:  # its WriteFuture
        future = writer.write("a", torch.ones(100_000))  # above small_sync_bytes: not written inline
        assert future._made_condition is None  # write() and the completion make none
        future.result(timeout=10)  # looking makes one
    assert future._made_condition is not None
    assert future.result() == [tmp_path / "a.npy"]
    assert all(isinstance(path, Path) for path in future.result())


def test_settled_bare_then_looked_at() -> None:
    future = WriteFuture()
    future.set_result([Path("/x/a.npy")])
    assert future._made_condition is None  # nobody had looked
    assert future.done()
    assert future.result(timeout=0) == [Path("/x/a.npy")]
    seen: list[WriteFuture] = []
    future.add_done_callback(seen.append)  # a callback added after the result runs at once
    assert seen == [future]
    assert list(as_completed([future], timeout=0)) == [future]


def test_failure_settled_bare() -> None:
    future = WriteFuture()
    future.set_exception(OSError(28, "No space left on device"))
    assert isinstance(future.exception(timeout=0), OSError)
    with pytest.raises(OSError, match="No space"):
        future.result(timeout=0)


def test_settling_twice_is_refused_both_ways() -> None:
    bare = WriteFuture()
    bare.set_result([])
    with pytest.raises(InvalidStateError):
        bare.set_result([])
    looked = WriteFuture()
    assert not looked.done()  # makes the Condition
    looked.set_result([])
    with pytest.raises(InvalidStateError):
        looked.set_exception(RuntimeError("late"))


def test_waiters_and_callbacks_registered_before_settling_are_woken() -> None:
    future = WriteFuture()
    called = threading.Event()
    future.add_done_callback(lambda f: called.set())
    results: list[object] = []
    waiter = threading.Thread(target=lambda: results.append(future.result(timeout=10)))
    waiter.start()
    other = WriteFuture()
    waited = threading.Thread(target=lambda: results.append(wait([other], 10, FIRST_COMPLETED).done))
    waited.start()
    future.set_result([Path("/r/a.pt")])
    other.set_result([])
    waiter.join(10)
    waited.join(10)
    assert called.is_set()
    assert [Path("/r/a.pt")] in results
    assert {other} in results


def test_settle_racing_first_looks_never_hangs() -> None:
    """A completion and a waiter's first look race many times: the waiter always returns."""
    for _ in range(500):
        future = WriteFuture()
        box: list[object] = []
        waiter = threading.Thread(target=lambda f=future, b=box: b.append(f.result(timeout=10)))
        waiter.start()
        future.set_result([])
        waiter.join(10)
        assert not waiter.is_alive()
        assert box == [[]]


def test_staged_follows_the_result() -> None:
    future = WriteFuture(staged_apart=True)
    assert not future.staged()
    future.set_result([])
    assert future.staged()
    assert future.wait_staged(0)
