"""KvikioWriter against a stand-in for kvikio's CuFile: whole blocks only, every future waited for.

The stand-in splits each pwrite into tasks of `task_size` run by a thread pool, as kvikio does, and
records which file blocks each task and each host write touched, and when the handle was closed.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tensorsink.backends import kvikio_writer as module
from tensorsink.backends.kvikio_writer import BLOCK, KvikioWriter
from tensorsink.formats import FileEntry, HeaderFormat, format_for
from tensorsink.options import DictMode, SaveFormat
from tensorsink.plan import plan_files


def _blocks(offset: int, size: int) -> set[int]:
    return set(range(offset // BLOCK, (offset + size - 1) // BLOCK + 1)) if size else set()


class _Future:
    def __init__(self, parts: list[Future[int]], short: int = 0) -> None:
        self.parts = parts
        self.short = short

    def get(self) -> int:
        return sum(part.result() for part in self.parts) - self.short


class FakeKvikio:
    """What KvikioWriter uses of kvikio: CuFile(path, "r+") with pwrite(buffer, size, offset).get()."""

    def __init__(self, task_size: int = 2 * BLOCK, delay: float = 0.002) -> None:
        self.task_size = task_size
        self.delay = delay
        self.pool = ThreadPoolExecutor(4)
        self.tasks: list[tuple[int, int]] = []  # (offset, size) of each task
        self.running = 0
        self.lock = threading.Lock()
        self.events: list[str] = []
        self.fail_call: int | None = None  # raise at this pwrite call (1-based)
        self.fail_task: int | None = None  # this task's future raises
        self.short = 0  # the first pwrite's future reports this many bytes too few
        self.calls = 0
        fake = self

        class CuFile:
            def __init__(self, path: str, mode: str) -> None:
                assert mode == "r+"
                self.fd = os.open(path, os.O_WRONLY)

            def pwrite(self, buffer: torch.Tensor, size: int, offset: int) -> _Future:
                fake.calls += 1
                if fake.calls == fake.fail_call:
                    raise OSError(5, "injected at pwrite")
                data = buffer.numpy().tobytes()
                assert len(data) == size
                parts = []
                for start in range(0, size, fake.task_size):
                    piece = data[start : start + fake.task_size]
                    parts.append(fake.pool.submit(fake.task, self.fd, piece, offset + start))
                short, fake.short = fake.short, 0
                return _Future(parts, short)

            def close(self) -> None:
                with fake.lock:
                    fake.events.append(f"close with {fake.running} running")
                os.close(self.fd)

        self.CuFile = CuFile

    def task(self, fd: int, piece: bytes, offset: int) -> int:
        with self.lock:
            self.running += 1
            number = len(self.tasks)
            self.tasks.append((offset, len(piece)))
        try:
            time.sleep(self.delay)
            if number + 1 == self.fail_task:
                raise OSError(5, "injected in a task")
            os.pwrite(fd, piece, offset)
            with self.lock:
                self.events.append("task done")
            return len(piece)
        finally:
            with self.lock:
                self.running -= 1


@pytest.fixture
def host_writes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    seen: list[tuple[int, int]] = []
    original = module._pwrite_all

    def recording(fd: int, view: memoryview, offset: int) -> None:
        seen.append((offset, len(view)))
        original(fd, view, offset)

    monkeypatch.setattr(module, "_pwrite_all", recording)
    return seen


def _entry(tmp_path: Path, fmt: HeaderFormat, value: object) -> FileEntry:
    (entry,) = plan_files(str(tmp_path), "out", value, fmt, DictMode.SINGLE)
    return entry


def _write(tmp_path: Path, fake: FakeKvikio, fmt: HeaderFormat, entry: FileEntry, device: set[int]) -> Path:
    writer = KvikioWriter(1, fake.task_size, False, kvikio=fake, device=lambda a: id(a) in device)
    path = tmp_path / "file"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        writer.write(fd, str(path), fmt, entry)
    finally:
        os.close(fd)
    return path


@pytest.mark.parametrize("name", ["safetensors", "npy"])
def test_no_two_writes_share_a_block_and_the_bytes_are_the_formats(
    tmp_path: Path, host_writes: list[tuple[int, int]], name: str
) -> None:
    fmt = format_for(SaveFormat(name), None)
    assert isinstance(fmt, HeaderFormat)
    generator = torch.Generator().manual_seed(13)
    if name == "npy":
        value: object = torch.rand(7001, generator=generator)  # 28,004 bytes after a 128-byte header
        device = {id(value)}
    else:  # odd sizes back to back, one of them in host memory, as safetensors packs them
        tensors = {
            n: torch.rand(s, generator=generator) for n, s in [("a", 1250), ("b", 9), ("c", 5000), ("d", 3)]
        }
        value = tensors
        device = {id(tensors["a"]), id(tensors["c"]), id(tensors["d"])}
    fake = FakeKvikio()
    entry = _entry(tmp_path, fmt, value)
    path = _write(tmp_path, fake, fmt, entry, device)
    expected = b"".join(bytes(memoryview(buffer)) for buffer in fmt.encode(entry))
    assert path.read_bytes() == expected
    assert fake.tasks, "no payload went through kvikio: the test proves nothing"
    for offset, size in fake.tasks:
        assert offset % BLOCK == 0, (offset, size)
        assert size % BLOCK == 0, (offset, size)
    header = len(fmt.header(entry))
    touched = [_blocks(offset, size) for offset, size in fake.tasks]
    host = set().union(*(_blocks(offset, size) for offset, size in host_writes), _blocks(0, header))
    for i, blocks in enumerate(touched):
        assert not blocks & host, "a kvikio task shares a block with a host write"
        for other in touched[i + 1 :]:
            assert not blocks & other, "two kvikio tasks share a block"


def test_a_failing_pwrite_waits_for_the_earlier_ones_before_closing(
    tmp_path: Path, host_writes: list[tuple[int, int]]
) -> None:
    fmt = format_for(SaveFormat.SAFETENSORS, None)
    assert isinstance(fmt, HeaderFormat)
    tensors = {"a": torch.ones(64 * BLOCK // 4), "b": torch.ones(64 * BLOCK // 4)}
    fake = FakeKvikio(delay=0.02)
    fake.fail_call = 2
    with pytest.raises(OSError, match="injected at pwrite"):
        _write(tmp_path, fake, fmt, _entry(tmp_path, fmt, tensors), {id(t) for t in tensors.values()})
    assert fake.events[-1] == "close with 0 running"
    assert fake.events.count("task done") == len(fake.tasks) > 1  # every earlier task ran before close


def test_a_failing_task_still_waits_for_the_rest(tmp_path: Path, host_writes: list[tuple[int, int]]) -> None:
    fmt = format_for(SaveFormat.SAFETENSORS, None)
    assert isinstance(fmt, HeaderFormat)
    tensors = {"a": torch.ones(16 * BLOCK // 4), "b": torch.ones(16 * BLOCK // 4)}
    fake = FakeKvikio(delay=0.01)
    fake.fail_task = 1
    with pytest.raises(OSError, match="injected in a task"):
        _write(tmp_path, fake, fmt, _entry(tmp_path, fmt, tensors), {id(t) for t in tensors.values()})
    assert fake.events[-1] == "close with 0 running"
    assert fake.events.count("task done") == len(fake.tasks) - 1


def test_a_short_kvikio_write_fails_the_file(tmp_path: Path, host_writes: list[tuple[int, int]]) -> None:
    fmt = format_for(SaveFormat.NUMPY_NPY, None)
    assert isinstance(fmt, HeaderFormat)
    value = torch.ones(8 * BLOCK // 4)
    fake = FakeKvikio()
    fake.short = 1
    with pytest.raises(OSError, match=r"kvikio wrote \d+ of \d+ bytes"):
        _write(tmp_path, fake, fmt, _entry(tmp_path, fmt, value), {id(value)})
    assert fake.events[-1] == "close with 0 running"


def test_a_file_that_takes_no_bytes_is_an_error_not_a_spin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(module.os, "pwrite", lambda fd, data, offset: 0)
    with pytest.raises(OSError, match="wrote no bytes"):
        module._pwrite_all(-1, memoryview(b"abc"), 0)
