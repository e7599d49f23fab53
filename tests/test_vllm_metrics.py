"""app/vllm_metrics.py: our series under vLLM's names on the /metrics page (the live page of a
running application: tests/test_serve.py and tests/test_multi_model.py)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.config import deployment_suffix
from app.metrics_page import merge
from app.vllm_metrics import ALIASES, by_deployment
from deployments.metrics import one_two_five

pytestmark = pytest.mark.unit


def _node_page() -> str:
    """A node's page as Ray's metrics agent writes it: two models' Ingresses (a multi-model
    application's deployments), a ms histogram, a counter with a renamed label, a gauge per
    phase, a family vLLM has no name for, and another application's sample."""

    def labels(deployment: str, app: str = "chat", **more: str) -> str:
        tags = {"application": app, "deployment": deployment, "replica": "r1", **more}
        return ",".join(f'{k}="{v}"' for k, v in tags.items())

    lines = ["# HELP ray_splitserve_ttft_ms time to first token"]
    lines += ["# TYPE ray_splitserve_ttft_ms histogram"]
    for deployment, count, total in (("Ingress:a", 3, 140.0), ("Ingress:b", 1, 90.0)):
        for le, below in (("5.0", 1), ("75.0", 2), ("300.0", count), ("+Inf", count)):
            lines += [f"ray_splitserve_ttft_ms_bucket{{{labels(deployment, le=le)}}} {below}"]
        lines += [f"ray_splitserve_ttft_ms_count{{{labels(deployment)}}} {count}"]
        lines += [f"ray_splitserve_ttft_ms_sum{{{labels(deployment)}}} {total}"]
    lines += ["# HELP ray_splitserve_requests_total finished requests"]
    lines += ["# TYPE ray_splitserve_requests_total counter"]
    for finish, count in (("stop", 2), ("length", 1)):
        lines += [f"ray_splitserve_requests_total{{{labels('Ingress:a', finish=finish)}}} {count}"]
    lines += [f"ray_splitserve_requests_total{{{labels('Ingress:a', 'x', finish='stop')}}} 9"]
    lines += ["# HELP ray_splitserve_running_requests requests in the running batch"]
    lines += ["# TYPE ray_splitserve_running_requests gauge"]
    for deployment, phase, count in (
        ("PrefillServer:a", "prefill", 0),
        ("DecodeServer:a", "decode", 4),
    ):
        lines += [f"ray_splitserve_running_requests{{{labels(deployment, phase=phase)}}} {count}"]
    lines += ["# HELP ray_splitserve_relayed_outputs engine outputs relayed"]
    lines += ["# TYPE ray_splitserve_relayed_outputs_total counter"]
    lines += [f"ray_splitserve_relayed_outputs_total{{{labels('Ingress:a')}}} 40"]
    return "\n".join(lines) + "\n"


def _samples(page: str, prefix: str) -> dict[tuple, float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(page)
        for s in f.samples
        if s.name.startswith(prefix)
    }


def test_each_series_of_a_known_model_is_also_under_vllms_name_in_vllms_units():
    page = merge([_node_page()], "chat", by_deployment({":a": "model-a"}))
    theirs = _samples(page, "vllm:")
    common = {"application": "chat", "replica": "r1", "model_name": "model-a"}

    def key(name: str, **labels: str) -> tuple:
        return name, tuple(sorted({**common, **labels}.items()))

    ttft = "vllm:time_to_first_token_seconds"
    ingress = {"deployment": "Ingress:a"}
    assert theirs == {
        # bucket bounds and the sum in seconds; counts as they were
        key(f"{ttft}_bucket", le="0.005", **ingress): 1,
        key(f"{ttft}_bucket", le="0.075", **ingress): 2,
        key(f"{ttft}_bucket", le="0.3", **ingress): 3,
        key(f"{ttft}_bucket", le="+Inf", **ingress): 3,
        key(f"{ttft}_count", **ingress): 3,
        key(f"{ttft}_sum", **ingress): 0.14,
        # vLLM's label name for the finish reason
        key("vllm:request_success_total", finished_reason="stop", **ingress): 2,
        key("vllm:request_success_total", finished_reason="length", **ingress): 1,
        # each phase's replicas, the phase kept
        key("vllm:num_requests_running", deployment="PrefillServer:a", phase="prefill"): 0,
        key("vllm:num_requests_running", deployment="DecodeServer:a", phase="decode"): 4,
    }
    # ours unchanged beside them (model b's, the relayed outputs'), one HELP and TYPE each
    ours = _samples(page, "ray_")
    assert ours == _samples(merge([_node_page()], "chat"), "ray_") and len(ours) == 17
    types = sorted(line for line in page.splitlines() if line.startswith("# TYPE vllm:"))
    assert types == [
        "# TYPE vllm:num_requests_running gauge",
        "# TYPE vllm:request_success_total counter",
        f"# TYPE {ttft} histogram",
    ]


def test_each_model_of_a_multi_model_application_has_its_own_series():
    page = merge([_node_page()], "chat", by_deployment({":a": "model-a", ":b": "model-b"}))
    counts = {
        dict(labels)["model_name"]: value
        for (name, labels), value in _samples(page, "vllm:time_to_first_token").items()
        if name.endswith("_count")
    }
    assert counts == {"model-a": 3, "model-b": 1}
    b_sum = [v for (n, lb), v in _samples(page, "vllm:").items() if n.endswith("_sum")]
    assert sorted(b_sum) == [0.09, 0.14]


def test_no_model_no_vllm_series():
    """A page merged without a model map, or whose deployments are no model's, is ours alone."""
    assert "vllm:" not in merge([_node_page()], "chat")
    assert "vllm:" not in merge([_node_page()], "chat", by_deployment({"": "single"}))


def test_a_single_models_deployments_have_no_suffix():
    assert deployment_suffix("PrefillServer") == deployment_suffix("Ingress") == ""
    assert deployment_suffix("DecodeServer:smol-pd") == ":smol-pd"
    model_of = by_deployment({"": "smol"})
    assert model_of({"deployment": "ColocatedServer"}) == "smol"
    assert model_of({"deployment": "Ingress:x"}) is None


def test_every_alias_names_a_series_we_export_and_a_distinct_vllm_name():
    """A typo in an alias would leave its vLLM family silently empty."""
    source = Path(__file__).parents[1].joinpath("deployments/metrics.py").read_text()
    exported = set(re.findall(r'"(splitserve_[a-z0-9_]+)"', source))
    assert {a.ours for a in ALIASES} <= exported
    names = [a.name for a in ALIASES]
    assert len(set(names)) == len(names) and all(n.startswith("vllm:") for n in names)
    # a family in milliseconds is a latency histogram in seconds, as each of vLLM's is
    assert all(a.name.endswith("_seconds") == a.ms == a.ours.endswith("_ms") for a in ALIASES)


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
