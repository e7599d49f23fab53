"""Prefix affinity of the prompt-taking deployments (app/prefix_router.py): the record of which
blocks went where (pure, checked against the engine's own block keys), the ranking rules, the
router's hooks over stand-in replicas, and the builder attaching it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from app.prefix_router import PrefixAffinityRouter, PrefixIndex, rank_by_prefix
from engine.block_manager import BlockManager, chain_root
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig

pytestmark = pytest.mark.unit

SYSTEM = list(range(1000, 1100))  # 100 shared tokens: 6 whole blocks of 16


def _prompt(own: int, n: int = 30) -> list[int]:
    return SYSTEM + [own * 100 + i for i in range(n)]


def test_the_router_keys_are_what_the_engine_takes_from_its_cache():
    """The index's keys for a prompt are the engine's block keys of it, and a request the
    index would call a 6-block match starts 96 tokens in, taken from the replica's cache."""
    index = PrefixIndex(16)
    blocks = BlockManager(64, 16, enable_caching=True)
    first, second = _prompt(1), _prompt(2)
    assert index.keys(first) == blocks.prefix_keys(first[:-1])
    scheduler = Scheduler(SchedulerConfig(enable_prefix_caching=True), blocks)
    for rid, ids in (("a", first), ("b", second)):
        scheduler.add(Request(rid, ids, SamplingParams(max_tokens=1), 0))
        out = scheduler.schedule()
        scheduler.postprocess(out, {i.request.request_id: [7] for i in out.scheduled if i.samples})
    index.record(index.keys(first), "r1")
    assert index.matched_tokens(index.keys(second)) == {"r1": 96} and out.scheduled[0].start == 96
    salted = index.keys(first, "tenant")  # a salted prompt: the engine's salted keys
    assert salted == blocks.prefix_keys(first[:-1], chain_root("tenant")) != index.keys(first)
    # a LoRA adapter's prompt: the engine's keys under that adapter (and salt), none shared
    adapted = index.keys(first, None, "sql")
    assert adapted == blocks.prefix_keys(first[:-1], chain_root(None, "sql"))
    both = index.keys(first, "tenant", "sql")
    assert both == blocks.prefix_keys(first[:-1], chain_root("tenant", "sql"))
    assert len({*adapted, *both, *salted, *index.keys(first)}) == 4 * len(adapted)
    # a whole prompt of 16 tokens has no block before its last token: nothing to match on
    assert index.keys(list(range(16))) == [] and len(index.keys(list(range(17)))) == 1


def test_index_matches_the_longest_leading_run_per_replica():
    index = PrefixIndex(16)
    long, other = _prompt(1, 60), [5] * 120
    index.record(index.keys(long), "r1")
    index.record(index.keys(long)[:3], "r2")  # sent only a shorter prompt of that prefix
    index.record(index.keys(other), "r3")
    assert index.matched_tokens(index.keys(long)) == {"r1": 144, "r2": 48}
    assert index.matched_tokens(index.keys(_prompt(2))) == {"r1": 96, "r2": 48}
    assert index.matched_tokens(index.keys([9] * 100)) == {}
    index.keep_only({"r2", "r3"})  # r1 scaled away
    assert index.matched_tokens(index.keys(long)) == {"r2": 48}


def test_index_forgets_the_least_recently_used_blocks_beyond_its_capacity():
    index = PrefixIndex(16, capacity=10)
    a, b = _prompt(1, 60), _prompt(2, 60)  # 9 blocks each, the first 6 shared
    index.record(index.keys(a), "r1")
    index.record(index.keys(b), "r2")  # 12 distinct keys: a's 3 own blocks, the oldest, go
    assert index.matched_tokens(index.keys(a)) == {"r1": 96, "r2": 96}
    assert index.matched_tokens(index.keys(b)) == {"r1": 96, "r2": 144}
    with pytest.raises(ValueError, match="block_size and capacity"):
        PrefixIndex(0)


