"""Prefix caching in the workload, the simulator and the load generator: closed-form timelines,
and the engine's own scheduler (pure Python) as a second path for which tokens a step computes."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from engine.block_manager import BlockManager
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig
from placement.latency_model import Coefficients, Entry, Profile, prefix_attention
from placement.simulator import SLO, InstanceSpec, Placement, goodput, simulate
from placement.workload import SimRequest, Workload

pytestmark = pytest.mark.unit
ENTRY = Entry(1, 1, Coefficients(10.0, 0.1, 1e-4), Coefficients(20.0, 0.01, 2.0), 100_000)
P = ENTRY.prefill


def spec(entry: Entry = ENTRY, caching: bool = True, **kw) -> InstanceSpec:
    return InstanceSpec(entry, prefix_caching=caching, **kw)


def disagg(caching: bool = True, entry: Entry = ENTRY, n_prefill: int = 1, **kw) -> Placement:
    prefill = replace(spec(entry, caching, **kw), count=n_prefill)
    return Placement(prefill=prefill, decode=spec(entry, caching))


def colocated(caching: bool = True, entry: Entry = ENTRY, **kw) -> Placement:
    return Placement(colocated=spec(entry, caching, **kw))


def chunk_ms(tokens: int, offset: int = 0) -> float:
    """One prefill step of one prompt computed from `offset`."""
    return P.a + P.b * tokens + P.c * prefix_attention(tokens, offset)


def test_workload_puts_a_shared_prefix_before_each_prompt_without_changing_other_draws():
    plain = Workload(400, input_len=(50, 90), output_len=(4, 9), cv=2.0)
    shared = replace(plain, prefix_len=200, num_prefixes=3)
    a, b = plain.sample(1.5, seed=2), shared.sample(1.5, seed=2)
    assert [(r.arrival_ms, r.input_len + 200, r.output_len) for r in a] == [
        (r.arrival_ms, r.input_len, r.output_len) for r in b
    ]
    assert all(r.prefix_len == 200 for r in b) and all(r.prefix_len == 0 for r in a)
    counts = [sum(r.prefix_id == g for r in b) for g in range(3)]
    assert sorted(counts)[0] > 100 and sum(counts) == 400  # about uniform over 3
    assert shared.sample(1.5, seed=2) == b  # deterministic
    for bad in ({"prefix_len": -1}, {"num_prefixes": 0}):
        with pytest.raises(ValueError, match="prefix_len >= 0 and num_prefixes >= 1"):
            replace(plain, **bad)


@pytest.mark.parametrize("make", [disagg, colocated])
def test_a_cached_prefix_is_skipped_in_whole_blocks(make):
    """B arrives after A's prefill: its first 250 shared tokens are cached as 15 whole blocks
    (240 tokens); it computes the other 60 as a chunk at offset 240. Another prefix, or caching
    off, computes all 300."""
    a = SimRequest(0.0, 300, 1, prefix_len=250, prefix_id=7)
    b = SimRequest(1000.0, 300, 1, prefix_len=250, prefix_id=7)
    first, second = simulate(make(), [a, b])
    assert first.ttft_ms == pytest.approx(ENTRY.prefill_ms([300]))
    assert second.ttft_ms == pytest.approx(chunk_ms(60, 240))
    other = replace(b, prefix_id=8)
    assert simulate(make(), [a, other])[1].ttft_ms == pytest.approx(ENTRY.prefill_ms([300]))
    assert simulate(make(False), [a, b])[1].ttft_ms == pytest.approx(ENTRY.prefill_ms([300]))


def test_chunked_prefill_starts_past_the_cached_prefix():
    a = SimRequest(0.0, 300, 1, prefix_len=256, prefix_id=0)
    b = SimRequest(1000.0, 300, 1, prefix_len=256, prefix_id=0)
    placement = colocated(max_batch_tokens=32, chunked_prefill=True)
    _, second = simulate(placement, [a, b])
    # 44 tokens past 256 cached: chunks of 32 and 12, each paying a and its prefix attention
    assert second.ttft_ms == pytest.approx(chunk_ms(32, 256) + chunk_ms(12, 288))


def test_a_prompt_never_takes_its_last_token_from_the_cache():
    whole = SimRequest(0.0, 64, 1, prefix_len=64)  # the prompt is all prefix
    _, again = simulate(disagg(), [whole, replace(whole, arrival_ms=1000.0)])
    assert again.ttft_ms == pytest.approx(chunk_ms(16, 48))  # 63 tokens: 3 whole blocks


def test_requests_sharing_most_of_their_prompt_wait_for_the_first_to_compute_it():
    """Three queue behind a busy prefill: the first computes the 448-token prefix; the second
    (sharing 7/8 of its prompt) waits a step and computes 64 tokens; the third (another
    prefix) is not held up by it. With a short shared part all compute their prompt at once."""
    busy = SimRequest(0.0, 100, 1)
    reqs = [
        SimRequest(1.0, 512, 1, prefix_len=448, prefix_id=0),
        SimRequest(1.0, 512, 1, prefix_len=448, prefix_id=0),
        SimRequest(1.0, 512, 1, prefix_len=448, prefix_id=1),
    ]
    start = ENTRY.prefill_ms([100])
    _, first, second, third = simulate(disagg(), [busy, *reqs])
    assert first.ttft_ms == third.ttft_ms == pytest.approx(start - 1 + ENTRY.prefill_ms([512] * 2))
    assert second.ttft_ms == pytest.approx(first.ttft_ms + chunk_ms(64, 448))
    short = [replace(r, prefix_len=128) for r in reqs]
    assert [r.ttft_ms for r in simulate(disagg(), [busy, *short])[1:]] == pytest.approx(
        [start - 1 + ENTRY.prefill_ms([512] * 3)] * 3
    )


def test_a_pipeline_keeps_waiting_requests_until_the_prefix_leaves_its_last_stage():
    """pp = 2: the next batch may start after one stage, but the prefix is cached only when its
    batch is through both; the waiting request then starts on its own."""
    pp2 = replace(ENTRY, pp=2)
    reqs = [SimRequest(0.0, 512, 1, prefix_len=448), SimRequest(1.0, 512, 1, prefix_len=448)]
    first, second = simulate(disagg(entry=pp2), reqs)
    assert first.ttft_ms == pytest.approx(2 * ENTRY.prefill_ms([512]))
    assert second.ttft_ms == pytest.approx(first.ttft_ms - 1 + 2 * chunk_ms(64, 448))


def test_a_prefix_is_evicted_once_more_than_the_free_cache_was_computed_since():
    """KV for 2000 tokens: after the 496 cached tokens of a 500-token prefix, 1200 tokens of
    other prompts fit beside them (the prefix is reused); 1600 push it out (computed again)."""
    small = replace(ENTRY, kv_capacity_tokens=2000)
    head = SimRequest(0.0, 512, 1, prefix_len=500, prefix_id=1)
    again = SimRequest(100_000.0, 512, 1, prefix_len=500, prefix_id=1)

    def second_ttft(others: int) -> float:
        fillers = [SimRequest(1000.0 * (k + 1), 400, 1) for k in range(others)]
        return simulate(disagg(entry=small), [head, *fillers, again])[-1].ttft_ms

    assert second_ttft(3) == pytest.approx(chunk_ms(16, 496))
    assert second_ttft(4) == pytest.approx(ENTRY.prefill_ms([512]))


def test_colocated_requests_hold_one_copy_of_their_cached_prefix():
    """KV for 1104 tokens, requests needing 1000 (950 prompt + 50 output) of which 896 are the
    cached blocks of a 900-token prefix: the second of one prefix fits beside the first
    (1000 + 104); a third of another prefix needs 1000 and starts only when both have given
    back all they held (a leak of either part would keep it out for good)."""
    small = replace(ENTRY, kv_capacity_tokens=1104)
    reqs = [SimRequest(float(k), 950, 50, prefix_len=900, prefix_id=k // 2) for k in range(3)]
    first, second, third = simulate(colocated(entry=small), reqs)
    decoding = 49 * ENTRY.decode.a  # at least, for the rest of one request's output
    assert second.ttft_ms < first.ttft_ms + ENTRY.prefill_ms([950])  # beside the first
    assert third.ttft_ms > second.ttft_ms + decoding
    assert third.tpot_ms < float("inf")  # it ran
    # without caching the second needs 1000 more too: it waits for the first to finish
    _, alone, _ = simulate(colocated(False, entry=small), reqs)
    assert alone.ttft_ms > first.ttft_ms + decoding


def test_goodput_grows_with_the_share_of_the_prompt_that_is_a_cached_prefix():
    work = Workload(200, input_len=64, output_len=4, prefix_len=448, num_prefixes=2)
    slo = SLO(ttft_ms=2000, tpot_ms=200)
    on = goodput(disagg(), work, slo).rate
    off = goodput(disagg(False), work, slo).rate
    assert on > 2 * off
    plain = Workload(200, input_len=512, output_len=4)  # no prefixes: the cache changes nothing
    assert goodput(disagg(), plain, slo).rate == goodput(disagg(False), plain, slo).rate


def _engine_ttfts(requests: list[SimRequest], budget: int) -> list[float]:
    """The engine scheduler's steps over the same prompts (prefix tokens per prefix id, then
    tokens of each request's own), each timed by the latency model: when each prompt's step
    ends. Prefill-only requests leave once prefilled, as on a prefill replica."""
    s = Scheduler(
        SchedulerConfig(max_num_batched_tokens=budget, enable_prefix_caching=True),
        BlockManager(4096, 16, True),
    )
    own = itertools.count(10_000)
    arriving = []
    for k, r in enumerate(requests):
        prompt = [1000 * (r.prefix_id + 1) + i for i in range(r.prefix_len)]
        prompt += [next(own) for _ in range(r.input_len - r.prefix_len)]
        params = SamplingParams(max_tokens=1)
        arriving.append(
            Request(str(k), prompt, params, prefill_only=True, arrival_time=r.arrival_ms)
        )
    t, ttft = 0.0, [0.0] * len(requests)
    while arriving or s.num_unfinished:
        while arriving and arriving[0].arrival_time <= t:  # those that came during the step
            s.add(arriving.pop(0))
        out = s.schedule()
        if out.is_empty:
            t = arriving[0].arrival_time
            continue
        t += P.a + sum(P.b * i.num_tokens + P.c * prefix_attention(i.num_tokens, i.start)
                       for i in out.scheduled)  # fmt: skip
        done = [i.request for i in out.scheduled if i.samples]
        s.postprocess(out, {r.request_id: [7] for r in done})
        for request in done:
            k = int(request.request_id)
            ttft[k] = t - requests[k].arrival_ms
            s.finish(request, RequestStatus.FINISHED_STOPPED)
    return ttft


@pytest.mark.parametrize("budget", [4096, 1024])
def test_simulated_prefill_steps_match_the_engine_schedulers(budget):
    """Requests in three waves (the later ones arriving mid-step), several prefixes (one not
    block-aligned), requests sharing less than half their prompt, one with no prefix: the
    simulator's first-token times equal those of the engine scheduler's own steps under the
    same step-time model."""
    shapes = [(0, 0, 300, 250), (1, 0, 320, 250), (1, 1, 600, 512), (1, 0, 280, 250),
              (1, 2, 900, 200), (1, 1, 530, 512), (1, 3, 400, 0), (1, 2, 260, 200),
              (200, 1, 700, 512), (200, 0, 900, 250), (200, 4, 300, 16)]  # fmt: skip
    requests = [SimRequest(t, n, 1, prefix, pid) for t, pid, n, prefix in shapes]
    simulated = [r.ttft_ms for r in simulate(disagg(max_batch_tokens=budget), requests)]
    assert simulated == pytest.approx(_engine_ttfts(requests, budget))


def test_load_generator_prompts_start_with_their_prefix_and_the_simulator_replays_them():
    from bench.datasets import DatasetItem
    from bench.loadgen import from_dataset, synthetic
    from bench.report import sim_requests

    w = {"num_requests": 30, "input_len": 40, "output_len": 5, "cv": 1.0, "seed": 2,
         "prefix_len": 64, "num_prefixes": 3}  # fmt: skip
    workload = Workload(30, 40, 5, prefix_len=64, num_prefixes=3)
    sent = synthetic(workload, 2.0, seed=2)
    replay = sim_requests({"workload": {**w, "dataset_lengths": None}}, 2.0)
    assert replay == workload.sample(2.0, seed=2)
    _assert_prefixes(sent, replay, 64)
    assert {len(s.prompt) for s in sent} == {104}
    plain = synthetic(Workload(30, 40, 5), 2.0, seed=2)  # without prefixes: as before
    assert [len(s.prompt) for s in plain] == [40] * 30 and plain[0].prompt != sent[0].prompt

    items = [DatasetItem(tuple(range(n)), out) for n, out in ((5, 7), (40, 3), (12, 90))]
    sent = from_dataset(items, 30, 2.0, seed=2, shared=workload)
    lengths = [[i.input_len, i.output_len] for i in items]
    replay = sim_requests({"workload": {**w, "dataset_lengths": lengths}}, 2.0)
    assert [(r.input_len, r.output_len) for r in replay] == [
        (len(s.prompt), s.max_tokens) for s in sent
    ]
    _assert_prefixes(sent, replay, 64)
    assert all(tuple(s.prompt[64:]) in {i.prompt_ids for i in items} for s in sent)


def _assert_prefixes(sent, replay, n: int) -> None:
    """Requests with one prefix id start with the same n tokens, different ids differ."""
    starts = {}
    for s, r in zip(sent, replay, strict=True):
        assert r.prefix_len == n
        assert starts.setdefault(r.prefix_id, s.prompt[:n]) == s.prompt[:n]
    assert len(starts) == 3 and len({tuple(p) for p in starts.values()}) == 3


def test_experiment_turns_prefix_caching_on_for_shared_prefixes_and_the_report_sees_it():
    from app.config import AppArgs
    from bench.experiment import app_args
    from bench.report import placement_for

    on = app_args("coloc-2", prefix_caching=True)
    assert AppArgs.model_validate(on).colocated.engine.enable_prefix_caching
    assert not app_args("coloc-2")["colocated"]["engine"]["enable_prefix_caching"]
    assert placement_for(on, ENTRY).colocated.prefix_caching
    disagg_args = app_args("disagg-1p1d", prefix_caching=True)
    assert placement_for(disagg_args, ENTRY).prefill.prefix_caching
    assert not placement_for(app_args("disagg-1p1d"), ENTRY).prefill.prefix_caching
    baseline = app_args("disagg-1p1d-nocache", prefix_caching=True)  # stays without
    assert not placement_for(baseline, ENTRY).prefill.prefix_caching


def test_placement_cli_plans_for_shared_prefixes_or_says_what_is_wrong(tmp_path, capsys):
    from placement import simulate

    profile = tmp_path / "p.yaml"
    Profile("m", "cpu", [ENTRY]).save(profile)
    common = [
        "--profile", str(profile), "--cluster", "1x2", "--dtype", "float32",
        "--workload", "64:4", "--prefix-len", "448", "--num-prefixes", "2",
        "--ttft-slo", "2000", "--tpot-slo", "200", "--num-requests", "100",
        "--prefill", "1x1:1", "--decode", "1x1:1",
    ]  # fmt: skip
    simulate.main(common)
    cached = capsys.readouterr().out
    simulate.main([*common, "--no-prefix-caching"])
    whole = capsys.readouterr().out

    def rate(text: str) -> float:
        return float(text.split("goodput: ")[1].split(" req/s")[0])

    assert rate(cached) > 2 * rate(whole)
    with pytest.raises(SystemExit, match="num_prefixes >= 1"):
        simulate.main([*common, "--num-prefixes", "0"])


def test_prefix_affinity_sends_a_prompt_where_its_prefix_went_unless_that_one_is_busy():
    """Two prefill instances: A goes to the first (both idle), B to the second (the first is
    busy). Much later both come back to two idle instances: by load both go to the first, and
    B computes its prefix again; with affinity B goes back to the second and takes it from the
    cache. A holder busier than the imbalance allows is passed over."""
    from app.config import MAX_IMBALANCE
    from app.prefix_router import MIN_SHARE
    from placement.simulator import PREFIX_AFFINITY, _PromptRouter

    assert PREFIX_AFFINITY == MAX_IMBALANCE  # the simulator routes as the server's default
    assert _PromptRouter.MIN_SHARE == MIN_SHARE
    a = SimRequest(0.0, 512, 1, prefix_len=448, prefix_id=0)
    b = SimRequest(1.0, 512, 1, prefix_len=448, prefix_id=1)
    again = [replace(a, arrival_ms=10_000.0), replace(b, arrival_ms=20_000.0)]

    def ttfts(affinity, later=again):
        placement = disagg(n_prefill=2, prefix_affinity=affinity)
        return [r.ttft_ms for r in simulate(placement, [a, b, *later])[2:]]

    hit, miss = chunk_ms(64, 448), ENTRY.prefill_ms([512])
    assert ttfts(PREFIX_AFFINITY) == pytest.approx([hit, hit])
    assert ttfts(None) == pytest.approx([hit, miss])
    # B's holder is busy with a long prompt of B's prefix when B comes back, the other idle:
    # one request beyond the least loaded is within an imbalance of 1, not of 0
    long_b = SimRequest(19_990.0, 4000, 1, prefix_len=448, prefix_id=1)
    later = [long_b, replace(b, arrival_ms=20_000.0)]
    waited = chunk_ms(4000 - 448, 448) - 10.0 + hit
    assert ttfts(1, later)[1] == pytest.approx(waited)
    assert ttfts(0, later)[1] == pytest.approx(miss)
