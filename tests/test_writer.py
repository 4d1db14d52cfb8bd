"""AsyncWriter's scheduling: backpressure, threads, errors, same-key ordering, the upload queue."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from tensorsink import AsyncWriter, DictMode, Durability, SaveFormat, WriterClosedError
from tensorsink.commit import is_temporary
from tests.support import GatedFormat, outputs_under, wait_until

BIG = 100_000  # bytes per tensor below; above the default small_sync_bytes


def _tensor(value: float, nbytes: int = BIG) -> torch.Tensor:
    return torch.full((nbytes // 4,), value, dtype=torch.float32)


@pytest.fixture
def gated(tmp_path: Path) -> Iterator[tuple[AsyncWriter, GatedFormat]]:
    # The Python engine: its writes run where the gate can hold them, and small ones inline.
    writer = AsyncWriter(
        tmp_path, SaveFormat.NUMPY_NPY, workers=2, max_inflight=2, durability="none", engine="python"
    )
    gate = GatedFormat(writer._format)
    writer._use_format(gate)
    try:
        yield writer, gate
    finally:
        gate.gate.set()
        writer.close()


def _in_thread(target, *args):  # type: ignore[no-untyped-def]
    result: dict[str, object] = {}

    def run() -> None:
        try:
            result["value"] = target(*args)
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def _wait_until_blocked(writer: AsyncWriter) -> None:
    wait_until(lambda: writer._pipeline.budget.waiting > 0, "no write() waited for the budget")


def _files(root: Path) -> list[Path]:
    return [p for p in outputs_under(root) if p.is_file()]


def test_write_blocks_at_max_inflight_and_resumes(gated: tuple[AsyncWriter, GatedFormat]) -> None:
    writer, gate = gated
    first = [writer.write(f"k{i}", _tensor(i)) for i in range(2)]
    for _ in range(2):
        assert gate.entered.acquire(timeout=10)
    thread, result = _in_thread(writer.write, "k2", _tensor(2))
    _wait_until_blocked(writer)
    assert thread.is_alive(), "the third write() should wait while two are in flight"
    assert writer.stats().in_flight == 2
    gate.gate.set()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert "error" not in result
    writer.flush()
    assert all(f.done() for f in first)
    assert writer.stats().blocked_seconds > 0
    assert [p.name for p in _files(writer.root)] == ["k0.npy", "k1.npy", "k2.npy"]


def test_byte_budget_blocks_and_admits_an_oversized_write_alone(tmp_path: Path) -> None:
    writer = AsyncWriter(tmp_path, SaveFormat.NUMPY_NPY, workers=2, max_inflight_bytes=3 * BIG)
    gate = GatedFormat(writer._format)
    writer._use_format(gate)
    try:
        writer.write("a", _tensor(0))
        writer.write("b", _tensor(1))
        assert gate.entered.acquire(timeout=10)
        assert gate.entered.acquire(timeout=10)
        thread, result = _in_thread(writer.write, "huge", _tensor(2, 10 * BIG))
        _wait_until_blocked(writer)
        assert thread.is_alive(), "a write over the byte budget waits until nothing else is in flight"
        gate.gate.set()
        thread.join(timeout=10)
        assert "error" not in result
        writer.flush()
    finally:
        gate.gate.set()
        writer.close()
    assert np.load(tmp_path / "huge.npy").nbytes == 10 * BIG


def test_small_writes_run_on_the_callers_thread_with_the_python_engine(tmp_path: Path) -> None:
    with AsyncWriter(
        tmp_path, SaveFormat.NUMPY_NPY, small_sync_bytes=1000, durability="none", engine="python"
    ) as writer:
        future = writer.write("small", torch.zeros(10))
        assert future.done()  # already committed when write() returned
        assert (tmp_path / "small.npy").exists()


@pytest.mark.parametrize("durability", [Durability.FILE, Durability.FULL])
def test_small_writes_that_fsync_go_to_the_workers(tmp_path: Path, durability: Durability) -> None:
    with AsyncWriter(tmp_path, SaveFormat.NUMPY_NPY, small_sync_bytes=1000, durability=durability) as writer:
        gated = GatedFormat(writer._format)
        writer._use_format(gated)
        future = writer.write("small", torch.zeros(10))  # held at the gate only on a worker
        assert not future.done()
        gated.gate.set()
        assert future.result(timeout=30) == [tmp_path / "small.npy"]


def test_many_threads_writing_at_once(tmp_path: Path) -> None:
    uploads: queue.Queue[Path] = queue.Queue()
    with AsyncWriter(
        tmp_path, SaveFormat.SAFETENSORS, workers=3, max_inflight=4, upload_queue=uploads
    ) as writer:

        def produce(thread: int) -> None:
            for i in range(40):
                writer.write(f"t{thread}/s{i}", {"v": _tensor(thread * 1000 + i, 4 * (i % 3) * 10_000 + 4)})

        threads = [threading.Thread(target=produce, args=(t,)) for t in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert writer.stats().files == 240
    files = _files(tmp_path)
    assert len(files) == 240
    assert uploads.qsize() == 240
    from safetensors.torch import load_file

    for thread in range(6):
        for i in range(40):
            assert load_file(tmp_path / f"t{thread}/s{i}.safetensors")["v"][0].item() == thread * 1000 + i


def _fail_in_background(writer: AsyncWriter) -> None:
    (writer.root / "blocker").write_bytes(b"a file where a directory should be")
    future = writer.write("blocker/x", _tensor(1))
    with pytest.raises(OSError, match="blocker"):
        future.result(timeout=10)


def test_background_error_is_raised_by_next_write_flush_and_close(tmp_path: Path) -> None:
    writer = AsyncWriter(tmp_path, SaveFormat.NUMPY_NPY)
    _fail_in_background(writer)
    with pytest.raises(OSError, match="blocker") as first:
        writer.write("unrelated", _tensor(2))
    with pytest.raises(OSError, match="blocker") as flushed:
        writer.flush()
    with pytest.raises(OSError, match="blocker") as closed:
        writer.close()
    assert first.value is flushed.value is closed.value
    assert writer.pool._shutdown  # the workers are stopped even though close() raised
    assert writer.stats().errors == 1
    assert not (tmp_path / "unrelated.npy").exists()
    assert [p.name for p in _files(tmp_path)] == ["blocker"]  # no final file, no temporary


def test_context_manager_raises_background_error_on_exit(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="blocker"), AsyncWriter(tmp_path, SaveFormat.NUMPY_NPY) as writer:  # noqa: PT012
        (tmp_path / "blocker").write_bytes(b"")
        writer.write("blocker/x", _tensor(1))
    assert writer.pool._shutdown


def test_error_in_body_is_not_masked_by_close(tmp_path: Path) -> None:
    with pytest.raises(KeyError), AsyncWriter(tmp_path) as writer:  # noqa: PT012
        writer.write("a", _tensor(1))
        raise KeyError("from the body")
    assert (tmp_path / "a.pt").exists()


@pytest.mark.parametrize("durability", ["none", "file"])
def test_a_failed_write_fails_the_writer_wherever_it_ran(tmp_path: Path, durability: str) -> None:
    """Inline (small, durability none) or in a worker: one rule, the writer stays failed."""
    (tmp_path / "blocker").write_bytes(b"")
    writer = AsyncWriter(tmp_path, SaveFormat.NUMPY_NPY, durability=durability)
    try:
        writer.write("blocker/small", torch.zeros(4)).result(timeout=30)
    except NotADirectoryError as exc:
        first = exc
    else:
        raise AssertionError("writing under a file succeeded")
    assert "blocker" in str(first)
    with pytest.raises(NotADirectoryError) as later:
        writer.write("fine", torch.zeros(4))
    assert later.value is first
    with pytest.raises(NotADirectoryError):
        writer.close()
    assert not (tmp_path / "fine.npy").exists()
    assert writer.stats().errors == 1


def test_write_after_close_is_a_runtime_error(tmp_path: Path) -> None:
    writer = AsyncWriter(tmp_path)
    writer.close()
    writer.close()  # idempotent
    with pytest.raises(RuntimeError, match="after close") as info:
        writer.write("x", torch.zeros(1))
    assert isinstance(info.value, WriterClosedError)


def test_later_write_to_a_key_wins_over_an_earlier_one_in_flight(
    gated: tuple[AsyncWriter, GatedFormat],
) -> None:
    writer, gate = gated
    uploads: queue.Queue[Path] = queue.Queue()
    object.__setattr__(writer.options, "upload_queue", uploads)
    early = writer.write("same", _tensor(1.0))  # async, held at the gate
    assert gate.entered.acquire(timeout=10)
    late = writer.write("same", torch.full((4,), 2.0))  # synchronous: commits at once
    assert late.done()
    gate.gate.set()
    assert early.result(timeout=10) == late.result()
    writer.flush()
    np.testing.assert_array_equal(np.load(writer.root / "same.npy"), np.full(4, 2.0, np.float32))
    assert list(uploads.queue) == [writer.root / "same.npy"]  # the superseded write is not uploaded
    assert [p.name for p in _files(writer.root)] == ["same.npy"]


def test_last_of_many_writes_to_one_key_wins(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    with AsyncWriter(tmp_path, SaveFormat.NUMPY_NPY, workers=4, small_sync_bytes=50_000) as writer:
        for version in range(300):
            size = int(rng.choice([10, 20_000, 200_000]))
            writer.write(f"k{version % 3}", torch.full((size,), float(version)))
    for k in range(3):
        assert np.load(tmp_path / f"k{k}.npy")[0] == 297 + k
    assert writer._committer.order._paths == {}  # nothing is remembered once idle


def test_upload_queue_gets_each_committed_file_once_from_both_paths(tmp_path: Path) -> None:
    uploads: queue.Queue[Path] = queue.Queue()
    with AsyncWriter(tmp_path, SaveFormat.NUMPY_NPY, DictMode.SPLIT, upload_queue=uploads) as writer:
        writer.write("small", {"a": torch.zeros(2), "b": torch.ones(2)})
        writer.write("big", {"a": _tensor(1), "b": _tensor(2)})
    queued = list(uploads.queue)
    assert sorted(queued) == sorted(_files(tmp_path))
    assert len(queued) == 4
    assert all(p.exists() for p in queued)


def test_flush_waits_for_everything_so_far(tmp_path: Path) -> None:
    with AsyncWriter(tmp_path, SaveFormat.NUMPY_NPY, workers=2) as writer:
        futures = [writer.write(f"f{i}", _tensor(i)) for i in range(20)]
        writer.flush()
        assert all(f.done() for f in futures)
        assert writer.stats().in_flight == 0
        assert len(_files(tmp_path)) == 20


def test_stats_count_files_bytes_and_throughput(tmp_path: Path) -> None:
    with AsyncWriter(tmp_path, SaveFormat.NUMPY_NPY) as writer:
        for i in range(10):
            writer.write(f"s{i}", _tensor(i))
    stats = writer.stats()
    assert (stats.files, stats.bytes, stats.errors, stats.in_flight) == (10, 10 * BIG, 0, 0)
    assert stats.elapsed_seconds > 0
    assert stats.bytes_per_second == pytest.approx(10 * BIG / stats.elapsed_seconds)
    assert "10 files" in str(stats)


def test_futures_cannot_be_cancelled(tmp_path: Path) -> None:
    with AsyncWriter(tmp_path) as writer:
        future = writer.write("x", _tensor(1))
        assert future.cancel() is False
    assert future.result() == [tmp_path / "x.pt"]


def test_no_temporaries_after_close(tmp_path: Path) -> None:
    with AsyncWriter(tmp_path, SaveFormat.NUMPY_NPZ, workers=4) as writer:
        for i in range(50):
            writer.write(f"d{i % 5}/x{i}", {"a": _tensor(i)})
    assert not [p for p in tmp_path.rglob("*") if is_temporary(p.name)]
    assert len(_files(tmp_path)) == 50


@pytest.mark.usefixtures("each_engine")
def test_an_upload_queue_that_refuses_fails_the_write_instead_of_hanging(tmp_path: Path) -> None:
    class Full(queue.Queue[Path]):
        def put(self, item: Path, block: bool = True, timeout: float | None = None) -> None:
            raise queue.Full("no room for uploads")

    writer = AsyncWriter(tmp_path, SaveFormat.NUMPY_NPY, upload_queue=Full())
    with pytest.raises(queue.Full, match="no room"):
        writer.write("x", torch.zeros(3)).result(timeout=30)
    with pytest.raises(queue.Full):
        writer.close()
    assert (tmp_path / "x.npy").exists()  # committed; only its hand-off to the uploads failed


@pytest.mark.usefixtures("each_engine")
def test_a_failing_custom_writer_names_the_key_and_the_file(tmp_path: Path) -> None:
    def save(path: Path, value: object) -> None:
        raise RuntimeError("boom")

    writer = AsyncWriter(tmp_path, durability="none")
    writer.write_batch(["scans/7"], [torch.ones(3)], save=save, suffix=".bin")
    with pytest.raises(RuntimeError, match="boom") as info:
        writer.close()
    notes = getattr(info.value, "__notes__", [])
    assert notes == [f"tensorsink: while writing key 'scans/7' to {tmp_path}/scans/7.bin"]


def test_an_engine_failure_names_the_key_too(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("a file where a folder must go")
    writer = AsyncWriter(tmp_path, "npy", durability="none")
    writer.write("taken/x", torch.ones(3))
    with pytest.raises(OSError, match="taken") as info:
        writer.close()
    assert "tensorsink: while writing key 'taken/x'" in " ".join(getattr(info.value, "__notes__", []))


def test_save_without_a_suffix_says_so_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("WARNING", logger="tensorsink")
    with AsyncWriter(tmp_path, durability="none") as writer:
        for i in range(3):
            writer.write_batch([f"k{i}"], [torch.ones(1)], save=lambda path, value: path.write_bytes(b"x"))
    warned = [r.getMessage() for r in caplog.records if "without suffix=" in r.getMessage()]
    assert len(warned) == 1
    assert "no extension" in warned[0]


def test_is_done_knows_what_this_writer_wrote(tmp_path: Path) -> None:
    with AsyncWriter(tmp_path, "npy", manifest=True, skip_existing=True) as writer:
        assert not writer.is_done("fresh")
        writer.write("fresh", torch.ones(2))
        writer.flush()
        assert writer.is_done("fresh")


def test_a_batch_whose_keys_would_make_the_same_file_is_refused(tmp_path: Path) -> None:
    from tensorsink import InvalidKeyError

    with AsyncWriter(tmp_path, SaveFormat.NUMPY_NPY, DictMode.SPLIT) as writer:
        batch = {"b_c": torch.zeros(2, 3), "c": torch.ones(2, 3)}
        with pytest.raises(InvalidKeyError, match=r"keys 'x' and 'x_b' would both write .*x_b_c\.npy"):
            writer.write_batch(["x", "x_b"], batch)
        writer.write_batch(["x", "y"], batch).result()  # the writer is still usable
    assert sorted(p.name for p in outputs_under(tmp_path)) == ["x_b_c.npy", "x_c.npy", "y_b_c.npy", "y_c.npy"]


@pytest.mark.parametrize("keys", ["ab", b"ab"])
def test_a_string_is_not_a_sequence_of_keys(tmp_path: Path, keys: object) -> None:
    from tensorsink import InvalidKeyError

    with AsyncWriter(tmp_path) as writer, pytest.raises(InvalidKeyError, match="not a sequence of keys"):
        writer.write_batch(keys, torch.zeros(2, 3))  # type: ignore[arg-type]
    assert outputs_under(tmp_path) == []


@pytest.mark.usefixtures("each_engine")
def test_a_done_callback_may_write_on_a_full_budget(tmp_path: Path) -> None:
    writer = AsyncWriter(tmp_path, SaveFormat.NUMPY_NPY, max_inflight=1)
    chained: list[int] = []
    finished = threading.Event()

    def write_next(future: object) -> None:
        if len(chained) == 20:
            finished.set()
            return
        chained.append(len(chained))
        ahead = writer.write(f"c{len(chained)}", _tensor(1.0))  # room only once this one's is given back
        writer.write(f"d{len(chained)}", _tensor(2.0))  # waits for `ahead`: the budget holds one
        ahead.add_done_callback(write_next)

    writer.write("c0", _tensor(0.0)).add_done_callback(write_next)
    assert finished.wait(60), "a callback writing on a full budget deadlocked the writer"
    writer.close()
    assert len(outputs_under(tmp_path)) == 41


@pytest.mark.usefixtures("each_engine")
@pytest.mark.parametrize("raised", [SystemExit, KeyboardInterrupt, ValueError])
def test_a_callback_that_raises_strands_nothing(tmp_path: Path, raised: type[BaseException]) -> None:
    writer = AsyncWriter(tmp_path, SaveFormat.NUMPY_NPY)
    ran: list[int] = []
    release = threading.Event()

    def held(path: Path, value: object) -> None:  # keeps its write pending until the callbacks are set
        release.wait(60)
        np.save(path, np.asarray(value))

    def bad(future: object) -> None:
        raise raised("from a callback")

    futures = [
        writer.write_batch([f"k{i}"], _tensor(float(i))[None], save=held, suffix=".npy") for i in range(8)
    ]
    futures[0].add_done_callback(bad)
    for i, future in enumerate(futures):
        future.add_done_callback(lambda f, i=i: ran.append(i))
    release.set()
    closing = threading.Thread(target=writer.close)
    closing.start()
    closing.join(60)
    assert not closing.is_alive(), "close() hung after a callback raised"
    assert sorted(ran) == list(range(8)), "every other callback ran, before close() returned"
    assert all(future.result() for future in futures)
