"""Workload statistics and the simulator against closed-form timelines."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from placement.latency_model import Coefficients, Entry, ExpertRead
from placement.simulator import (
    SLO,
    InstanceSpec,
    Placement,
    attainment,
    goodput,
    simulate,
)
from placement.workload import SimRequest, Workload

pytestmark = pytest.mark.unit
ENTRY = Entry(1, 1, Coefficients(10.0, 0.1, 0.0), Coefficients(20.0, 0.01, 2.0), 100_000)


def disagg(entry=ENTRY, n_prefill=1, n_decode=1, transfer=0.0, budget=2048) -> Placement:
    return Placement(
        prefill=InstanceSpec(entry, n_prefill, max_batch_tokens=budget),
        decode=InstanceSpec(entry, n_decode),
        kv_transfer_ms_per_token=transfer,
    )


def test_poisson_and_gamma_arrivals_have_the_asked_rate_and_cv():
    for cv in (1.0, 2.0):
        reqs = Workload(20_000, cv=cv).sample(rate=4.0, seed=1)
        gaps = np.diff([0.0] + [r.arrival_ms for r in reqs]) / 1e3
        assert 1 / gaps.mean() == pytest.approx(4.0, rel=0.03)
        assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.05)


def test_lengths_fixed_ranged_or_from_a_dataset_and_deterministic():
    w = Workload(500, input_len=(100, 200), output_len=8)
    a, b = w.sample(2.0, seed=3), w.sample(2.0, seed=3)
    assert a == b and a != w.sample(2.0, seed=4)
    assert all(100 <= r.input_len <= 200 and r.output_len == 8 for r in a)
    data = ((10, 1), (20, 2))
    assert {(r.input_len, r.output_len) for r in Workload(50, dataset=data).sample(1.0)} == set(
        data
    )
    with pytest.raises(ValueError):
        w.sample(0.0)


def test_single_request_timeline_is_closed_form():
    L, out = 300, 5
    [r] = simulate(disagg(), [SimRequest(0.0, L, out)])
    assert r.ttft_ms == pytest.approx(10 + 0.1 * L)
    steps = [20 + 0.01 * (L + k) + 2 for k in range(1, out)]  # contexts L+1 .. L+out-1
    assert r.tpot_ms == pytest.approx(sum(steps) / (out - 1))


def test_a_mixtures_decode_steps_read_the_experts_their_batch_is_routed_to():
    """4 experts, top 1, 8 of decode's 20 ms reading them: one request's steps skip 3/4 of
    that read; over pp stages a step pays each stage's fixed part."""
    moe = replace(ENTRY, experts=ExpertRead(4, 1, 8.0))
    L, out = 300, 5
    [r] = simulate(disagg(moe), [SimRequest(0.0, L, out)])
    steps = [20 - 8 * 0.75 + 0.01 * (L + k) + 2 for k in range(1, out)]
    assert r.tpot_ms == pytest.approx(sum(steps) / (out - 1))
    [co] = simulate(Placement(colocated=InstanceSpec(moe, 1)), [SimRequest(0.0, L, out)])
    assert co.tpot_ms == pytest.approx(r.tpot_ms)  # colocated steps of decodes alone: the same
    [deep] = simulate(disagg(replace(moe, pp=2)), [SimRequest(0.0, L, 2)])
    assert deep.tpot_ms == pytest.approx(2 * (20 - 8 * 0.75) + 0.01 * (L + 1) + 2)


