"""Plan a deployment: search placements, print the best, write serve_config.yaml and a report.

    python -m placement plan --profile smollm2-cpu-1thread.yaml --workload 512:64 \\
        --ttft-slo 5000 --tpot-slo 150 --cluster 1x2 -o serve_config.planned.yaml
    python -m placement plan --device H100-80GB --model Llama-2-13b/config.json \\
        --cluster 4x8 --workload sharegpt --ttft-slo 400 --tpot-slo 100 --rate 20

`--profile` is a measured (placement profile) or roofline (placement analytic) profile;
`--device` builds the roofline profile on the fly. `--model` (a HF directory, its config.json,
or "default") gives the shape and the KV bytes per token for the transfer time; a "GPU" is
whatever one profile entry's unit is (a GPU, or a CPU replica).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import yaml
from tqdm import tqdm

from deployments.serve_env import controller_options, env_words, serve_env
from engine.config import DEFAULT_STEP_TIMEOUT_S
from placement.analytic import Efficiency
from placement.cli_args import (
    add_source_args,
    add_workload_args,
    cluster_from,
    is_hub_model,
    model_path,
    model_spec,
    profile_from,
    slo_from,
    workload_from,
)
from placement.frontend import FrontEnd, ServingCost, size_front_end
from placement.hardware import DEVICES
from placement.optimizer import Candidate, Search, meet_rate, optimize, table
from placement.simulator import SLO, InstanceSpec


def serve_config(
    best: Candidate,
    search: Search,
    base_args: dict | None = None,
    threads: int | None = None,
    autoscale: float | None = None,
    front: FrontEnd | None = None,
) -> dict:
    """A serve_config.yaml (as a dict) for `serve run` that deploys the chosen placement.

    A replica asks for 0.9 logical CPU per unit of its layout (a multi-worker replica: 0.1 for
    itself and 0.8 per worker bundle), so that the ingress (0.1) still fits when every unit of
    the cluster is used (Ray otherwise leaves one unscheduled).
    With `autoscale` (a factor > 1), each disaggregated phase scales between its planned count
    (what the target rate needs, from the per-replica goodput the search found) and that count
    times the factor, on its own latency target and its profile coefficients.
    With `front` (front_end_for), the ingress replicas and the decode (or colocated) replicas'
    stream batching it sized.
    On GPUs, each replica's KV cache holds what the plan counted on: every worker fills the
    roofline's share of its GPU (gpu_memory_utilization), what its weights leave of it.
    """
    p = best.placement
    on_gpu = str((base_args or {}).get("device", "cpu")).startswith("cuda")

    def phase(spec, name: str | None = None) -> dict:
        engine = {
            "tensor_parallel_size": spec.entry.tp,
            "pipeline_parallel_size": spec.entry.pp,
            "max_num_batched_tokens": spec.max_batch_tokens,
            "enable_prefix_caching": True,  # as the default serve_config.yaml
        }
        if threads:
            engine["num_threads"] = threads
        units = spec.entry.tp * spec.entry.pp
        if on_gpu:  # the KV cache the plan counted on: what weights leave of that share
            engine["gpu_memory_utilization"] = Efficiency().mem_util  # (analytic)
        out = {"num_replicas": spec.count, "num_cpus": 0.9, "engine": engine}
        if units > 1:  # the replica schedules; one placement-group bundle per model worker
            engine["worker_num_cpus"] = 0.8
            out["num_cpus"] = 0.1
            # a tensor-parallel group shares a node; pipeline stages may cross nodes
            out["placement_group_strategy"] = "STRICT_PACK" if spec.entry.pp == 1 else "PACK"
        if autoscale and name is not None:
            out["autoscaling"] = _autoscaling(spec, name, search.slo, autoscale)
        timeout = step_timeout_s(spec, name or "colocated")
        if timeout is not None:
            out["step_timeout_s"] = timeout
        return out

    args = dict(base_args or {})
    # the targets planned for: the ingress counts the requests that meet them, live
    args["slo"] = {"ttft_ms": search.slo.ttft_ms, "tpot_ms": search.slo.tpot_ms}
    if p.colocated is not None:
        args.update(mode="colocated", colocated=phase(p.colocated))
    else:
        args.update(
            mode="disaggregated",
            prefill=phase(p.prefill, "prefill"),
            decode=phase(p.decode, "decode"),
            kv_transport=_kv_transport(args.get("device", "cpu"), search.cluster.num_nodes),
        )
    if front is not None:
        args["ingress"] = {**args.get("ingress", {}), "num_replicas": front.ingress_replicas}
        if front.stream_interval_ms:
            streaming = "colocated" if p.colocated is not None else "decode"
            args[streaming]["stream_batching_interval_ms"] = front.stream_interval_ms
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": 8000},
        "controller_options": controller_options(),
        "applications": [
            {
                "name": "splitserve",
                "route_prefix": "/",
                "import_path": "app.builder:build_app",
                "args": args,
            }
        ],
    }


# the margin a planned step_timeout_s keeps over the longest step the profile predicts: a
# watchdog for hung steps, not a latency target (this host's pace drifts 2-3x over minutes)
STEP_TIMEOUT_MARGIN = 10.0


def longest_step_ms(spec: InstanceSpec, phase: str) -> float:
    """The profile's time for the longest step a replica of `phase` may run: a prefill of one
    prompt that fills the batch token budget, a decode batch of max_batch_size requests whose
    contexts fill the KV cache (colocated: the longer of the two)."""
    entry = spec.entry
    prefill = entry.prefill_ms([spec.max_batch_tokens])
    batch = max(1, spec.max_batch_size)
    decode = entry.decode_ms([entry.kv_capacity_tokens // batch] * batch)
    return {"prefill": prefill, "decode": decode}.get(phase, max(prefill, decode))


def step_timeout_s(spec: InstanceSpec, phase: str) -> float | None:
    """A step timeout for the plan's replicas when the default would be too short for a step
    the profile predicts (a large model on a slow host: its healthy replicas would be replaced
    again and again); None: the default is enough."""
    needed = math.ceil(STEP_TIMEOUT_MARGIN * longest_step_ms(spec, phase) / 1e3)
    return float(needed) if needed > DEFAULT_STEP_TIMEOUT_S else None


def front_end_for(
    chosen: Candidate, search: Search, rate: float | None = None, autoscale: float | None = None
) -> FrontEnd | None:
    """The front end for the rate the plan serves: `rate` (else the chosen placement's
    goodput), times the autoscaling factor where the phases may grow that far; tokens stream
    at the chosen placement's simulated p90 TPOT (a slower stream is more chunks), at most the
    target's. None when the placement meets the targets at no rate."""
    target = (rate or chosen.goodput_rps) * (autoscale or 1.0)
    if target <= 0:
        return None
    tpot = chosen.p90_tpot_ms
    if not (math.isfinite(tpot) and 0 < tpot < search.slo.tpot_ms):
        tpot = search.slo.tpot_ms
    output_lens = [r.output_len for r in search.workload.sample(1.0)]
    return size_front_end(target, output_lens, tpot, search.profile.serving)


