"""Sizing the serving front end (placement/frontend.py): closed-form loads, and the plan's
config carrying what was sized."""

from __future__ import annotations

import pytest
import yaml

from placement.frontend import ServingCost, chunks_per_request, size_front_end
from placement.latency_model import Coefficients, Entry, Profile

pytestmark = pytest.mark.unit

COST = ServingCost(26.0, 0.92, 16.0, 0.55)  # ingress ms a request, a chunk; proxy's


def test_a_request_streams_a_chunk_a_token_unless_its_tokens_are_joined():
    assert chunks_per_request(64, 16.0, 0) == 64
    # 63 token intervals of 16 ms = 1008 ms, one chunk per 50 ms, plus the first and the last
    assert chunks_per_request(64, 16.0, 50) == pytest.approx(2 + 1008 / 50)
    assert chunks_per_request(64, 16.0, 10) == 64  # an interval under the TPOT joins nothing
    assert chunks_per_request(2, 16.0, 1000) == 2  # the first and the last go out at once


def test_a_low_rate_needs_one_ingress_and_no_batching():
    front = size_front_end(0.25, [64], tpot_ms=150.0, cost=COST)
    assert (front.ingress_replicas, front.stream_interval_ms) == (1, 0)
    assert front.chunks_per_s == pytest.approx(16.0)
    assert front.ingress_load == pytest.approx(0.25 * (26 + 64 * 0.92) / 1e3)
    assert front.proxy_load == pytest.approx(0.25 * (16 + 64 * 0.55) / 1e3)
    assert not front.proxy_bound


def test_the_shortest_interval_that_relieves_the_proxy_then_ingress_replicas_for_the_rest():
    # 20 req/s of 64 tokens at 16 ms: the proxy needs 1.02 of its core without batching, 0.56
    # joining every 50 ms, 0.45 every 100 ms (12.08 chunks a request)
    front = size_front_end(20.0, [64], tpot_ms=16.0, cost=COST)
    assert front.stream_interval_ms == 100
    assert front.chunks_per_s == pytest.approx(20 * (2 + 1008 / 100))
    assert front.proxy_load == pytest.approx((20 * 16 + front.chunks_per_s * 0.55) / 1e3)
    assert front.proxy_load <= 0.5 < (20 * 16 + 20 * (2 + 1008 / 50) * 0.55) / 1e3
    ingress = (20 * 26 + front.chunks_per_s * 0.92) / 1e3  # 0.74 of a core: two at <= 0.5
    assert front.ingress_load == pytest.approx(ingress)
    assert front.ingress_replicas == 2
    assert not front.proxy_bound


def test_a_rate_past_one_proxy_is_flagged_at_the_longest_interval():
    # 30 req/s: the proxy's cost per request alone is 0.48 of its core
    front = size_front_end(30.0, [64], tpot_ms=16.0, cost=COST)
    assert front.stream_interval_ms == 1000 and front.proxy_bound
    assert front.proxy_load == pytest.approx((30 * 16 + 30 * (2 + 1008 / 1000) * 0.55) / 1e3)
    assert "1000 ms" in front.describe()


def test_mixed_output_lengths_average_their_chunks():
    front = size_front_end(1.0, [10, 100], tpot_ms=10.0, cost=ServingCost(0, 1.0, 0, 0))
    assert front.chunks_per_s == pytest.approx(55.0)
    assert front.ingress_load == pytest.approx(0.055)
    # a host at twice the speed relieves its proxy with a shorter interval than 100 ms
    fast = size_front_end(20.0, [64], 16.0, ServingCost(13, 0.46, 8, 0.27))
    assert fast.stream_interval_ms == 20 and fast.proxy_load <= 0.5


@pytest.mark.parametrize(
    "kwargs",
    [{"rate_rps": 0}, {"output_lens": []}, {"tpot_ms": 0}, {"utilization": 0}],
)
def test_out_of_range_inputs_are_refused(kwargs):
    args = {"rate_rps": 1.0, "output_lens": [8], "tpot_ms": 10.0, **kwargs}
    with pytest.raises(ValueError, match="rate > 0"):
        size_front_end(**args)