def test_decode_steps_cost_the_contexts_of_the_requests_still_running():
    """A step costs 20 + 0.01 x its batch's contexts + 2 a request, as requests join the batch
    and leave it. Two prompts arriving together prefill one after the other (0-20, 20-40 ms);
    the first leaves after its third token."""

    def step(*contexts: int) -> float:
        return 20 + 0.01 * sum(contexts) + 2 * len(contexts)

    reqs = [SimRequest(0.0, 100, 3), SimRequest(0.0, 100, 5)]
    # disaggregated: the first decodes alone from 20 ms, the second joins its next step
    first, second = simulate(disagg(), reqs)
    joined = 20 + step(101)
    assert first.tpot_ms == pytest.approx((step(101) + step(102, 101)) / 2)
    end = joined + step(102, 101) + step(102) + step(103) + step(104)
    assert second.tpot_ms == pytest.approx((end - 40) / 4)
    # colocated: the second's prefill first, then both decode from 40 ms
    first, second = simulate(Placement(colocated=InstanceSpec(ENTRY, 1)), reqs)
    left = 40 + step(101, 101) + step(102, 102)
    assert first.tpot_ms == pytest.approx((left - 20) / 2)
    assert second.tpot_ms == pytest.approx((left + step(103) + step(104) - 40) / 4)


def test_decode_steps_follow_a_measured_batch_curve():
    curve = ((1, 20.0), (2, 22.0), (3, 40.0), (4, 60.0))  # not a line: a CPU's kernel paths
    entry = Entry(1, 1, ENTRY.prefill, Coefficients(20.0, 0.0, 1.0), 100_000, curve)
    reqs = [SimRequest(0.0, 100, 2)] + [SimRequest(1.0, 100, 5)] * 3
    # prefill 0-20 ms alone, the other three at 20-60 ms (10 + 0.1 * 300)
    [first, *rest] = simulate(disagg(entry), reqs)
    assert (first.ttft_ms, first.tpot_ms) == pytest.approx((20.0, 20.0))  # decodes alone
    # the three reach decode at 60 ms one by one: the first starts a step alone (20 ms), the
    # other two join it at 80 for three steps of 3 (40 ms each), and finish with one of 2 (22)
    assert [r.ttft_ms for r in rest] == pytest.approx([59.0] * 3)
    assert [r.tpot_ms for r in rest] == pytest.approx([35.0, 40.5, 40.5])  # 140/4, 162/4
    # colocated: the three prefill before decoding, then a step of 4 (60 ms) and steps of 3
    [first, *rest] = simulate(Placement(colocated=InstanceSpec(entry, 1)), reqs)
    assert (first.ttft_ms, first.tpot_ms) == pytest.approx((20.0, 40.0 + 60.0))
    assert [x for r in rest for x in (r.ttft_ms, r.tpot_ms)] == pytest.approx([59.0, 45.0] * 3)


def test_kv_transfer_delays_decode_not_the_first_token():
    [r0] = simulate(disagg(), [SimRequest(0.0, 300, 5)])
    [r1] = simulate(disagg(transfer=0.5), [SimRequest(0.0, 300, 5)])
    assert r1.ttft_ms == r0.ttft_ms
    assert r1.tpot_ms == pytest.approx(r0.tpot_ms + 0.5 * 300 / 4)


def test_prefill_queueing_and_batching_under_the_token_budget():
    # the first starts alone at 0 (20 ms); two more arrive meanwhile and share the next batch
    reqs = [SimRequest(0.0, 100, 2), SimRequest(5.0, 100, 2), SimRequest(5.0, 100, 2)]
    batched = simulate(disagg(budget=200), reqs)
    assert [r.ttft_ms for r in batched] == pytest.approx([20.0, 45.0, 45.0])  # 20 + 10 + 0.1*200
    one_at_a_time = simulate(disagg(budget=100), reqs)
    assert [r.ttft_ms for r in one_at_a_time] == pytest.approx([20.0, 35.0, 55.0])


def test_pipeline_overlaps_batches_but_each_crosses_every_stage():
    entry = Entry(1, 2, ENTRY.prefill, ENTRY.decode, ENTRY.kv_capacity_tokens)
    reqs = [SimRequest(0.0, 100, 1), SimRequest(0.0, 100, 1)]
    r = simulate(disagg(entry, budget=100), reqs)
    assert [x.ttft_ms for x in r] == pytest.approx([40.0, 60.0])  # stage 20 ms, 2 stages


