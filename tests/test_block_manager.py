from __future__ import annotations

import random

import pytest

from engine.block_manager import BlockManager, chain_root

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
    bm._free[bm.block_table("a")[0]] = None  # a block both owned and free
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


def _tokens(seq: list[int]):
    return lambda start, end: seq[start:end]


def test_a_published_prefix_is_shared_and_counted():
    bm = BlockManager(num_blocks=8, block_size=2, enable_caching=True)
    first = [1, 2, 3, 4, 5]
    bm.allocate("a", 5)
    bm.publish("a", 5, _tokens(first))  # two full blocks; the fifth token's block is not full
    same_start = [1, 2, 3, 4, 9, 9]
    assert bm.take_cached_prefix("b", same_start) == 4
    assert bm.block_table("b") == bm.block_table("a")[:2]
    bm.allocate("b", 6)
    assert bm.num_used_blocks == 4  # a: 3, b: its own third block only
    bm.check_integrity()
    # another second block: only the first is shared (the key chains the tokens before it)
    assert bm.take_cached_prefix("c", [1, 2, 7, 4]) == 2
    for rid in ("a", "b", "c"):
        bm.free(rid)
    assert bm.num_free_blocks == 8
    bm.check_integrity()


def test_a_cache_salt_starts_a_chain_of_its_own():
    """A salted prompt's keys differ from the unsalted ones and another salt's at every block,
    and repeat for the same salt."""
    bm = BlockManager(num_blocks=8, block_size=2, enable_caching=True)
    tokens = [1, 2, 3, 4, 5]
    plain = bm.prefix_keys(tokens)
    one, other = (bm.prefix_keys(tokens, chain_root(s)) for s in ("one", "other"))
    assert chain_root(None) == b"" and bm.prefix_keys(tokens, chain_root(None)) == plain
    assert len(plain) == len(one) == 2 and not {*plain} & {*one} and not {*one} & {*other}
    assert bm.prefix_keys(tokens, chain_root("one")) == one
    bm.allocate("a", 5)
    bm.publish("a", 5, _tokens(tokens), chain_root("one"))
    assert bm.take_cached_prefix("b", tokens) == 0
    assert bm.take_cached_prefix("c", tokens, chain_root("one")) == 4
    # a LoRA adapter starts a chain of its own too, with or without a salt
    roots = {chain_root(s, lora) for s in (None, "one") for lora in (None, "a", "b")}
    assert len(roots) == 6 and chain_root("one", None) == chain_root("one")


def test_a_freed_prefix_stays_cached_until_its_blocks_are_needed():
    bm = BlockManager(num_blocks=4, block_size=2, enable_caching=True)
    prompt = [1, 2, 3, 4]
    bm.allocate("a", 4)
    bm.publish("a", 4, _tokens(prompt))
    bm.free("a")
    assert bm.num_free_blocks == 4
    assert bm.take_cached_prefix("b", prompt) == 4  # still there
    bm.free("b")
    bm.allocate("c", 8)  # every block handed out again: the old contents are gone
    bm.free("c")
    assert bm.take_cached_prefix("d", prompt) == 0
    bm.check_integrity()


def test_the_tail_of_a_freed_prefix_goes_first():
    bm = BlockManager(num_blocks=4, block_size=2, enable_caching=True)
    prompt = [1, 2, 3, 4, 5, 6]
    bm.allocate("a", 6)
    bm.publish("a", 6, _tokens(prompt))
    bm.free("a")
    bm.allocate("x", 2)  # takes the never-used block first, then the prefix's tail
    bm.allocate("y", 2)
    assert bm.take_cached_prefix("b", prompt) == 4
    bm.check_integrity()


def test_caching_off_shares_nothing():
    bm = BlockManager(num_blocks=4, block_size=2)
    bm.allocate("a", 4)
    bm.publish("a", 4, _tokens([1, 2, 3, 4]))
    assert bm.take_cached_prefix("b", [1, 2, 3, 4]) == 0


def test_random_workload_with_caching_never_leaks_or_mixes_prefixes():
    """Requests over a few shared prefixes: the blocks a request takes from the cache always
    hold its own tokens (checked against a record of what each block was computed with)."""
    rng = random.Random(1)
    bm = BlockManager(num_blocks=24, block_size=2, enable_caching=True)
    contents: dict[int, tuple] = {}  # block -> the token prefix it was computed for
    live: dict[str, list[int]] = {}
    shared = 0
    for step in range(3000):
        rid = f"r{rng.randrange(10)}"
        if rid in live:
            bm.free(rid)
            del live[rid]
            continue
        seq = [rng.randrange(3) for _ in range(rng.randrange(1, 9))]
        hit = bm.take_cached_prefix(rid, seq)
        shared += hit
        for i, block in enumerate(bm.block_table(rid)):
            assert contents[block] == tuple(seq[: (i + 1) * 2]), step
        if not bm.can_allocate(rid, len(seq)):
            bm.free(rid)
            continue
        for i, block in enumerate(bm.allocate(rid, len(seq)), start=hit // 2):
            contents[block] = tuple(seq[: (i + 1) * 2])
        bm.publish(rid, len(seq), _tokens(seq))
        live[rid] = seq
    assert shared > 1000  # the prefixes were shared, often
    bm.check_integrity()
    for rid in list(live):
        bm.free(rid)
    assert bm.num_free_blocks == 24