def test_a_negative_cost_is_refused_by_name():
    with pytest.raises(ValueError, match="proxy_chunk_ms"):
        ServingCost(proxy_chunk_ms=-1)


def test_haproxy_spreads_the_proxys_work_over_its_threads():
    """Serve's proxy is one event loop; HAProxy runs its threads (Ray's default 4): the same
    CPU is a quarter of the load, the ceiling four times the rate."""
    haproxy = ServingCost(26.0, 0.92, 16.0, 0.55, serve_mode="haproxy")
    assert (COST.proxy_cores, haproxy.proxy_cores) == (1, 4)
    one, four = (size_front_end(30.0, [64], 16.0, c) for c in (COST, haproxy))
    assert four.stream_interval_ms == 0 and not four.proxy_bound  # 30 req/s: no batching
    assert four.proxy_load == pytest.approx((30 * 16 + 30 * 64 * 0.55) / 1e3 / 4)
    assert four.proxy_ceiling_rps == pytest.approx(4 * one.proxy_ceiling_rps)
    assert ServingCost(serve_mode="throughput").proxy_cores == 1  # Serve's proxy still
    with pytest.raises(ValueError, match="serve_mode must be one of"):
        ServingCost(serve_mode="fast")


def test_a_profiles_serving_costs_round_trip_and_default_to_none(tmp_path):
    entry = Entry(1, 1, Coefficients(1, 2, 3), Coefficients(4, 5, 6), 1000)
    measured = ServingCost(10.0, 0.5, 6.0, 0.3, serve_mode="haproxy")
    Profile("m", "d", [entry], serving=measured).save(tmp_path / "p.yaml")
    assert Profile.load(tmp_path / "p.yaml").serving == measured
    assert "serving" in yaml.safe_load((tmp_path / "p.yaml").read_text())
    Profile("m", "d", [entry]).save(tmp_path / "q.yaml")
    assert Profile.load(tmp_path / "q.yaml").serving is None
    assert "serving" not in yaml.safe_load((tmp_path / "q.yaml").read_text())
    with pytest.raises(ValueError, match="ingress_chunk_ms"):
        Profile.from_dict({"model": "m", "device": "d", "entries": [],
                           "serving": {"ingress_chunk_ms": -2.0}})  # fmt: skip


def _plan(kind: str = "disaggregated", p90_tpot_ms: float = 16.0, serving=COST):
    from placement.optimizer import Candidate, Cluster, Search
    from placement.simulator import SLO, InstanceSpec, Placement
    from placement.workload import Workload

    entry = Entry(1, 1, Coefficients(1, 2, 3), Coefficients(4, 5, 6), 10**6)
    if kind == "colocated":
        placement = Placement(colocated=InstanceSpec(entry))
    else:
        placement = Placement(prefill=InstanceSpec(entry), decode=InstanceSpec(entry))
    search = Search(
        profile=Profile("m", "d", [entry], serving=serving),
        workload=Workload(50, input_len=512, output_len=64),
        slo=SLO(ttft_ms=500, tpot_ms=50),
        cluster=Cluster(1, 2),
        kv_bytes_per_token=1000,
    )
    return Candidate(kind, placement, 20.0, 100.0, p90_tpot_ms), search


def test_the_plan_sizes_its_front_end_for_the_rate_it_serves():
    from placement.plan import front_end_for

    chosen, search = _plan()
    assert front_end_for(chosen, search) == size_front_end(20.0, [64] * 50, 16.0, COST)
    # a requested rate, grown by the autoscaling factor
    assert front_end_for(chosen, search, rate=10.0, autoscale=3.0).rate_rps == 30.0
    # no simulated TPOT (or one past the target): the target's
    chosen, search = _plan(p90_tpot_ms=float("nan"))
    assert front_end_for(chosen, search) == size_front_end(20.0, [64] * 50, 50.0, COST)
    # the profile's measured costs are used, the defaults without them
    cheap = ServingCost(1.0, 0.01, 1.0, 0.01)
    chosen, search = _plan(serving=cheap)
    assert front_end_for(chosen, search).stream_interval_ms == 0
    chosen, search = _plan(serving=None)
    assert front_end_for(chosen, search) == size_front_end(20.0, [64] * 50, 16.0, ServingCost())