def test_decode_waits_for_kv_capacity_and_never_drops():
    small = Entry(1, 1, ENTRY.prefill, ENTRY.decode, kv_capacity_tokens=120)  # one request
    reqs = [SimRequest(0.0, 100, 10), SimRequest(0.0, 100, 10)]
    first, second = simulate(disagg(small), reqs)
    first_end = 20.0 + 9 * first.tpot_ms  # first token at 20 ms, then 9 decode steps
    second_end = 40.0 + 9 * second.tpot_ms
    # the second decodes only once the first has left: 9 more steps of at least 22 ms each
    assert np.isfinite(second.tpot_ms) and second_end >= first_end + 9 * 22.0
    too_big = simulate(disagg(small), [SimRequest(0.0, 200, 10)])[0]
    assert too_big.tpot_ms == float("inf")  # can never fit: it misses, it is not lost silently


def test_colocation_interference_slows_running_decodes():
    reqs = [SimRequest(0.0, 50, 40), SimRequest(100.0, 2000, 2)]
    colocated = Placement(colocated=InstanceSpec(ENTRY, 1))
    co, dis = simulate(colocated, reqs), simulate(disagg(), reqs)
    # the 2000-token prefill (210 ms) lands inside the first request's decode in colocation
    assert co[0].tpot_ms == pytest.approx(dis[0].tpot_ms + 210.0 / 39, rel=1e-6)


def test_attainment_counts_only_requests_meeting_both_slos():
    from placement.simulator import Result

    results = [Result(100, 10), Result(300, 10), Result(100, 50), Result(100, 20)]
    assert attainment(results, SLO(ttft_ms=200, tpot_ms=20)) == 0.5


def test_goodput_doubles_with_a_second_prefill_instance_when_prefill_bound():
    entry = Entry(1, 1, Coefficients(100.0, 0.0, 0.0), Coefficients(1.0, 0.0, 0.0), 10**6)
    work = Workload(400, input_len=64, output_len=4)
    slo = SLO(ttft_ms=400, tpot_ms=50)
    one = goodput(disagg(entry, budget=64), work, slo)
    two = goodput(disagg(entry, n_prefill=2, budget=64), work, slo)
    assert 2 < one.rate < 10  # one server of 100 ms requests saturates at 10 req/s
    assert two.rate > 1.6 * one.rate
    assert one.attainment_at_rate >= 0.9
    assert goodput(disagg(entry, budget=64), work, slo).rate == one.rate  # deterministic


def test_goodput_under_a_slo_any_burst_meets_is_the_rate_the_placement_completes():
    """With a TTFT target no queue can miss, the run meets the SLO at any arrival rate; the
    placement still completes only one 100 ms prefill at a time: 10 req/s, not the search's
    ceiling (which it used to report)."""
    entry = Entry(1, 1, Coefficients(100.0, 0.0, 0.0), Coefficients(1.0, 0.0, 0.0), 10**6)
    work = Workload(400, input_len=64, output_len=4)
    loose = goodput(disagg(entry, budget=64), work, SLO(ttft_ms=1e9, tpot_ms=50))
    # 400 prefills of 100 ms one after another, then the last one's three decode steps of 1 ms
    assert loose.rate == pytest.approx(400 / (400 * 0.1 + 0.003), rel=1e-9)
    assert loose.attainment_at_rate == 1.0
    tight = goodput(disagg(entry, budget=64), work, SLO(ttft_ms=400, tpot_ms=50))
    assert tight.rate < loose.rate  # below it, the SLO still decides


CHUNK_ENTRY = Entry(1, 1, Coefficients(10.0, 0.1, 1e-4), Coefficients(20.0, 0.01, 2.0), 100_000)


def chunked(budget: int) -> Placement:
    spec = InstanceSpec(CHUNK_ENTRY, max_batch_tokens=budget, chunked_prefill=True)
    return Placement(colocated=spec)