def fit_to_front_end(
    candidates: list[Candidate], chosen: Candidate, search: Search, autoscale: float | None
) -> tuple[Candidate, FrontEnd | None]:
    """Where the chosen placement's engines serve more than one proxy carries, goodput stops at
    the proxy however many GPUs compute: the cheapest placement that reaches what the proxy
    carries (its usable rate) is planned instead, and the front end sized for that rate."""
    front = front_end_for(chosen, search, autoscale=autoscale)
    if front is None or not front.proxy_bound:
        return chosen, front
    rate = front.usable_rps / (autoscale or 1.0)  # grown by the factor, what the proxy takes
    try:
        cheaper = meet_rate(candidates, search, rate)
    except ValueError:  # nothing reaches it: the chosen one is the most the cluster does
        return chosen, front
    return cheaper, front_end_for(cheaper, search, rate, autoscale)


def _kv_transport(device: str, num_nodes: int) -> str:
    """One node: shared memory (CPU) or CUDA IPC (GPU, the same or a peer GPU); across nodes
    the decode replica pulls over NCCL (GPU) or the object store moves it (CPU)."""
    if device.startswith("cuda"):
        return "cuda_ipc" if num_nodes == 1 else "nccl"
    return "shm" if num_nodes == 1 else "object_store"


def _autoscaling(spec, phase: str, slo: SLO, factor: float) -> dict:
    coefficients = getattr(spec.entry, phase)
    target = (
        {"ttft_target_ms": slo.ttft_ms} if phase == "prefill" else {"tpot_target_ms": slo.tpot_ms}
    )
    return {
        "min_replicas": spec.count,
        "max_replicas": max(spec.count + 1, math.ceil(spec.count * factor)),
        **target,
        "latency": {"a": coefficients.a, "b": coefficients.b, "c": coefficients.c},
    }


def _served_model(given: str, path: Path) -> str:
    """What the written config's `model` says: a Hub id as given (each replica fetches it),
    else the directory `serve run` loads."""
    return given if is_hub_model(given) else str(_model_dir(path))


def _model_dir(model: str | Path) -> Path:
    """The directory `serve run` loads: --model may name the config.json inside it."""
    path = Path(model)
    return path.parent if path.name == "config.json" else path


def report(candidates: list[Candidate], search: Search) -> dict:
    best_colocated = next((c for c in candidates if c.kind == "colocated"), None)
    rows = [
        {
            "placement": c.describe(),
            "kind": c.kind,
            "gpus": c.num_gpus,
            "goodput_rps": c.goodput_rps,
            "per_gpu": c.per_gpu,
            "p90_ttft_ms": c.p90_ttft_ms,
            "p90_tpot_ms": c.p90_tpot_ms,
        }
        for c in candidates
    ]
    gain = None
    if best_colocated is not None and best_colocated.per_gpu > 0:
        gain = candidates[0].per_gpu / best_colocated.per_gpu
    return {
        "slo": vars(search.slo),
        "target": search.target,
        "cluster": vars(search.cluster),
        "best": rows[0],
        "gain_over_best_colocated": gain,
        "candidates": rows,
    }


