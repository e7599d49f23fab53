"""vLLM's names for this application's series on GET /metrics, beside ours: a Grafana
dashboard, an alert or an autoscaler (KEDA, an HPA's adapter) written against vLLM's server
reads this one's series unchanged.

Each vLLM family is one of ours renamed (as Ray exports it: `ray_` in front), in vLLM's units
(our milliseconds are seconds there: bucket bounds and sums divided by 1000), with vLLM's label
names and its `model_name` label (the served name of the model whose deployment exported the
sample) added to ours (application, deployment, replica, and `phase` or `mode`: a
disaggregated application's running requests are its prefill and its decode replicas').
Only families whose meaning is vLLM's are named so: vLLM's `request_inference_time_seconds`
(scheduled -> last token: two replicas' clocks in a disaggregated application) has no
counterpart here. Our inter-token latency is timed at the ingress, one observation per output
it relays after a request's first, as vLLM's is one per engine step (however many tokens the
step gave); with stream batching, one per batch of steps. Our histograms keep their own
buckets, which `histogram_quantile` reads as it reads vLLM's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from app.config import deployment_suffix

RAY_PREFIX = "ray_"  # what Ray's metrics agent puts before every application's metric name
ModelOf = Callable[[dict[str, str]], str | None]  # a sample's labels -> its model's name


@dataclass(frozen=True)
class Alias:
    """One of our families under vLLM's name."""

    ours: str  # as deployments/metrics.py names it
    name: str  # vLLM's
    ms: bool = False  # ours in milliseconds, vLLM's in seconds
    labels: tuple[tuple[str, str], ...] = ()  # (ours, vLLM's) label names

    def sample(self, family: Metric, sample: Sample, model: str) -> Sample:
        """`sample` of our `family` as vLLM's family's."""
        suffix = sample.name.removeprefix(family.name)  # _bucket, _sum, _count, _total or ""
        labels = {dict(self.labels).get(k, k): v for k, v in sample.labels.items()}
        labels["model_name"] = model
        value = sample.value
        if self.ms and suffix == "_sum":
            value /= 1000
        if self.ms and "le" in labels and labels["le"] != "+Inf":
            labels["le"] = floatToGoString(float(labels["le"]) / 1000)
        return sample._replace(name=self.name + suffix, labels=labels, value=value)


ALIASES = (
    Alias("splitserve_ttft_ms", "vllm:time_to_first_token_seconds", ms=True),
    Alias("splitserve_tpot_ms", "vllm:request_time_per_output_token_seconds", ms=True),
    Alias("splitserve_inter_token_latency_ms", "vllm:inter_token_latency_seconds", ms=True),
    Alias("splitserve_e2e_latency_ms", "vllm:e2e_request_latency_seconds", ms=True),
    Alias("splitserve_queue_time_ms", "vllm:request_queue_time_seconds", ms=True),
    Alias("splitserve_prefill_time_ms", "vllm:request_prefill_time_seconds", ms=True),
    Alias("splitserve_decode_time_ms", "vllm:request_decode_time_seconds", ms=True),
    Alias("splitserve_requests", "vllm:request_success", labels=(("finish", "finished_reason"),)),
    Alias("splitserve_prompt_tokens", "vllm:prompt_tokens"),
    Alias("splitserve_generation_tokens", "vllm:generation_tokens"),
    Alias("splitserve_request_prompt_tokens", "vllm:request_prompt_tokens"),
    Alias("splitserve_request_generation_tokens", "vllm:request_generation_tokens"),
    Alias("splitserve_step_tokens", "vllm:iteration_tokens_total"),
    Alias("splitserve_kv_cache_config", "vllm:cache_config_info"),
    Alias("splitserve_running_requests", "vllm:num_requests_running"),
    Alias("splitserve_queued_requests", "vllm:num_requests_waiting"),
    Alias("splitserve_kv_block_usage", "vllm:kv_cache_usage_perc"),
    Alias("splitserve_preemptions", "vllm:num_preemptions"),
    Alias("splitserve_prefix_cache_queried_tokens", "vllm:prefix_cache_queries"),
    Alias("splitserve_prefix_cache_hit_tokens", "vllm:prefix_cache_hits"),
    Alias("splitserve_spec_decode_drafts", "vllm:spec_decode_num_drafts"),
    Alias("splitserve_spec_decode_draft_tokens", "vllm:spec_decode_num_draft_tokens"),
    Alias("splitserve_spec_decode_accepted_tokens", "vllm:spec_decode_num_accepted_tokens"),
    Alias(
        "splitserve_spec_decode_accepted_tokens_per_pos",
        "vllm:spec_decode_num_accepted_tokens_per_pos",
    ),
)


def vllm_families(families: Iterable[Metric], model_of: ModelOf) -> list[Metric]:
    """vLLM's families of the `families` that have one; `model_of` names the model of a
    sample's labels (None: the sample is left out)."""
    ours = {f.name: f for f in families}
    renamed = []
    for alias in ALIASES:
        family = ours.get(RAY_PREFIX + alias.ours)
        if family is None:
            continue
        unit = ", in seconds" if alias.ms else ""
        theirs = Metric(alias.name, f"{family.documentation} ({alias.ours}{unit})", family.type)
        for sample in family.samples:
            model = model_of(sample.labels)
            if model is not None:
                theirs.samples.append(alias.sample(family, sample, model))
        if theirs.samples:
            renamed.append(theirs)
    return renamed


def by_deployment(models: dict[str, str]) -> ModelOf:
    """A sample's labels -> the served name of the model its deployment serves, from
    `models` (a deployment suffix, app.config.deployment_suffix -> a served name); None for
    another model's deployment."""

    def model_of(labels: dict[str, str]) -> str | None:
        return models.get(deployment_suffix(labels.get("deployment", "")))

    return model_of