def test_chunked_prefill_splits_a_prompt_and_pays_its_full_attention_cost():
    [alone] = simulate(chunked(256), [SimRequest(0.0, 512, 3)])
    p, d = CHUNK_ENTRY.prefill, CHUNK_ENTRY.decode
    # two chunks of 256: each pays a; the quadratic terms add up to c * 512^2
    assert alone.ttft_ms == pytest.approx(2 * p.a + p.b * 512 + p.c * 512**2)
    step = d.a + d.b * 513 + d.c  # decodes run alone once the prompt is done (first at 513)
    assert alone.tpot_ms == pytest.approx((step + step + d.b) / 2)
    [whole] = simulate(chunked(1024), [SimRequest(0.0, 512, 3)])
    assert whole.ttft_ms == pytest.approx(CHUNK_ENTRY.prefill_ms([512]))


def test_chunked_prefill_bounds_the_stall_a_long_prompt_puts_on_running_decodes():
    reqs = [SimRequest(0.0, 16, 40), SimRequest(100.0, 2000, 2)]
    plain = simulate(Placement(colocated=InstanceSpec(CHUNK_ENTRY)), reqs)
    mixed = simulate(chunked(256), reqs)
    # whole-prompt prefill stalls the decode for one 2000-token step; chunks spread it out
    # and each mixed step also carries the decode, so the decode's TPOT is smaller...
    assert mixed[0].tpot_ms < plain[0].tpot_ms
    # ...while the long prompt's own first token comes later (8 steps, 8 fixed costs)
    assert mixed[1].ttft_ms > plain[1].ttft_ms


def test_requests_go_to_the_idle_instance_not_the_one_busy_prefilling():
    reqs = [SimRequest(0.0, 500, 4), SimRequest(1.0, 500, 4)]  # the 2nd lands mid-prefill
    for placement in (Placement(colocated=InstanceSpec(ENTRY, 2)), disagg(n_prefill=2)):
        first, second = simulate(placement, reqs)
        assert second.ttft_ms == pytest.approx(first.ttft_ms)  # no queueing behind the first


def test_node_contention_is_processor_sharing_with_closed_form_times():
    """Two colocated instances, 100 ms prefills, contention 1 (two busy -> half speed each):
    A starts at 0, B at 50. A runs alone for 50 ms, then both at half speed: A's last 50 ms of
    work end at 150; B has done 50 by then and finishes alone at 200."""
    entry = Entry(1, 1, Coefficients(100.0, 0.0, 0.0), Coefficients(1.0, 0.0, 0.0), 10_000)
    shared = Placement(colocated=InstanceSpec(entry, 2), node_contention=1.0)
    reqs = [SimRequest(0.0, 10, 1), SimRequest(50.0, 10, 1)]
    a, b = simulate(shared, reqs)
    assert (a.ttft_ms, b.ttft_ms) == pytest.approx((150.0, 150.0))
    # no contention: each prefill takes its solo 100 ms
    alone = simulate(Placement(colocated=InstanceSpec(entry, 2)), reqs)
    assert [r.ttft_ms for r in alone] == pytest.approx([100.0, 100.0])


def test_node_contention_slows_disaggregated_decode_during_a_prefill():
    """A decode step that runs entirely beside a neighbour's prefill takes (1 + k) x as long;
    after the prefill the steps are solo again."""
    pre = Coefficients(0.0, 1.0, 0.0)  # 1 ms per prompt token
    entry = Entry(1, 1, pre, Coefficients(10.0, 0.0, 0.0), 100_000)
    reqs = [SimRequest(0.0, 10, 3), SimRequest(10.0, 1000, 1)]
    placement = replace(disagg(entry), node_contention=0.5)
    first, second = simulate(placement, reqs)
    # request 0: prefill 0-10 alone; its decode steps (10 ms solo) run beside the 1000 ms
    # prefill that started at 10: each takes 15 ms
    assert first.tpot_ms == pytest.approx(15.0)
    # the long prefill shared the node for 30 ms (20 ms of work done at 2/3 speed)
    assert second.ttft_ms == pytest.approx(1000.0 + 30.0 - 20.0)
    with pytest.raises(ValueError, match="node_contention"):
        Placement(colocated=InstanceSpec(entry), node_contention=-0.1)
