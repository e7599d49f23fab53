from __future__ import annotations

import random

import pytest

from engine.block_manager import BlockManager

pytestmark = pytest.mark.unit


def test_allocate_grows_by_whole_blocks():
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.allocate("a", 5) == [0, 1]
    assert bm.allocate("a", 8) == []  # 8 tokens still fit in 2 blocks
    assert bm.allocate("a", 9) == [2]
    assert bm.block_table("a") == [0, 1, 2]
    assert bm.num_free_blocks == 5
    bm.check_integrity()


def test_can_allocate_counts_only_missing_blocks_and_reserve():
    bm = BlockManager(num_blocks=4, block_size=4)
    bm.allocate("a", 12)  # 3 blocks
    assert bm.can_allocate("a", 16)
    assert not bm.can_allocate("a", 17)
    assert not bm.can_allocate("b", 4, reserve=1)
    assert bm.can_allocate("b", 4)


def test_over_allocation_raises_and_changes_nothing():
    bm = BlockManager(num_blocks=2, block_size=4)
    with pytest.raises(RuntimeError, match="can_allocate"):
        bm.allocate("a", 9)
    assert bm.num_free_blocks == 2
    assert not bm.owns("a")


def test_free_returns_everything_and_double_free_is_a_noop():
    bm = BlockManager(num_blocks=4, block_size=2)
    bm.allocate("a", 3)
    bm.allocate("b", 4)
    assert bm.free("a") == 2
    assert bm.free("a") == 0
    assert bm.num_free_blocks == 2
    bm.check_integrity()


def test_integrity_check_detects_corruption():
    bm = BlockManager(num_blocks=4, block_size=2)
    bm.allocate("a", 4)
    bm._free.append(bm.block_table("a")[0])  # a block both owned and free
    with pytest.raises(AssertionError, match="corrupt"):
        bm.check_integrity()


def test_random_workload_never_leaks():
    rng = random.Random(0)
    bm = BlockManager(num_blocks=32, block_size=4)
    lengths: dict[str, int] = {}
    for step in range(2000):
        rid = f"r{rng.randrange(12)}"
        if rid in lengths and rng.random() < 0.3:
            bm.free(rid)
            del lengths[rid]
        else:
            n = lengths.get(rid, 0) + rng.randrange(1, 9)
            if bm.can_allocate(rid, n):
                bm.allocate(rid, n)
                lengths[rid] = n
        used = sum(bm.blocks_for(n) for n in lengths.values())
        assert bm.num_used_blocks == used, step
    bm.check_integrity()
    for rid in list(lengths):
        bm.free(rid)
    assert bm.num_free_blocks == 32