@pytest.mark.parametrize("kind", ["disaggregated", "colocated"])
def test_the_written_config_carries_the_front_end_and_the_server_accepts_it(kind):
    from app.builder import build_app
    from app.config import AppArgs
    from placement.plan import front_end_for, serve_config

    chosen, search = _plan(kind)
    front = front_end_for(chosen, search)
    config = yaml.safe_load(yaml.safe_dump(serve_config(chosen, search, front=front)))
    [app] = config["applications"]
    args = AppArgs.model_validate(app["args"])
    assert args.ingress.num_replicas == front.ingress_replicas == 2
    streaming = args.colocated if kind == "colocated" else args.decode
    assert streaming.stream_batching_interval_ms == front.stream_interval_ms == 100
    if kind == "disaggregated":
        assert args.prefill.stream_batching_interval_ms == 0  # prefill streams one token
    build_app(app["args"])
    unsized = serve_config(chosen, search)["applications"][0]["args"]
    assert "ingress" not in unsized  # without a front end: the server's defaults


def test_the_proxy_ceiling_is_the_rate_that_fills_its_core_at_the_longest_interval():
    front = size_front_end(30.0, [64], tpot_ms=16.0, cost=COST)
    per_request_ms = 16 + (2 + 1008 / 1000) * 0.55
    assert front.proxy_ceiling_rps == pytest.approx(1e3 / per_request_ms)  # ~57 req/s
    # the same at any rate it was sized for: a property of the workload and the host
    assert size_front_end(1.0, [64], 16.0, COST).proxy_ceiling_rps == pytest.approx(
        front.proxy_ceiling_rps
    )
    free = size_front_end(1.0, [64], 16.0, ServingCost(1.0, 0.1, 0.0, 0.0))
    assert free.proxy_ceiling_rps == float("inf") and free.proxy_load == 0


def test_a_plan_past_what_one_proxy_carries_takes_the_cheapest_placement_that_reaches_it():
    """The engines' best placement (4 GPUs, 1000 req/s) is more than one proxy carries: the
    plan takes the fewest GPUs that reach the proxy's usable rate, sized for that rate."""
    from placement.optimizer import Candidate
    from placement.plan import fit_to_front_end
    from placement.simulator import InstanceSpec, Placement

    chosen, search = _plan()
    entry = chosen.placement.colocated or chosen.placement.decode

    def candidate(count: int, rate: float) -> Candidate:
        return Candidate("colocated", Placement(colocated=InstanceSpec(entry.entry, count)),
                         rate, 100.0, 16.0)  # fmt: skip

    big, mid, small = candidate(4, 1000.0), candidate(2, 300.0), candidate(1, 50.0)
    usable = size_front_end(1.0, [64] * 50, 16.0, COST).usable_rps  # ~28 req/s at COST
    fitted, front = fit_to_front_end([big, mid, small], big, search, None)
    assert fitted is small and small.goodput_rps >= usable  # the fewest GPUs that reach it
    assert front.rate_rps == pytest.approx(usable) and not front.proxy_bound
    # autoscaling grows the planned rate by its factor: the base is what the proxy takes / 2
    fitted, front = fit_to_front_end([big, mid, small], big, search, 2.0)
    assert front.rate_rps == pytest.approx(usable)
    # within what the proxy carries: the engines' choice stands, sized for its goodput
    fitted, front = fit_to_front_end([big, mid, small], candidate(1, 10.0), search, None)
    assert fitted.goodput_rps == 10.0 and front.rate_rps == 10.0
