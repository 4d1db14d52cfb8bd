"""One suite, every engine: the commit protocol as the engine interface promises it.

Each test runs against the native engine and its pure-Python twin (the `engine` fixture); the
writer-level suites that inject faults and kill processes run against both too (`each_engine`).
"""

from __future__ import annotations

import os
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from tensorsink import AsyncWriter, Durability, SaveFormat, SymlinkError
from tensorsink.engine import Engine, FileJob, FileOutcome, available_engines
from tensorsink.manifest import Manifest
from tests.support import SUPPORTED, random_tensor

ENGINES = ["native", "python"]


class Collector:
    """on_complete for tests: keeps every finished batch and lets a test wait for a count of them."""

    def __init__(self) -> None:
        self.batches: dict[object, list[FileOutcome]] = {}
        self._cond = threading.Condition()

    def __call__(self, batches: list[tuple[object, list[FileOutcome]]]) -> None:
        with self._cond:
            self.batches.update(batches)
            self._cond.notify_all()

    def wait(self, count: int) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.batches) >= count, timeout=30), self.batches


@pytest.fixture(params=ENGINES)
def kind(request: pytest.FixtureRequest) -> type[Engine]:
    engines = available_engines()
    if request.param not in engines:
        pytest.fail("the native engine was not built")
    return engines[request.param]


@pytest.fixture(params=list(Durability))
def engine(
    kind: type[Engine], tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[Engine, Collector]]:
    done = Collector()
    engine = kind(2, request.param, str(tmp_path), done)
    try:
        yield engine, done
    finally:
        engine.close()


def _jobs(engine: Engine, files: dict[str, list[bytes]], checksum: bool = True) -> list[FileJob]:
    paths = [f"{engine.root}/{name}" for name in files]
    numbers = engine.reserve(paths)
    return [
        FileJob(path, f"{path.rpartition('/')[0]}/.{path.rpartition('/')[2]}.tsink-0{i}.partial", data, -1,
                checksum, number)
        for i, (path, data, number) in enumerate(zip(paths, files.values(), numbers, strict=True))
    ]  # fmt: skip


def test_checksummed_writes_of_every_mix_of_view_sizes(
    engine: tuple[Engine, Collector], tmp_path: Path
) -> None:
    """Large views are checksummed and written a piece (256 KiB) at a time, runs of small ones
    together: no byte lost, doubled or left out of the CRC at the pieces' edges."""
    eng, done = engine
    piece = 256 << 10
    data = np.random.default_rng(3).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()
    sizes = {
        "edges.bin": [0, 1, piece - 1, piece, piece + 1, 2 * piece - 1, 2 * piece + 1, 0, 7],
        "small-run.bin": [1000] * 300 + [piece] + [10] * 70,  # more views than one writev takes
        "just-under.bin": [piece - 1] * 5,
    }
    files: dict[str, list[bytes]] = {}
    for name, lengths in sizes.items():
        offset, views = 0, []
        for length in lengths:
            views.append(data[offset : offset + length])
            offset = (offset + length) % (1 << 20)
        files[name] = views
    eng.submit("t", _jobs(eng, files))
    done.wait(1)
    for (name, views), outcome in zip(files.items(), done.batches["t"], strict=True):
        whole = b"".join(views)
        assert outcome.error is None
        assert (outcome.size, outcome.crc) == (len(whole), zlib.crc32(whole)), name
        assert (tmp_path / name).read_bytes() == whole


def test_a_crc_given_with_the_job_is_taken_as_the_files(engine: tuple[Engine, Collector]) -> None:
    """A format that knows its file's CRC (NPZ, .pt) spares the engine the checksum pass: the engine
    reports the CRC it was given, so a wrong one shows here, not a recomputed one."""
    eng, done = engine
    given, computed = _jobs(eng, {"given.bin": [b"payload"], "computed.bin": [b"payload"]})
    eng.submit("t", [given._replace(crc=0xDEADBEEF), computed])
    done.wait(1)
    assert [o.crc for o in done.batches["t"]] == [0xDEADBEEF, zlib.crc32(b"payload")]


