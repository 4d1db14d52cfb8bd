"""A writer's life at its edges: dropped without close(), open at interpreter exit, inherited by fork()."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tensorsink import AsyncWriter, WriterForkedError
from tensorsink.commit import is_temporary
from tests.support import outputs_under

pytestmark = pytest.mark.usefixtures("each_engine")


def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))  # C threads too, which threading does not see


def _descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_dropped_writer_warns_finishes_its_writes_and_frees_its_threads(tmp_path: Path) -> None:
    torch.full((50_000,), 1.0).sum()  # torch's own threads, started once, before counting
    gc.collect()
    threads, descriptors = _os_threads(), _descriptors()
    for round_ in range(3):
        writer = AsyncWriter(tmp_path / str(round_), "npy")
        futures = [writer.write(f"k{i}", torch.full((50_000,), float(i))) for i in range(20)]
        with pytest.warns(ResourceWarning, match="unclosed AsyncWriter"):
            del writer  # collected at once: nothing of the writer's holds it
        assert all(future.done() for future in futures)
    assert _os_threads() == threads
    assert _descriptors() == descriptors
    assert len([p for p in outputs_under(tmp_path) if p.is_file()]) == 60


def test_a_closed_writer_is_dropped_without_a_warning(tmp_path: Path) -> None:
    writer = AsyncWriter(tmp_path)
    writer.write("a", torch.ones(2))
    writer.close()
    del writer
    gc.collect()  # filterwarnings=error: a ResourceWarning here would fail the test


def _run(script: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "default"},
    )


def test_writes_in_flight_at_exit_are_finished(tmp_path: Path) -> None:
    result = _run(
        """
        import sys, torch
        from tensorsink import AsyncWriter
        writer = AsyncWriter(sys.argv[1], "npy", durability="none")
        for i in range(300):
            writer.write(f"s{i}", torch.full((1 << 20,), float(i)))  # 4 MB each
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    files = outputs_under(tmp_path)
    assert len(files) == 300
    assert all(f.stat().st_size == (4 << 20) + 128 for f in files)
    assert not [p for p in tmp_path.rglob("*") if is_temporary(p.name)]


def test_an_exception_outside_with_still_finishes_the_writes(tmp_path: Path) -> None:
    result = _run(
        """
        import sys, torch
        from tensorsink import AsyncWriter
        writer = AsyncWriter(sys.argv[1], "npy")
        for i in range(50):
            writer.write(f"s{i}", torch.full((1 << 18,), float(i)))
        raise RuntimeError("the job failed")
        """,
        tmp_path,
    )
    assert result.returncode == 1
    assert "the job failed" in result.stderr
    assert len(outputs_under(tmp_path)) == 50


def test_a_failure_at_exit_is_logged_naming_the_key(tmp_path: Path) -> None:
    result = _run(
        """
        import sys, torch
        from tensorsink import AsyncWriter
        def boom(path, value):
            raise ValueError("boom")
        writer = AsyncWriter(sys.argv[1], "npy")
        writer.write("fine", torch.ones(3))
        writer.write_batch(["scene_9"], torch.ones(1, 3), save=boom, suffix=".x")
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "ValueError('boom')" in result.stderr
    assert "'scene_9'" in result.stderr
    assert [p.name for p in outputs_under(tmp_path)] == ["fine.npy"]


def test_a_writer_inherited_by_fork_refuses_and_never_hangs(tmp_path: Path) -> None:
    result = _run(
        """
        import os, sys, torch
        from tensorsink import AsyncWriter, WriterForkedError
        writer = AsyncWriter(sys.argv[1], "npy")
        writer.write("before", torch.ones(1 << 16))
        pid = os.fork()
        if pid == 0:
            for call in (lambda: writer.write("child", torch.ones(3)), writer.flush, writer.close):
                try:
                    call()
                    print("no error", flush=True)
                except WriterForkedError as exc:
                    print("refused:", exc, flush=True)
            sys.exit(0)  # a normal exit: its at-exit hooks must pass the parent's writer by
        _, status = os.waitpid(pid, 0)
        writer.write("after", torch.ones(3))
        writer.close()
        print("child status", os.waitstatus_to_exitcode(status))
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len([line for line in lines if line.startswith("refused: this writer was made in process")]) == 3
    assert "child status 0" in lines
    assert sorted(p.name for p in outputs_under(tmp_path)) == ["after.npy", "before.npy"]


def test_fork_error_is_a_runtime_error() -> None:
    assert issubclass(WriterForkedError, RuntimeError)
