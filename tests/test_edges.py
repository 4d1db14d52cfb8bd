"""A writer at its edges, tried as a hostile or careless user would: done-callbacks that block or close
the writer, writers dropped on their own threads or left open at exit, save functions that write
beside their path, the AsyncWriter object patched and copied, resume after keys collide."""

from __future__ import annotations

import contextlib
import copy
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from tensorsink import AsyncWriter, SaveFunctionError
from tensorsink.commit import is_temporary
from tensorsink.future import WriteFuture


def _run(script: str, tmp_path: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The script in a fresh interpreter; a hang fails the test instead of hanging the run."""
    try:
        return subprocess.run(
            [sys.executable, "-c", textwrap.dedent(script), str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stderr.decode() if isinstance(exc.stderr, bytes) else exc.stderr
        pytest.fail(f"the process hung (killed after {timeout} s); stderr:\n{out}")


def _temporaries_under(root: Path) -> list[str]:
    return sorted(
        str(Path(d, n).relative_to(root))
        for d, dirs, files in os.walk(root)
        for n in files + dirs
        if is_temporary(n)
    )


# Exit must not hang when a done-callback blocks for ever (a bounded queue whose consumer died): at
# exit, writers are closed without waiting for their callbacks.
def test_exit_after_an_exception_does_not_hang_on_a_blocked_done_callback(
    each_engine: str, tmp_path: Path
) -> None:
    result = _run(
        """
        import queue, sys, torch
        from tensorsink import AsyncWriter
        done = queue.Queue(maxsize=4)   # drained by the main loop, which dies below
        writer = AsyncWriter(sys.argv[1])
        for i in range(40):
            writer.write(f"k{i}", torch.zeros(100)).add_done_callback(done.put)
        raise RuntimeError("the model failed")
        """,
        tmp_path,
        timeout=30,
    )
    assert result.returncode == 1
    assert "the model failed" in result.stderr


# A dropped writer may be collected on one of its own threads (a save function held the last
# reference, or a collection ran there): it is closed on a new thread, not there, where it would wait
# for itself.
@pytest.mark.parametrize("how", ["last-reference-in-save", "cyclic-gc-on-pool-thread"])
def test_a_writer_collected_on_one_of_its_own_threads_closes_cleanly(
    each_engine: str, tmp_path: Path, how: str
) -> None:
    result = _run(
        f"""
        import gc, logging, os, sys, threading, time
        import numpy as np
        from tensorsink import AsyncWriter
        logging.basicConfig(level=logging.ERROR)
        root = sys.argv[1]
        how = {how!r}
        released = threading.Event()  # the save functions run once the main thread let go
        if how == "last-reference-in-save":
            writer = AsyncWriter(root)
            def save(path, a, writer=writer):   # e.g. a save function that logs writer.stats()
                released.wait(10)
                np.save(path, a)
        else:
            gc.disable()   # only the collection below, on the pool's thread, finds the cycle
            class Job:   # an object graph with a cycle, as most are
                def __init__(self):
                    self.writer = AsyncWriter(root)
                    self.me = self
            writer = Job().writer
            def save(path, a):
                released.wait(10)
                gc.collect()   # what any allocation on this thread may start
                np.save(path, a)
        future = writer.write_batch(["a", "b"], [np.zeros(3), np.ones(3)], save=save, suffix=".npy")
        del writer, save
        released.set()
        print("result", len(future.result(timeout=20)))
        time.sleep(1)
        left = [t.name for t in threading.enumerate() if t.name.startswith("tensorsink")]
        print("threads left", left)
        assert not left, left
        """,
        tmp_path,
        timeout=45,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "result 2" in result.stdout
    assert "a write failed" not in result.stderr, result.stderr


# flush() and close() return after the callbacks of the writes they waited for: a future's callbacks
# count as pending before its waiters wake. The delay stands for the completing thread descheduled.
def test_flush_and_close_wait_for_the_callbacks_of_writes_that_just_finished(
    each_engine: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = WriteFuture._invoke_callbacks

    def descheduled(self: WriteFuture) -> None:
        time.sleep(0.3)
        original(self)

    ran: list[str] = []
    writer = AsyncWriter(tmp_path)
    try:
        writer.write("warm", torch.zeros(4)).add_done_callback(lambda f: ran.append("warm"))
        writer.flush()
        monkeypatch.setattr(WriteFuture, "_invoke_callbacks", descheduled)
        writer.write("a", torch.zeros(1 << 18)).add_done_callback(lambda f: ran.append("a"))
        writer.flush()
        assert ran == ["warm", "a"], "flush() returned before the callback of a write it waited for"
        writer.write("b", torch.zeros(1 << 18)).add_done_callback(lambda f: ran.append("b"))
    finally:
        writer.close()
    assert ran == ["warm", "a", "b"], "close() returned before (or without ever) running a callback"
    time.sleep(0.5)
    assert not [t for t in threading.enumerate() if t.name == "tensorsink-callbacks"]


# close() in a done-callback while another close() runs must not deadlock the two.
def test_close_in_a_done_callback_while_another_close_runs_does_not_deadlock(
    each_engine: str, tmp_path: Path
) -> None:
    result = _run(
        """
        import sys, threading, time, torch
        from tensorsink import AsyncWriter
        writer = AsyncWriter(sys.argv[1])
        def on_done(future):
            time.sleep(0.3)  # the other close() begins meanwhile
            writer.close()
        writer.write("a", torch.zeros(1 << 18)).add_done_callback(on_done)
        time.sleep(0.05)
        closing = threading.Thread(target=writer.close, daemon=True)
        closing.start()
        closing.join(10)
        assert not closing.is_alive(), "close() deadlocked with the callback's close()"
        print("closed")
        """,
        tmp_path,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "closed" in result.stdout


# AsyncWriter is an ordinary object: mock.patch.object works and undoes itself, a subclass's
# attributes and properties are its own, and copying or pickling it is refused clearly.
def test_the_asyncwriter_wrapper_behaves_like_an_ordinary_object(tmp_path: Path) -> None:
    writer = AsyncWriter(tmp_path / "a")
    try:
        with mock.patch.object(writer, "flush") as flush:
            writer.flush()
        assert flush.call_count == 1
        with mock.patch.object(writer, "write", wraps=writer.write) as write:
            writer.write("x", torch.zeros(2)).result()
        assert write.call_count == 1
        writer.write("y", torch.zeros(2)).result()  # the writer still works after the patches
        with pytest.raises((TypeError, AttributeError)):  # a clear refusal, as pickle's: not a RecursionError
            copy.copy(writer)
    finally:
        inner = object.__getattribute__(writer, "_writer")
        inner.__dict__.pop("write", None)  # undo what a patch that could not undo itself left there
        inner.__dict__.pop("flush", None)
        writer.close()

    half = AsyncWriter.__new__(AsyncWriter)  # as a failed __init__ leaves it, for a debugger's repr
    with contextlib.suppress(AttributeError):  # fine; a RecursionError is not
        repr(half)
    assert not hasattr(half, "anything")

    class Tagged(AsyncWriter):
        def __init__(self, root: Path, tag: str) -> None:
            self.tag = tag
            super().__init__(root)

        @property
        def label(self) -> str:
            return self._label

        @label.setter
        def label(self, value: str) -> None:
            self._label = "set:" + value

    tagged = Tagged(tmp_path / "b", "t")
    tagged.label = "x"
    assert (tagged.tag, tagged.label) == ("t", "set:x")
    tagged.close()


# is_done() follows the files: a key whose file a later write (of another key) replaced, or whose
# latest rewrite failed halfway, is not done.
def test_is_done_forgets_keys_whose_files_are_no_longer_theirs(each_engine: str, tmp_path: Path) -> None:
    writer = AsyncWriter(tmp_path / "collide", "npy", "split", skip_existing=True)
    try:
        writer.write("x", {"b_c": np.zeros(2), "d": np.zeros(2)}).result()
        writer.write("x_b", {"c": np.ones(3)}).result()  # replaces x_b_c.npy, x's file
        assert writer.is_done("x_b")
        assert not writer.is_done("x")  # as a new writer over the same root says
    finally:
        writer.close()

    root = tmp_path / "rewrite"
    writer = AsyncWriter(root, "npy", "split", skip_existing=True)
    try:
        writer.write("k", {"a": np.zeros(2), "b": np.zeros(2)}).result()
        (root / "k_b.npy").unlink()
        (root / "k_b.npy" / "in-the-way").mkdir(parents=True)  # the rewrite's second file fails
        with pytest.raises(IsADirectoryError):
            writer.write("k", {"a": np.ones(2), "b": np.ones(2)}).result()
        assert not writer.is_done("k")  # k_a is new, k_b.npy is a folder: k is not written
    finally:
        with contextlib.suppress(OSError):
            writer.close()


# A save function's path has the file's whole name (.nii.gz, .tar.gz), as libraries that dispatch on
# the extension need.
@pytest.mark.parametrize("suffix", [".nii.gz", ".tar.gz"])
def test_a_save_functions_temporary_ends_in_the_whole_suffix(tmp_path: Path, suffix: str) -> None:
    seen: list[str] = []

    def save(path: Path, value: object) -> None:
        seen.append(path.name)
        if not path.name.endswith(suffix):  # as a library that dispatches on the extension
            raise ValueError(f"cannot work out file type of {path.name}")
        path.write_bytes(b"data")

    with AsyncWriter(tmp_path) as writer:
        writer.write_batch(["scan"], [np.zeros(2)], save=save, suffix=suffix).result()
    assert (tmp_path / f"scan{suffix}").read_bytes() == b"data", seen


# Whatever a save function writes beside its path (a sidecar), whether it succeeds or raises, does
# not stay in the output folder.
@pytest.mark.parametrize("how", ["succeeds", "raises"])
def test_files_a_save_function_wrote_beside_its_temporary_never_stay(
    each_engine: str, tmp_path: Path, how: str
) -> None:
    def save(path: Path, value: np.ndarray) -> None:
        np.save(path, value)
        path.with_suffix(".json").write_text("{}")  # a sidecar beside it
        if how == "raises":
            raise ValueError("disk quota exceeded")

    writer = AsyncWriter(tmp_path)
    future = writer.write_batch(["k"], [np.arange(3)], save=save, suffix=".npy")
    try:
        future.result()
        writer.close()
    except (ValueError, SaveFunctionError):
        with pytest.raises((ValueError, SaveFunctionError)):
            writer.close()
    assert _temporaries_under(tmp_path) == []


# SaveFunctionError pickles and copies (Ray and multiprocessing pickle a task's exception).
def test_save_function_error_survives_pickling(tmp_path: Path) -> None:
    writer = AsyncWriter(tmp_path)
    future = writer.write_batch(["k"], [np.arange(3)], save=lambda p, v: None, suffix=".bin")
    error = future.exception()
    with pytest.raises(SaveFunctionError):
        writer.close()
    assert isinstance(error, SaveFunctionError)
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is SaveFunctionError
    assert str(again) == str(error)
    assert again.strays == error.strays
    assert str(copy.copy(error)) == str(error)


# A producer thread still writing when the main thread returns loses nothing: writers are closed once
# the interpreter has waited for such threads.
def test_a_producer_thread_still_running_at_exit_loses_nothing(each_engine: str, tmp_path: Path) -> None:
    result = _run(
        """
        import sys, threading, time, torch
        from tensorsink import AsyncWriter
        writer = AsyncWriter(sys.argv[1], "npy")
        def produce():
            for i in range(100):
                time.sleep(0.005)  # computing the next output
                writer.write(f"k{i}", torch.full((1000,), float(i)))
        threading.Thread(target=produce).start()   # non-daemon: Python waits for it at exit
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "WriterClosedError" not in result.stderr
    assert len(list(tmp_path.glob("k*.npy"))) == 100


# A batch mapping whose names are equal as str (1 and "1") is refused, not collapsed into one entry.
def test_batch_mapping_names_that_are_equal_as_str_are_refused(tmp_path: Path) -> None:
    writer = AsyncWriter(tmp_path, "npy", "split")
    with writer, pytest.raises((ValueError, TypeError)):  # refused as a duplicate, or as a non-str name
        writer.write_batch(["c"], {1: np.zeros((1, 2)), "1": np.ones((1, 3))})


# A temporary that a save function replaced with a folder does not stay (sweep removes folders too).
def test_a_temporary_replaced_by_a_folder_does_not_stay(each_engine: str, tmp_path: Path) -> None:
    def save(path: Path, value: object) -> None:
        path.unlink()
        path.mkdir()
        (path / "part-0").write_bytes(b"x")  # a library that writes a folder of parts

    writer = AsyncWriter(tmp_path)
    with pytest.raises(SaveFunctionError):
        writer.write_batch(["k"], [np.zeros(2)], save=save, suffix=".zarr").result()
    with pytest.raises(SaveFunctionError):
        writer.close()
    assert _temporaries_under(tmp_path) == []