def _listing(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_a_batch_is_committed_whole_with_sizes_and_crcs(
    engine: tuple[Engine, Collector], tmp_path: Path
) -> None:
    eng, done = engine
    data = {"a.bin": [b"head", memoryview(b"-payload"), b""], "d/e/b.bin": [os.urandom(3 << 20)] * 3}
    eng.submit("t", _jobs(eng, data))
    done.wait(1)
    outcomes = done.batches["t"]
    for (name, buffers), outcome in zip(data.items(), outcomes, strict=True):
        whole = b"".join(bytes(b) for b in buffers)
        assert outcome.error is None
        assert outcome.replaced
        assert (outcome.size, outcome.crc) == (len(whole), zlib.crc32(whole))
        assert (tmp_path / name).read_bytes() == whole
        assert outcome.renamed_at > 0
    assert _listing(tmp_path) == ["a.bin", "d/e/b.bin"]


def test_the_latest_reserved_write_wins_whichever_is_submitted_first(
    engine: tuple[Engine, Collector], tmp_path: Path
) -> None:
    eng, done = engine
    (early,) = _jobs(eng, {"k.bin": [b"early"]})
    (late,) = _jobs(eng, {"k.bin": [b"late"]})
    eng.submit("late", [late._replace(temporary=late.temporary + "x")])
    done.wait(1)
    eng.submit("early", [early])
    done.wait(2)
    assert done.batches["late"][0].replaced
    assert not done.batches["early"][0].replaced
    assert done.batches["early"][0].error is None
    assert (tmp_path / "k.bin").read_bytes() == b"late"
    assert _listing(tmp_path) == ["k.bin"]  # the superseded temporary is gone


def test_a_failure_names_the_path_keeps_its_errno_and_leaves_no_temporary(
    engine: tuple[Engine, Collector], tmp_path: Path
) -> None:
    eng, done = engine
    (tmp_path / "blocker").write_bytes(b"")
    (tmp_path / "taken").mkdir()
    eng.submit("t", _jobs(eng, {"blocker/x.bin": [b"x"], "fine.bin": [b"ok"], "taken": [b"dir"]}))
    done.wait(1)
    under_file, fine, onto_folder = done.batches["t"]
    assert isinstance(under_file.error, NotADirectoryError)
    assert "blocker" in str(under_file.error)
    assert fine.error is None
    assert fine.replaced
    assert isinstance(onto_folder.error, IsADirectoryError)
    assert onto_folder.error.filename == str(tmp_path / "taken")
    assert _listing(tmp_path) == ["blocker", "fine.bin"]


def test_symlinked_folders_are_refused(engine: tuple[Engine, Collector], tmp_path: Path) -> None:
    eng, done = engine
    elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    elsewhere.mkdir()
    (tmp_path / "link").symlink_to(elsewhere)
    eng.submit("t", _jobs(eng, {"link/x.bin": [b"x"]}))
    done.wait(1)
    (outcome,) = done.batches["t"]
    assert isinstance(outcome.error, SymlinkError)
    assert outcome.error.link == str(tmp_path / "link")
    assert list(elsewhere.iterdir()) == []


def test_a_folder_removed_midway_is_made_again(engine: tuple[Engine, Collector], tmp_path: Path) -> None:
    eng, done = engine
    eng.submit(1, _jobs(eng, {"d/a.bin": [b"a"]}))
    done.wait(1)
    (tmp_path / "d" / "a.bin").unlink()
    (tmp_path / "d").rmdir()
    eng.submit(2, _jobs(eng, {"d/b.bin": [b"b"]}))
    done.wait(2)
    assert done.batches[2][0].error is None
    assert (tmp_path / "d" / "b.bin").read_bytes() == b"b"


def test_a_temporary_written_elsewhere_is_adopted(engine: tuple[Engine, Collector], tmp_path: Path) -> None:
    eng, done = engine
    final = f"{tmp_path}/adopted.bin"
    temporary = f"{tmp_path}/.adopted.bin.tsink-01.partial"
    fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    os.write(fd, b"written by another writer")
    (number,) = eng.reserve([final])
    eng.submit("t", [FileJob(final, temporary, None, fd, True, number)])
    done.wait(1)
    (outcome,) = done.batches["t"]
    assert outcome.error is None
    assert (outcome.size, outcome.crc) == (25, zlib.crc32(b"written by another writer"))
    assert _listing(tmp_path) == ["adopted.bin"]
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)  # the engine closed it


def test_many_concurrent_batches_all_complete(engine: tuple[Engine, Collector], tmp_path: Path) -> None:
    eng, done = engine

    def submit(thread: int) -> None:
        for i in range(50):
            eng.submit(
                (thread, i), _jobs(eng, {f"t{thread}/{i}.bin": [bytes([i]) * (i * 100)]}, checksum=False)
            )

    threads = [threading.Thread(target=submit, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.wait(200)
    assert all(outcomes[0].error is None for outcomes in done.batches.values())
    assert len(_listing(tmp_path)) == 200


@pytest.mark.parametrize("save_format", list(SaveFormat))
def test_every_format_is_byte_identical_whichever_engine_wrote_it(
    tmp_path: Path, save_format: SaveFormat
) -> None:
    if "native" not in available_engines():
        pytest.fail("the native engine was not built")
    values = {f"v{i}": random_tensor((3, 5), dtype, seed=i) for i, dtype in enumerate(SUPPORTED[save_format])}
    for name in ENGINES:
        with AsyncWriter(tmp_path / name, save_format, "split", engine=name, manifest=True) as writer:
            writer.write("mapping", values)
            writer.write_batch(["b0", "b1"], torch.arange(12.0).reshape(2, 6))
        assert writer.stats().engine == name
    native, python = (
        [p for p in _listing(tmp_path / name) if not p.startswith(".tensorsink/")] for name in ENGINES
    )
    assert native == python
    assert len(native) == len(values) + 2
    for relative in native:
        assert (tmp_path / "native" / relative).read_bytes() == (tmp_path / "python" / relative).read_bytes()
    records = [Manifest.load(tmp_path / name).records for name in ENGINES]
    assert {p: (r["bytes"], r["crc32"]) for p, r in records[0].items()} == {
        p: (r["bytes"], r["crc32"]) for p, r in records[1].items()
    }


def test_asking_for_an_engine_that_is_missing_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tensorsink.engine as engines

    monkeypatch.setattr(engines, "available_engines", lambda: {"python": engines.PythonEngine})
    with pytest.raises(ValueError, match=r"engine='native'.*not available"):
        AsyncWriter(tmp_path, engine="native")
    with AsyncWriter(tmp_path, SaveFormat.NUMPY_NPY) as writer:  # auto falls back
        writer.write("x", np.zeros(3))
    assert writer.stats().engine == "python"
