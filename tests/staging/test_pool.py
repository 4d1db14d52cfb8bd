"""The pinned pool's allocator, on ordinary memory."""

from __future__ import annotations

import itertools
import random
import threading

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tensorsink.staging import ALIGNMENT, Block, PinnedPool, Stager
from tensorsink.staging.engine import CudaEngine
from tests.support import wait_for_waiter


def test_blocks_are_aligned_and_sized_exactly_not_to_powers_of_two() -> None:
    pool = PinnedPool(64 * ALIGNMENT, pin=False)
    a, _ = pool.allocate(5 * ALIGNMENT + 1)
    b, _ = pool.allocate(1)
    assert a == Block(0, 6 * ALIGNMENT)
    assert b == Block(6 * ALIGNMENT, ALIGNMENT)
    assert pool.in_use == 7 * ALIGNMENT
    assert pool.view(a).numel() == 6 * ALIGNMENT
    assert pool.view(b).data_ptr() - pool.buffer.data_ptr() == 6 * ALIGNMENT


def test_freed_neighbours_merge_back_into_one_run() -> None:
    pool = PinnedPool(16 * ALIGNMENT, pin=False)
    blocks = [pool.allocate(ALIGNMENT)[0] for _ in range(16)]
    assert pool.try_allocate(1) is None
    for index in [1, 3, 2, 0, 15, 5, 4, 14, 6, 7, 8, 10, 9, 12, 11, 13]:
        pool.free(blocks[index])
    assert pool.free_runs() == [(0, 16 * ALIGNMENT)]
    assert pool.in_use == 0
    assert pool.peak == 16 * ALIGNMENT


def test_first_fit_reuses_a_hole() -> None:
    pool = PinnedPool(10 * ALIGNMENT, pin=False)
    a, _ = pool.allocate(3 * ALIGNMENT)
    pool.allocate(3 * ALIGNMENT)
    pool.free(a)
    c = pool.try_allocate(2 * ALIGNMENT)
    assert c == Block(0, 2 * ALIGNMENT)


def test_allocate_blocks_until_a_free_makes_room() -> None:
    pool = PinnedPool(4 * ALIGNMENT, pin=False)
    held, _ = pool.allocate(3 * ALIGNMENT)
    result: list[tuple[Block, float]] = []
    waiter = threading.Thread(target=lambda: result.append(pool.allocate(2 * ALIGNMENT)))
    waiter.start()
    wait_for_waiter(pool._cond)
    assert waiter.is_alive()
    pool.free(held)
    waiter.join(10)
    assert result[0][0] == Block(0, 2 * ALIGNMENT)
    assert result[0][1] > 0


def test_more_than_the_pool_is_refused_clearly() -> None:
    pool = PinnedPool(4 * ALIGNMENT, pin=False)
    with pytest.raises(ValueError, match="cannot come from a pool"):
        pool.allocate(4 * ALIGNMENT + 1)
    with pytest.raises(ValueError, match="pinned_pool_bytes=100 is too small"):
        PinnedPool(100, pin=False)


@given(st.lists(st.tuples(st.booleans(), st.integers(1, 5 * ALIGNMENT)), max_size=60), st.randoms())
def test_property_blocks_never_overlap_and_all_memory_returns(
    operations: list[tuple[bool, int]], rng: random.Random
) -> None:
    pool = PinnedPool(32 * ALIGNMENT, pin=False)
    held: list[Block] = []
    for allocate, size in operations:
        if allocate or not held:
            block = pool.try_allocate(size)
            if block is not None:
                assert block.offset % ALIGNMENT == 0
                assert block.nbytes >= size
                assert block.offset + block.nbytes <= pool.capacity
                assert all(
                    block.offset >= b.offset + b.nbytes or b.offset >= block.offset + block.nbytes
                    for b in held
                )
                held.append(block)
        else:
            pool.free(held.pop(rng.randrange(len(held))))
        assert pool.in_use == sum(b.nbytes for b in held)
        runs = pool.free_runs()
        assert all(a[0] + a[1] < b[0] for a, b in itertools.pairwise(runs))  # sorted, merged
    for block in held:
        pool.free(block)
    assert pool.free_runs() == [(0, pool.capacity)]


def test_a_prepared_pool_is_made_in_the_background_and_waited_for() -> None:
    stager = Stager(5 * ALIGNMENT, pin=False)
    stager.prepare()
    stager.prepare()  # once only
    assert stager.pool.capacity == 5 * ALIGNMENT
    assert stager.pool is stager.pool


def test_a_failed_preparation_is_raised_by_the_first_use(monkeypatch: pytest.MonkeyPatch) -> None:
    stager = Stager(ALIGNMENT // 2, pin=False)  # too small: PinnedPool refuses it
    stager.prepare()
    with pytest.raises(ValueError, match="too small"):
        _ = stager.pool
    with pytest.raises(ValueError, match="too small"):
        _ = stager.pool  # every time, not a half-made pool


def test_ready_markers_are_blocking_events(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker waits on them (fence): a default event's synchronize() would spin a core."""
    made: list[dict[str, object]] = []

    class Event:
        def __init__(self, **flags: object) -> None:
            made.append(flags)

        def record(self, stream: object) -> None:
            pass

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: object())
    CudaEngine().ready(torch.ones(1))
    assert made == [{"blocking": True}]