def test_holders_rank_first_unless_the_match_is_short_or_they_are_busy():
    r = ["a", "b", "c"]
    idle = {"a": 0, "b": 0, "c": 0}
    assert rank_by_prefix(r, {"b": 96}, 130, idle) == [["b"], ["a", "c"]]
    assert rank_by_prefix(r, {"b": 96, "c": 96, "a": 16}, 130, idle) == [["b", "c"], ["a"]]
    assert rank_by_prefix(r, {}, 130, idle) == [r]  # nothing held anywhere
    assert rank_by_prefix(r, {"b": 16}, 400, idle) == [r]  # 4% of the prompt: load decides
    assert rank_by_prefix(r, {"b": 16}, 400, idle, min_share=0.01) == [["b"], ["a", "c"]]
    busy = {"a": 0, "b": 5, "c": 1}  # the holder has 5 more in flight than the idlest
    assert rank_by_prefix(r, {"b": 96}, 130, busy) == [r]
    assert rank_by_prefix(r, {"b": 96}, 130, busy, max_imbalance=5) == [["b"], ["a", "c"]]
    unknown = {"a": None, "b": None, "c": None}  # no queue lengths yet: the match decides
    assert rank_by_prefix(r, {"b": 96}, 130, unknown) == [["b"], ["a", "c"]]
    assert (
        rank_by_prefix(["b"], {"b": 96}, 130, idle) == [["b"]]
        and rank_by_prefix([], {}, 1, {}) == []
    )


@dataclass(frozen=True)
class Replica:
    replica_id: str


class _Lens:
    def __init__(self, lens: dict) -> None:
        self.lens = lens

    def get(self, replica_id):
        return self.lens.get(replica_id)


def test_router_sends_a_prompt_where_its_prefix_went_and_reads_queue_lengths():
    """The router's own hooks over stand-in replicas and requests: the prompt is the call's
    second argument; where a request was routed is recorded; busy holders are passed over."""
    router = SimpleNamespace(replica_queue_len_cache=_Lens({}))
    PrefixAffinityRouter.initialize_state(router, block_size=16, max_imbalance=2)
    replicas = [Replica("r1"), Replica("r2")]
    first = SimpleNamespace(args=("req-1", _prompt(1), SamplingParams()))
    choose = PrefixAffinityRouter.choose_replicas
    assert asyncio.run(choose(router, replicas, first)) == [replicas]  # nothing recorded yet
    PrefixAffinityRouter.on_request_routed(router, first, "r2", None)
    second = SimpleNamespace(args=("req-2", _prompt(2), SamplingParams()))
    assert asyncio.run(choose(router, replicas, second)) == [[replicas[1]], [replicas[0]]]
    router.replica_queue_len_cache = _Lens({"r1": 0, "r2": 3})
    assert asyncio.run(choose(router, replicas, second)) == [replicas]
    assert asyncio.run(choose(router, replicas, None)) == [replicas]
    # the same prompt on a LoRA adapter has other keys: no replica holds its prefix yet
    router.replica_queue_len_cache = _Lens({})
    adapted = SimpleNamespace(args=("req-3", _prompt(2), SamplingParams(lora="sql")))
    assert asyncio.run(choose(router, replicas, adapted)) == [replicas]


def test_the_builder_routes_prompts_by_prefix_where_the_engines_cache_them():
    from app.builder import build_app

    def router_config(args: dict, phase: str):
        ingress = build_app(args)._bound_deployment
        server = ingress.init_kwargs[phase]._bound_deployment
        return server._deployment_config.request_router_config

    caching = {"engine": {"enable_prefix_caching": True, "block_size": 32}}
    blocks = {"engine": {"block_size": 32}}
    config = router_config({"prefill": caching, "decode": blocks}, "prefill")
    assert config.request_router_class.endswith("PrefixAffinityRouter")
    assert config.request_router_kwargs == {"block_size": 32, "max_imbalance": 4}
    coloc = router_config({"mode": "colocated", "colocated": caching}, "colocated")
    assert coloc.request_router_class.endswith("PrefixAffinityRouter")
    # without a cache, or turned off: Serve's own choice by load
    for args in ({}, {"prefill": {**caching, "prefix_affinity": False}, "decode": blocks}):
        assert not router_config(args, "prefill").request_router_class.endswith("Affinity")
    decode = router_config(
        {"decode": caching, "prefill": blocks}, "decode"
    )  # the decode side pairs by node
    assert decode.request_router_class.endswith("SameNodeRouter")