def _plan_front_end(
    args: argparse.Namespace,
    candidates: list[Candidate],
    chosen: Candidate,
    search: Search,
    result: dict,
) -> tuple[Candidate, FrontEnd | None]:
    """The front end for the plan (and, without --rate, the placement fitted to it), said
    and added to the report."""
    if args.rate:
        front = front_end_for(chosen, search, args.rate, args.autoscale)
    else:
        engines_best = chosen
        chosen, front = fit_to_front_end(candidates, chosen, search, args.autoscale)
        if front is not None and front.rate_rps < engines_best.goodput_rps * (args.autoscale or 1):
            print(
                f"the engines of {engines_best.describe()} serve {engines_best.goodput_rps:.3g} "
                f"req/s, more than one Serve proxy carries ({front.usable_rps:.3g} within its "
                f"limit): planned {chosen.describe()} for {front.rate_rps:.3g} req/s"
            )
            result["chosen_for_front_end"] = {
                "rate": front.rate_rps,
                "placement": chosen.describe(),
            }
    if front is None:
        return chosen, None
    print(front.describe())
    result["front_end"] = {**dataclasses.asdict(front), "proxy_bound": front.proxy_bound}
    if front.proxy_bound:
        print(
            f"warning: at {front.rate_rps:.3g} req/s the node's one Serve proxy would be "
            f"busy {front.proxy_load:.0%} of its core(s) even joining tokens every "
            f"{front.stream_interval_ms} ms; it carries at most "
            f"{front.proxy_ceiling_rps:.3g} req/s of this workload, so serving more needs "
            "clients spread over more nodes' proxies (proxy_location EveryNode behind a "
            "load balancer)"
        )
    return chosen, front


def _serve_command(mode: str, out: str) -> str | None:
    """How to start Serve for the front end sized, as a comment line; None in Serve's default
    mode (a plain `serve run`). The profile's serving costs were measured in one mode: they
    hold only there."""
    if mode == "default":
        return None
    return (
        f"# sized for Ray Serve's {mode} mode, as its serving costs were measured: "
        f"{env_words(mode)} serve run {out}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_source_args(parser)
    add_workload_args(parser)
    parser.add_argument(
        "--rate", type=float, help="req/s to serve: the cheapest placement reaching it is written"
    )
    parser.add_argument("-o", "--out", default="serve_config.planned.yaml")
    parser.add_argument("--report", default=None, help="JSON report of every candidate")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per engine (CPU)")
    parser.add_argument(
        "--autoscale",
        type=float,
        default=None,
        help="let each phase scale from its planned replicas up to this factor times them",
    )
    args = parser.parse_args(argv)
    cluster = cluster_from(args)
    model = model_path(args)
    spec = model_spec(args)
    profile = profile_from(args, cluster)
    if not spec.runs_split:  # a plan `serve run` would refuse is no plan
        profile = dataclasses.replace(
            profile, entries=[e for e in profile.entries if e.tp == e.pp == 1]
        )
        print(f"{spec.model_type} runs on one worker per replica: tp x pp layouts left out")
        if not profile.entries:
            raise SystemExit(f"{args.model} fits no single-worker layout")
    with tqdm(desc="simulating placements", unit="placement") as bar:
        search = Search(
            profile=profile,
            workload=workload_from(args),
            slo=slo_from(args),
            target=args.attainment,
            cluster=cluster,
            kv_bytes_per_token=spec.kv_bytes_per_token,
            on_simulated=bar.update,
        )
        candidates = optimize(search)
        chosen = candidates[0]
        if args.rate:
            try:
                chosen = meet_rate(candidates, search, args.rate)
            except ValueError as e:
                raise SystemExit(str(e)) from None
    print(table(candidates))
    result = report(candidates, search)
    if result["gain_over_best_colocated"]:
        print(
            f"best per-GPU goodput is {result['gain_over_best_colocated']:.2f}x the best "
            "colocated placement"
        )
    if args.rate:
        print(f"for {args.rate} req/s: {chosen.describe()} ({chosen.goodput_rps:.2f} req/s)")
        result["chosen_for_rate"] = {"rate": args.rate, "placement": chosen.describe()}
    chosen, front = _plan_front_end(args, candidates, chosen, search, result)
    base = {} if args.model == "default" else {"model": _served_model(args.model, model)}
    if args.kv_cache_dtype != "auto":
        base["kv_cache_dtype"] = args.kv_cache_dtype
    # planned for GPUs (a device spec, or a profile built from one): serve on GPUs
    if args.device or search.profile.device.removesuffix(" (roofline)") in DEVICES:
        base.update(device="cuda", dtype=args.dtype)
    config = serve_config(
        chosen,
        search,
        base,
        threads=args.threads,
        autoscale=args.autoscale,
        front=front,
    )
    text = yaml.safe_dump(config, sort_keys=False)
    mode = (search.profile.serving or ServingCost()).serve_mode
    if front is not None and (start := _serve_command(mode, args.out)):
        print(start.removeprefix("# "))
        text = f"{start}\n{text}"
        result["serve_env"] = serve_env(mode)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")
    if args.report:
        Path(args.report).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
