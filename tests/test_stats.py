"""What stats() and the progress lines tell a user: the callers' time inside write(), whole."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
import torch

from tensorsink import AsyncWriter
from tensorsink.formats import Buffer, FileEntry
from tests.support import GatedFormat


@pytest.mark.usefixtures("each_engine")
def test_write_seconds_count_every_call_whole(tmp_path: Path) -> None:
    """Inline writes (python engine, durability none) and queued ones alike."""
    with AsyncWriter(tmp_path, "npy", durability="none") as writer:
        spent = 0.0
        for i in range(50):
            began = time.perf_counter()
            writer.write(f"k{i}", torch.ones(4096))
            spent += time.perf_counter() - began
        writer.flush()
        stats = writer.stats()
    assert stats.writes == 50
    assert 0 < stats.write_seconds <= spent
    assert stats.blocked_seconds <= stats.write_seconds
    assert "in 50 write() calls" in str(stats)


class _SlowFormat(GatedFormat):
    """Takes 20 ms a file, wherever it is written."""

    def encode(self, entry: FileEntry) -> list[Buffer]:
        time.sleep(0.02)
        return super().encode(entry)

    def encode_with_crc(self, entry: FileEntry) -> tuple[list[Buffer], int | None]:
        time.sleep(0.02)
        return super().encode_with_crc(entry)


def test_a_file_written_on_the_callers_thread_counts_in_write_seconds(tmp_path: Path) -> None:
    """The python engine writes small files inline with durability none: that time is the caller's."""
    writer = AsyncWriter(tmp_path, "npy", durability="none", engine="python")
    writer._use_format(_SlowFormat(writer._format))
    for i in range(5):
        writer.write(f"k{i}", torch.ones(4))
    writer.close()
    stats = writer.stats()
    assert stats.files == 5
    assert stats.write_seconds >= 5 * 0.02
    assert stats.blocked_seconds == 0.0  # none of it waited for the budget


def test_blocked_time_is_the_part_that_waited_for_the_budget(tmp_path: Path) -> None:
    writer = AsyncWriter(tmp_path, "npy", durability="none", max_inflight=1, engine="native")
    gate = GatedFormat(writer._format)
    writer._use_format(gate)  # the first write holds the budget until the gate opens
    first = writer.write("held", torch.ones(4))
    assert gate.entered.acquire(timeout=10)

    def open_gate_later() -> None:
        time.sleep(0.3)
        gate.gate.set()

    threading.Thread(target=open_gate_later).start()
    writer.write("second", torch.ones(4))  # waits for room
    first.result(timeout=10)
    writer.close()
    stats = writer.stats()
    assert stats.blocked_seconds >= 0.2
    assert stats.write_seconds >= stats.blocked_seconds


def test_progress_lines_in_the_logging_conventions(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tensorsink")
    with AsyncWriter(tmp_path, "npy", durability="none", progress_seconds=0.01) as writer:
        for i in range(20):
            writer.write(f"k{i}", torch.ones(1000)).result()
            time.sleep(0.005)
    lines = [
        r.getMessage() for r in caplog.records if r.name == "tensorsink" and " files, " in r.getMessage()
    ]
    assert len(lines) >= 2
    assert lines[-1].startswith("tensorsink: closed after 20 files")
    assert all(r.levelno == logging.INFO for r in caplog.records if " files, " in r.getMessage())


def test_no_progress_lines_unless_asked(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tensorsink")
    with AsyncWriter(tmp_path, "npy", durability="none") as writer:
        writer.write("k", torch.ones(10)).result()
    assert not [r for r in caplog.records if " files, " in r.getMessage()]


def test_progress_seconds_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"progress_seconds=0 is not valid"):
        AsyncWriter(tmp_path, progress_seconds=0)
