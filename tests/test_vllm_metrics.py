"""Our series under vLLM's names: recorded so by the replicas (deployments/metrics.py's
Twin, for Ray Serve LLM's dashboard on Ray's Prometheus) and named as vLLM names them on the
/metrics page (app/vllm_metrics.py). The live page of a running application:
tests/test_serve.py and tests/test_multi_model.py."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

import deployments.metrics
from app.metrics_page import merge
from deployments.metrics import EngineMetrics, RequestMetrics, one_two_five

pytestmark = pytest.mark.unit

# every vLLM series we have (vLLM's names, without "vllm:")
VLLM_NAMES = {
    "time_to_first_token_seconds",
    "request_time_per_output_token_seconds",
    "inter_token_latency_seconds",
    "e2e_request_latency_seconds",
    "request_decode_time_seconds",
    "request_inference_time_seconds",
    "request_success",
    "prompt_tokens",
    "generation_tokens",
    "request_prompt_tokens",
    "request_generation_tokens",
    "request_queue_time_seconds",
    "request_prefill_time_seconds",
    "iteration_tokens_total",
    "cache_config_info",
    "num_requests_running",
    "num_requests_waiting",
    "kv_cache_usage_perc",
    "num_preemptions",
    "prefix_cache_queries",
    "prefix_cache_hits",
    "spec_decode_num_drafts",
    "spec_decode_num_draft_tokens",
    "spec_decode_num_accepted_tokens",
    "spec_decode_num_accepted_tokens_per_pos",
}


@pytest.fixture
def made(monkeypatch) -> dict:
    """Ray's metric classes replaced by recorders: name -> the metric made under it."""
    made: dict[str, _Metric] = {}

    def kind(name: str, description: str, *rest) -> _Metric:
        made[name] = _Metric(name, rest[0] if len(rest) == 2 else None, rest[-1])
        return made[name]

    fake = SimpleNamespace(Histogram=kind, Counter=kind, Gauge=kind)
    monkeypatch.setattr(deployments.metrics, "metrics", fake)
    return made


class _Metric:
    def __init__(self, name: str, bounds: list[float] | None, keys: tuple) -> None:
        self.name, self.bounds, self.keys = name, bounds, keys
        self.records: list[tuple[float, dict]] = []

    def observe(self, value: float, tags: dict | None = None) -> None:
        assert set(tags or {}) == set(self.keys), (self.name, tags)  # as Ray requires
        self.records.append((value, tags))

    inc = set = observe


def _both(model: str | None) -> tuple[RequestMetrics, EngineMetrics]:
    engine = EngineMetrics("decode", {"block_size": "16"}, model)
    engine.close()
    return RequestMetrics((400.0, 40.0), model), engine


def test_each_series_vllm_has_is_recorded_under_its_name_in_its_units(made):
    request, _ = _both("smol")
    request.on_finish("disaggregated", 0.25, 1.25, 5, "stop", num_prompt_tokens=7, prefill_s=0.125)
    request.on_finish("disaggregated", 0.5, 0.5, 1, "stop", num_prompt_tokens=7)  # no prefill time
    request.on_interval("disaggregated", 0.012)
    ttft, twin = made["splitserve_ttft_ms"], made["vllm_time_to_first_token_seconds"]
    tags = {"mode": "disaggregated", "model_name": "smol"}
    assert ttft.records == [(250.0, {"mode": "disaggregated"}), (500.0, {"mode": "disaggregated"})]
    assert twin.records == [(0.25, tags), (0.5, tags)]
    # the engine's prefill time, then first token -> last: a request that says its prefill
    assert made["vllm_request_inference_time_seconds"].records == [(1.125, tags)]
    assert twin.bounds == [b / 1000 for b in ttft.bounds]
    # its exact sum too (the page's sum), in seconds
    assert made["vllm_time_to_first_token_seconds_exact_sum"].records == twin.records
    assert made["vllm_inter_token_latency_seconds"].records[0][0] == pytest.approx(0.012)
    assert made["vllm_request_time_per_output_token_seconds"].records[0][0] == 0.25
    # vLLM's label name for the finish reason; token counts as they are
    success = made["vllm_request_success"]
    assert success.keys == ("mode", "finished_reason", "model_name")
    assert success.records[0] == (1, {**tags, "finished_reason": "stop"})
    assert made["vllm_prompt_tokens"].records[0][0] == 7
    assert made["splitserve_prompt_tokens"].records[0][0] == 7


def test_an_engines_gauges_under_vllms_names_keep_their_phase(made):
    _, engine = _both("smol")
    stats = SimpleNamespace(
        num_running=4, num_waiting=2, num_waiting_tokens=30, kv_usage=0.5, num_loras=0
    )
    engine.on_load(stats, pending=1)
    engine.close()
    tags = {"phase": "decode", "model_name": "smol"}
    assert made["vllm_num_requests_running"].records == [(4, tags)]
    assert made["vllm_num_requests_waiting"].records == [(3, tags)]  # with the hand-off
    assert made["vllm_kv_cache_usage_perc"].records == [(0.5, tags)]
    assert made["vllm_cache_config_info"].records[0] == (1, {**tags, "block_size": "16"})


