"""Staging bookkeeping on the CPU: a fake device whose copies land late into poisoned pool memory."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from tensorsink import AsyncWriter, DictMode, SaveFormat
from tensorsink.staging import ALIGNMENT, Stager
from tests.staging.fake import POISON, FakeEngine, stage_on
from tests.support import GatedFormat, assert_same, random_tensor, read_back, wait_for_waiter


def _writer(
    root: Path, pool_bytes: int = 64 * ALIGNMENT, delay: float = 0.05, **kwargs: object
) -> AsyncWriter:
    writer = AsyncWriter(root, **kwargs)  # type: ignore[arg-type]
    stage_on(writer, Stager(pool_bytes, FakeEngine(delay), pin=False))
    writer._stager.pool.buffer.fill_(POISON)
    return writer


def _engine(writer: AsyncWriter) -> FakeEngine:
    engine = writer._stager.engine
    assert isinstance(engine, FakeEngine)
    return engine


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[AsyncWriter]:
    w = _writer(tmp_path, save_format=SaveFormat.SAFETENSORS)
    yield w
    w.close()


@pytest.mark.parametrize("save_format", list(SaveFormat))
def test_files_hold_the_copied_values_never_the_staging_memory(
    tmp_path: Path, save_format: SaveFormat
) -> None:
    with _writer(tmp_path, save_format=save_format, delay=0.1) as writer:
        engine = _engine(writer)
        source = engine.put(random_tensor((33, 17), torch.float32, 7))
        (path,) = writer.write("x", source).result()
    stored = read_back(path, save_format)
    assert_same(stored["arr_0"] if isinstance(stored, dict) else stored, source)
    assert writer._stager.pool.in_use == 0


def test_one_write_is_one_block_one_marker_one_copy_batch(writer: AsyncWriter) -> None:
    engine = _engine(writer)
    outputs = {f"t{i}": engine.put(random_tensor((10 + i,), torch.float16, i)) for i in range(5)}
    outputs["cpu"] = torch.arange(3)
    (path,) = writer.write("many", outputs).result()
    assert engine.copies == [5]
    assert engine.readies == 1
    stored = read_back(path, SaveFormat.SAFETENSORS)
    for name, tensor in outputs.items():
        assert_same(stored[name], tensor)


@pytest.mark.parametrize(
    "make",
    [lambda t: t.t(), lambda t: t[::3, 1:], lambda t: t[2], lambda t: t[0, 0], lambda t: t[:0]],
    ids=["transposed", "strided", "row", "0d", "empty"],
)
def test_views_and_odd_shapes_stage_exactly(writer: AsyncWriter, make) -> None:  # type: ignore[no-untyped-def]
    engine = _engine(writer)
    source = engine.put(make(random_tensor((9, 8), torch.bfloat16, 3)))
    (path,) = writer.write("v", source).result()
    assert_same(read_back(path, SaveFormat.SAFETENSORS)["arr_0"], source)


def test_the_pool_is_the_byte_budget_of_device_writes(tmp_path: Path) -> None:
    writer = _writer(tmp_path, pool_bytes=8 * ALIGNMENT, save_format=SaveFormat.NUMPY_NPY, workers=2)
    gate = GatedFormat(writer._format)
    writer._use_format(gate)
    engine = _engine(writer)
    try:
        sources = [engine.put(torch.full((3 * ALIGNMENT // 4,), float(i))) for i in range(3)]
        writer.write("a", sources[0])
        writer.write("b", sources[1])  # 6 of 8 blocks in use, both held by the gate
        assert gate.entered.acquire(timeout=10)
        assert gate.entered.acquire(timeout=10)
        third = threading.Thread(target=writer.write, args=("c", sources[2]))
        third.start()
        wait_for_waiter(writer._stager.pool._cond)
        assert third.is_alive(), "a device write waits while the pool has no room"
        gate.gate.set()
        third.join(10)
        writer.flush()
    finally:
        gate.gate.set()
        writer.close()
    stats = writer.stats()
    assert stats.blocked_seconds > 0
    assert stats.pinned_pool_bytes == 8 * ALIGNMENT
    assert stats.pinned_peak_bytes == 6 * ALIGNMENT
    for name, source in zip("abc", sources, strict=True):
        np.testing.assert_array_equal(np.load(tmp_path / f"{name}.npy"), source.numpy())


@pytest.mark.parametrize("save_format", list(SaveFormat))
def test_a_tensor_larger_than_the_pool_is_staged_in_chunks(tmp_path: Path, save_format: SaveFormat) -> None:
    with _writer(tmp_path, pool_bytes=4 * ALIGNMENT, save_format=save_format) as writer:
        engine = _engine(writer)
        source = engine.put(random_tensor((10 * ALIGNMENT + 3,), torch.uint8, 5))
        (path,) = writer.write("big", source).result()
    stored = read_back(path, save_format)
    assert_same(stored["arr_0"] if isinstance(stored, dict) else stored, source)
    assert len(engine.copies) == 6  # 2-block pieces through a 4-block pool
    assert writer._stager.pool.in_use == 0


def test_a_non_contiguous_tensor_larger_than_the_pool(tmp_path: Path) -> None:
    with _writer(tmp_path, pool_bytes=4 * ALIGNMENT, save_format=SaveFormat.PYTORCH_PT) as writer:
        source = _engine(writer).put(random_tensor((200, 300), torch.float32, 9).t())
        (path,) = writer.write("big", source).result()
    assert_same(torch.load(path, weights_only=True), source)


def test_copy_true_snapshots_so_the_source_may_change_at_once(writer: AsyncWriter) -> None:
    engine = _engine(writer)
    static_output = engine.put(torch.full((100,), 1.0))
    future = writer.write("snap", static_output, copy=True)
    assert future.staged()  # the caller may overwrite it now
    static_output.fill_(2.0)
    (path,) = future.result()
    assert engine.snapshots == 1
    assert read_back(path, SaveFormat.SAFETENSORS)["arr_0"].eq(1.0).all()


def test_device_write_is_staged_before_it_is_done(tmp_path: Path) -> None:
    writer = _writer(tmp_path, save_format=SaveFormat.NUMPY_NPY)
    gate = GatedFormat(writer._format)
    writer._use_format(gate)
    try:
        future = writer.write("s", _engine(writer).put(torch.ones(1000)))
        assert future.wait_staged(timeout=10)
        assert gate.entered.acquire(timeout=10)
        assert not future.done()
    finally:
        gate.gate.set()
        writer.close()
    assert future.done()


def test_cpu_write_is_staged_when_done(tmp_path: Path) -> None:
    with AsyncWriter(tmp_path) as writer:
        future = writer.write("c", torch.ones(100_000))
        assert future.wait_staged(timeout=10)
        assert future.done()


def test_pool_blocks_come_back_when_a_write_fails(tmp_path: Path) -> None:
    writer = _writer(tmp_path, save_format=SaveFormat.SAFETENSORS)
    (writer.root / "blocker").write_bytes(b"")
    future = writer.write("blocker/x", _engine(writer).put(torch.ones(10)))
    with pytest.raises(OSError, match="blocker"):
        future.result(timeout=10)
    with pytest.raises(OSError, match="blocker"):  # a write's blocks are back once flush() returns
        writer.flush()
    assert writer._stager.pool.in_use == 0
    with pytest.raises(OSError, match="blocker"):
        writer.close()


def test_split_mapping_of_device_tensors(tmp_path: Path) -> None:
    with _writer(tmp_path, save_format=SaveFormat.NUMPY_NPY, dict_mode=DictMode.SPLIT) as writer:
        engine = _engine(writer)
        outputs = {"a": engine.put(torch.arange(5.0)), "b": engine.put(torch.arange(7))}
        paths = writer.write("m", outputs).result()
    assert engine.copies == [2]
    for path, tensor in zip(paths, outputs.values(), strict=True):
        np.testing.assert_array_equal(np.load(path), tensor.numpy())


def test_cpu_writes_never_start_the_pool(tmp_path: Path) -> None:
    with AsyncWriter(tmp_path) as writer:
        writer.write("c", torch.ones(100_000))
    assert not writer._stager.pool_started
    assert writer.stats().pinned_pool_bytes == 0
    assert not torch.cuda.is_initialized()


def test_conjugate_and_negative_views_are_resolved_before_the_copy(writer: AsyncWriter) -> None:
    engine = _engine(writer)
    complex_values = torch.complex(torch.arange(4.0), torch.arange(4.0) + 10)
    conjugated = engine.put(complex_values.conj())
    negative_view = engine.put(complex_values.conj().imag)  # a float view with the negative bit
    assert conjugated.is_conj()
    assert negative_view.is_neg()
    (path,) = writer.write("views", {"conj": conjugated, "neg": negative_view}).result()
    stored = read_back(path, SaveFormat.SAFETENSORS)
    assert_same(stored["conj"], conjugated)
    assert_same(stored["neg"], negative_view)


def test_two_first_writes_at_once_make_one_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tensorsink.staging.stager as stager_module

    made = []
    real_pool = stager_module.PinnedPool
    both_waiting = threading.Barrier(2)

    class SlowPool(real_pool):  # type: ignore[misc, valid-type]
        def __init__(self, *args: object, **kwargs: object) -> None:
            made.append(self)
            time.sleep(0.2)  # pinning a large pool takes this long and more
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(stager_module, "PinnedPool", SlowPool)
    stager = Stager(16 * ALIGNMENT, FakeEngine(), pin=False)

    def first_use() -> None:
        both_waiting.wait()
        stager.pool.allocate(ALIGNMENT)

    threads = [threading.Thread(target=first_use) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 1
    assert stager.pool.in_use == 2 * ALIGNMENT
