"""Scheduler policies on hand-built requests and fake sampled tokens (no torch, no model)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from engine.block_manager import BlockManager
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig

pytestmark = pytest.mark.unit


def make(num_blocks=16, block_size=4, **cfg) -> Scheduler:
    caching = cfg.get("enable_prefix_caching", False)
    return Scheduler(SchedulerConfig(**cfg), BlockManager(num_blocks, block_size, caching))


def req(rid: str, n: int, max_tokens: int = 4, **kw) -> Request:
    return Request(rid, list(range(1, n + 1)), SamplingParams(max_tokens=max_tokens), 0, **kw)


def run_step(s: Scheduler, token: int = 7):
    out = s.schedule()
    sampled = {i.request.request_id: [token] for i in out.scheduled if i.samples}
    s.postprocess(out, sampled)
    return out


def test_pure_python_no_torch_or_ray():
    code = (
        "import sys, engine.scheduler, engine.block_manager;"
        "assert 'torch' not in sys.modules and 'ray' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_prefill_is_fcfs_within_token_budget():
    s = make(max_num_batched_tokens=10)
    for rid, n in [("a", 4), ("b", 5), ("c", 3)]:
        s.add(req(rid, n))
    out = run_step(s)
    assert [(i.request.request_id, i.num_tokens) for i in out.scheduled] == [("a", 4), ("b", 5)]
    assert [r.request_id for r in s.running] == ["a", "b"]
    assert [r.request_id for r in s.waiting] == ["c"]


def test_whole_prompt_mode_alternates_prefill_then_decode():
    s = make(max_num_batched_tokens=64)
    s.add(req("a", 6))
    assert run_step(s).num_tokens == 6  # prefill
    s.add(req("b", 3))
    out = run_step(s)  # a waiting prefill goes first: no decode in this step
    assert [(i.request.request_id, i.num_tokens) for i in out.scheduled] == [("b", 3)]
    out = run_step(s)
    assert sorted((i.request.request_id, i.num_tokens) for i in out.scheduled) == [
        ("a", 1),
        ("b", 1),
    ]


def test_chunked_mode_mixes_decodes_and_prefill_chunks():
    s = make(max_num_batched_tokens=4, chunked_prefill=True, num_blocks=32)
    s.add(req("a", 2))
    run_step(s)
    s.add(req("b", 9))
    out = run_step(s)  # 1 decode of a + 3 prompt tokens of b
    assert [(i.request.request_id, i.start, i.num_tokens) for i in out.scheduled] == [
        ("a", 2, 1),
        ("b", 0, 3),
    ]
    assert not out.scheduled[1].samples and s.waiting[0].num_computed_tokens == 3
    out = run_step(s)
    assert [(i.request.request_id, i.start, i.num_tokens) for i in out.scheduled] == [
        ("a", 3, 1),
        ("b", 3, 3),
    ]


def test_admission_waits_for_free_blocks():
    s = make(num_blocks=3, block_size=4)
    s.add(req("a", 8))  # 2 blocks
    s.add(req("b", 8))  # 2 more: does not fit next to a
    out = run_step(s)
    assert [i.request.request_id for i in out.scheduled] == ["a"]
    assert [r.request_id for r in s.waiting] == ["b"]


def test_decode_preempts_newest_by_recompute_and_finishes_all():
    s = make(num_blocks=4)
    s.add(req("a", 4, max_tokens=6))
    s.add(req("b", 4, max_tokens=6))
    s.add(req("c", 4, max_tokens=6))
    preempted = []
    finished = set()
    for _ in range(100):
        if not s.num_unfinished:
            break
        out = run_step(s)
        preempted += out.preempted
        finished |= {
            r.request_id for r in (i.request for i in out.scheduled) if r.status.is_finished
        }
        s.blocks.check_integrity()
    assert finished == {"a", "b", "c"}
    assert preempted and preempted[0] == "c"  # newest first
    assert s.blocks.num_free_blocks == 4


def test_preempted_request_recomputes_prompt_and_outputs():
    s = make(num_blocks=2, block_size=4)
    a, b = req("a", 3, max_tokens=8), req("b", 3, max_tokens=8)
    s.add(a)
    s.add(b)
    run_step(s)  # prefill: 3 prompt tokens + 1 sampled each, one block each
    assert run_step(s).preempted == []  # token 4 still fits the first block
    out = run_step(s)  # token 5 needs a second block each: only one is free
    assert out.preempted == ["b"]
    assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0
    assert b.output_token_ids == [7, 7]  # outputs are kept and recomputed with the prompt
    assert b.num_pending_tokens == 5
    assert s.blocks.block_table("a") == [0, 1]


def test_max_num_seqs_limits_running():
    s = make(max_num_seqs=2)
    for rid in "abc":
        s.add(req(rid, 2))
    run_step(s)
    assert len(s.running) == 2 and len(s.waiting) == 1


def test_prefill_only_request_parks_in_prefilled_holding_blocks():
    s = make()
    r = req("a", 5, max_tokens=4, prefill_only=True)
    s.add(r)
    run_step(s)
    assert r.status is RequestStatus.PREFILLED and s.prefilled == {"a": r}
    assert s.blocks.owns("a") and not s.running
    s.finish(r, RequestStatus.FINISHED_STOPPED)
    assert s.blocks.num_free_blocks == 16 and not s.prefilled


@pytest.mark.parametrize("when", ["waiting", "partial", "running"])
def test_finish_frees_blocks_in_every_state(when):
    s = make(max_num_batched_tokens=4, chunked_prefill=True)
    r = req("a", 10)
    s.add(r)
    if when != "waiting":
        run_step(s)  # 4 of 10 prompt tokens
    if when == "running":
        run_step(s)
        run_step(s)
        assert r.status is RequestStatus.RUNNING
    s.finish(r, RequestStatus.FINISHED_ABORTED)
    assert s.num_unfinished == 0 and s.blocks.num_free_blocks == 16
    s.blocks.check_integrity()


def test_stop_token_and_length_finish():
    s = make()
    r = Request("a", [1, 2], SamplingParams(max_tokens=3, stop_token_ids=(9,)), eos_token_id=5)
    s.add(r)
    run_step(s, token=9)
    assert r.status is RequestStatus.FINISHED_STOPPED
    r2 = Request("b", [1, 2], SamplingParams(max_tokens=2, ignore_eos=True), eos_token_id=5)
    s.add(r2)
    run_step(s, token=5)
    assert r2.status is RequestStatus.RUNNING  # eos ignored
    run_step(s, token=5)
    assert r2.status is RequestStatus.FINISHED_LENGTH
    assert s.blocks.num_free_blocks == 16


def test_prefix_caching_starts_a_repeated_prompt_past_its_cached_blocks():
    s = make(num_blocks=8, enable_prefix_caching=True)
    s.add(req("a", 10, max_tokens=1))
    assert [(i.start, i.num_tokens) for i in run_step(s).scheduled] == [(0, 10)]
    s.add(req("b", 10, max_tokens=1))  # a has finished; its two full blocks stay cached
    assert [(i.start, i.num_tokens) for i in run_step(s).scheduled] == [(8, 2)]
    s.add(req("c", 8, max_tokens=1))  # the last token is always computed: one block taken
    assert [(i.start, i.num_tokens) for i in run_step(s).scheduled] == [(4, 4)]
    scored = Request("d", list(range(1, 11)), SamplingParams(max_tokens=1, prompt_logprobs=0), 0)
    s.add(scored)  # prompt logprobs: every prompt token computed
    assert [(i.start, i.num_tokens) for i in run_step(s).scheduled] == [(0, 10)]
    s.blocks.check_integrity()
    assert s.blocks.num_free_blocks == 8
    assert s.prefill.num_cached_tokens == 8 + 4
    # vLLM's prefix_cache_queries: the tokens of each start that looked the cache up (d, whose
    # prompt logprobs computes every token, did not)
    assert s.prefill.num_queried_tokens == 10 + 10 + 8


def test_only_requests_with_the_same_cache_salt_share_cached_blocks():
    """vLLM's cache_salt: a prompt computed under one salt is a cache hit for the same salt
    only; other salts and unsalted requests compute it again, and publish their own copy."""
    s = make(num_blocks=16, enable_prefix_caching=True)

    def start(rid: str, salt: str | None) -> int:
        params = SamplingParams(max_tokens=1, cache_salt=salt)
        s.add(Request(rid, list(range(1, 11)), params, 0))
        [item] = run_step(s).scheduled
        return item.start

    assert start("a", "tenant-1") == 0
    assert start("b", "tenant-2") == 0 and start("c", None) == 0  # not tenant-1's blocks
    assert start("d", "tenant-1") == start("e", "tenant-2") == start("f", None) == 8
    s.blocks.check_integrity()
    assert s.blocks.num_free_blocks == 16


def test_a_cached_prefix_is_given_back_when_the_rest_does_not_fit():
    s = make(num_blocks=4, enable_prefix_caching=True)
    s.add(req("a", 8, max_tokens=1))
    run_step(s)  # a done: blocks 0-1 cached and free
    s.add(req("big", 4, max_tokens=8))
    run_step(s)  # big holds one block, decoding
    s.add(req("b", 20, max_tokens=1))  # shares a's first two blocks but needs 3 more
    out = run_step(s)
    assert [i.request.request_id for i in out.scheduled] == ["big"]
    waiting = s.find("b")
    assert waiting.num_computed_tokens == 0 and not s.blocks.owns("b")
    assert s.prefill.num_cached_tokens == 0  # given back: not counted
    assert s.prefill.num_queried_tokens == 8 + 4  # a's and big's starts, not b's
    s.blocks.check_integrity()


def test_a_cached_prefix_is_given_back_when_the_step_has_no_room_for_the_rest():
    s = make(num_blocks=16, enable_prefix_caching=True, max_num_batched_tokens=12)
    s.add(req("a", 8, max_tokens=1))
    run_step(s)  # a done: its blocks cached
    s.add(Request("y", [90 + i for i in range(6)], SamplingParams(max_tokens=1), 0))
    s.add(req("b", 16, max_tokens=1))  # starts as a did: two blocks cached, 8 tokens to go
    out = run_step(s)
    assert [i.request.request_id for i in out.scheduled] == ["y"]  # 8 > the 6 left
    b = s.find("b")
    assert b.num_computed_tokens == 0 and not s.blocks.owns("b")
    assert s.prefill.num_cached_tokens == 0
    out = run_step(s)
    assert [(i.start, i.num_tokens) for i in out.scheduled] == [(8, 8)]
    assert s.prefill.num_cached_tokens == b.num_cached_tokens == 8
    s.blocks.check_integrity()


def test_requests_sharing_a_prompt_in_one_step_wait_for_its_blocks():
    """n choices of one prompt arrive together: the first computes it, the others wait one
    step and start past its cached blocks; a request sharing less than half of what it has
    left is not held back; without caching, all run at once."""
    s = make(num_blocks=32, enable_prefix_caching=True)
    for rid in ("a", "b", "c"):
        s.add(req(rid, 14, max_tokens=1))
    short = Request(
        "d", [1, 2, 3, 4] + [50 + i for i in range(10)], SamplingParams(max_tokens=1), 0
    )
    s.add(short)  # shares one block of 4 with a: 4 of its 14 tokens
    out = run_step(s)
    assert [(i.request.request_id, i.start, i.num_tokens) for i in out.scheduled] == [
        ("a", 0, 14),
        ("d", 0, 14),
    ]
    assert not s.blocks.owns("b") and not s.blocks.owns("c")  # nothing held while waiting
    out = run_step(s)  # 13 tokens before the last: three full blocks (12) cached
    assert [(i.request.request_id, i.start, i.num_tokens) for i in out.scheduled] == [
        ("b", 12, 2),
        ("c", 12, 2),
    ]
    assert s.prefill.num_cached_tokens == 2 * 12
    s.blocks.check_integrity()
    plain = make(num_blocks=32)
    for rid in ("a", "b", "c"):
        plain.add(req(rid, 14, max_tokens=1))
    assert [i.num_tokens for i in run_step(plain).scheduled] == [14, 14, 14]


def _prio(rid: str, n: int, priority: int, max_tokens: int = 4) -> Request:
    params = SamplingParams(max_tokens=max_tokens, priority=priority)
    return Request(rid, list(range(1, n + 1)), params, 0)


def test_priority_policy_serves_lower_values_first_and_preempts_the_lowest():
    """vLLM's priority policy: the waiting queue by (priority, arrival), so a later urgent
    request is prefilled first and equals keep their order; out of blocks, the running
    request of the lowest priority is preempted even though it is the oldest. First come first
    served, in the same run, keeps arrival order and preempts the newest."""
    victims = {}
    for policy in ("priority", "fcfs"):
        s = make(num_blocks=7, block_size=4, policy=policy, max_num_batched_tokens=8)
        s.add(_prio("late", 4, 5, max_tokens=12))
        run_step(s)  # running alone
        for rid, priority in (("a", 0), ("urgent", -1), ("b", 0)):
            s.add(_prio(rid, 4, priority, max_tokens=12))
        order = [r.request_id for r in s.waiting]
        assert order == (["urgent", "a", "b"] if policy == "priority" else ["a", "urgent", "b"])
        run_step(s), run_step(s)  # two prefill steps of up to 8 tokens
        # each holds one full block of 4 and needs a second one to decode: 7 blocks hold 3
        victims[policy] = run_step(s).preempted
    assert victims == {"priority": ["late"], "fcfs": ["b"]}