def test_every_vllm_name_once_and_none_without_a_model(made):
    """A typo in a name would leave its vLLM series where nothing looks for it."""
    _both("smol")
    twins = {n.removeprefix("vllm_") for n in made if n.startswith("vllm_")}
    assert {n.removesuffix("_exact_sum") for n in twins} == VLLM_NAMES
    # a latency in seconds is one of ours in milliseconds
    for name in VLLM_NAMES & {n for n in twins if n.endswith("_seconds")}:
        assert made[f"vllm_{name}"].bounds[0] < 0.1, name
    made.clear()
    _both(None)  # an engine outside an application, or a unit test's
    assert made and not any(n.startswith("vllm_") for n in made)


def _node_page() -> str:
    """A node's page as Ray's metrics agent writes it: a histogram recorded under vLLM's
    name with its exact sum, a counter, one of ours, and another application's sample."""

    def labels(app: str = "chat", **more: str) -> str:
        tags = {"application": app, "deployment": "Ingress", "model_name": "smol", **more}
        return ",".join(f'{k}="{v}"' for k, v in tags.items())

    ttft = "ray_vllm_time_to_first_token_seconds"
    lines = [f"# HELP {ttft} time to first token", f"# TYPE {ttft} histogram"]
    for le, below in (("0.005", 1), ("0.075", 2), ("+Inf", 3)):
        lines += [f"{ttft}_bucket{{{labels(le=le)}}} {below}"]
    lines += [f"{ttft}_count{{{labels()}}} 3", f"{ttft}_sum{{{labels()}}} 0.2"]
    lines += [f"# HELP {ttft}_exact_sum_total exact sum", f"# TYPE {ttft}_exact_sum_total counter"]
    lines += [f"{ttft}_exact_sum_total{{{labels()}}} 0.14"]
    success = "ray_vllm_request_success_total"
    lines += [f"# HELP {success} finished requests", f"# TYPE {success} counter"]
    lines += [f"{success}{{{labels(finished_reason='stop')}}} 2"]
    lines += [f"{success}{{{labels('other', finished_reason='stop')}}} 9"]
    lines += ["# HELP ray_splitserve_relayed_outputs_total engine outputs relayed"]
    lines += ["# TYPE ray_splitserve_relayed_outputs_total counter"]
    lines += [f"ray_splitserve_relayed_outputs_total{{{labels()}}} 40"]
    return "\n".join(lines) + "\n"


def test_the_page_names_them_as_vllm_does():
    page = merge([_node_page()], "chat")
    samples = {
        (s.name, s.labels.get("le", s.labels.get("finished_reason"))): s.value
        for f in text_string_to_metric_families(page)
        for s in f.samples
    }
    ttft = "vllm:time_to_first_token_seconds"
    assert samples == {
        (f"{ttft}_bucket", "0.005"): 1,
        (f"{ttft}_bucket", "0.075"): 2,
        (f"{ttft}_bucket", "+Inf"): 3,
        (f"{ttft}_count", None): 3,
        (f"{ttft}_sum", None): 0.14,  # the exact sum, not Ray's midpoints'
        ("vllm:request_success_total", "stop"): 2,  # this application's only
        ("ray_splitserve_relayed_outputs_total", None): 40,  # ours as it was
    }
    types = sorted(line for line in page.splitlines() if line.startswith("# TYPE"))
    assert types == [
        "# TYPE ray_splitserve_relayed_outputs_total counter",
        "# TYPE vllm:request_success_total counter",
        f"# TYPE {ttft} histogram",
    ]


def test_the_length_buckets_are_vllms_one_two_five():
    assert one_two_five(1) == [1.0]
    assert one_two_five(300) == [1, 2, 5, 10, 20, 50, 100, 200]
    bounds = one_two_five(8192)
    assert bounds[-1] == 5000 and len(bounds) == 3 * 4  # 1 to 5000
    assert all(math.isclose(b, 10 * a) for a, b in zip(bounds, bounds[3:], strict=False))


def test_the_bench_applies_rays_midpoint_rule():
    """bench/metrics_means.py's model of the sum Ray's agent exports: each observation at its
    bucket's midpoint (seen live: prompts of 5, 40 and 40 tokens exported 3.5 + 35 + 35), one
    past the last bound at twice that bound."""
    from bench.metrics_means import midpoint_sum

    cumulative = {1.0: 0, 2.0: 0, 5.0: 1, 10.0: 1, 20.0: 1, 50.0: 3, math.inf: 3}
    assert midpoint_sum(cumulative) == 3.5 + 35 + 35
    assert midpoint_sum({1.0: 1, 5.0: 1, math.inf: 3}) == 0.5 + 2 * 2 * 5
