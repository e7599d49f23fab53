"""vLLM's names for this application's series on GET /metrics, beside ours: a Grafana
dashboard, an alert or an autoscaler (KEDA, an HPA's adapter) written against vLLM's server
reads this one's series unchanged.

The replicas record each of our series that vLLM has under vLLM's name too, in its units and
with its `model_name` label (deployments/metrics.py, `Twin`), which Ray exports as
`ray_vllm_<name>`: Ray drops a name that holds vLLM's ':'. There Ray Serve LLM's Grafana
dashboard reads them (it charts its engines' `ray_vllm_*`); this page gives them vLLM's own
names. Only series whose meaning is vLLM's are named so. vLLM's inference time (scheduled ->
last token) spans two replicas' clocks in a disaggregated application: ours is the prefill
replica's prefill time, then first token -> last at the ingress. Our inter-token latency is
timed at the ingress, one observation per output it relays after a request's first, as
vLLM's is one per engine step (however many tokens it gave); with stream batching, one per
batch of steps.
Our histograms keep their own buckets, which `histogram_quantile` reads as it reads vLLM's.
"""

from __future__ import annotations

from prometheus_client.metrics_core import Metric

from deployments.metrics import VLLM_RAY_PREFIX

RAY_PREFIX = "ray_"  # what Ray's metrics agent puts before every application's metric name
VLLM_PREFIX = "vllm:"


def vllm_named(families: list[Metric]) -> list[Metric]:
    """The families, each recorded under vLLM's name (ray_vllm_x) named as vLLM names it
    (vllm:x)."""
    twins = RAY_PREFIX + VLLM_RAY_PREFIX
    out = []
    for family in families:
        if family.name.startswith(twins):
            name = VLLM_PREFIX + family.name.removeprefix(twins)
            renamed = Metric(name, family.documentation, family.type)
            renamed.samples = [
                s._replace(name=name + s.name.removeprefix(family.name)) for s in family.samples
            ]
            family = renamed
        out.append(family)
    return out
