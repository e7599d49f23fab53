"""Plan a deployment: search placements, print the best, write serve_config.yaml and a report.

    python -m placement.plan --profile smollm2-cpu-1thread.yaml --model default \\
        --input-len 512 --output-len 64 --ttft-ms 5000 --tpot-ms 150 \\
        --nodes 1 --gpus-per-node 2 --out serve_config.planned.yaml --report plan.json

`--profile` is a measured (placement.profiler) or roofline (placement.analytic) profile;
`--model` (a HF directory, its config.json, or "default") gives the KV bytes per token for the
transfer time; a "GPU" is whatever one profile entry's unit is (a GPU, or a CPU replica).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import yaml

from placement.hardware import ModelSpec
from placement.latency_model import Profile
from placement.optimizer import Candidate, Cluster, Search, optimize, table
from placement.simulator import SLO
from placement.workload import Workload


def serve_config(
    best: Candidate,
    search: Search,
    base_args: dict | None = None,
    threads: int | None = None,
    autoscale: float | None = None,
) -> dict:
    """A serve_config.yaml (as a dict) for `serve run` that deploys the chosen placement.

    A replica asks for 0.9 logical CPU per unit of its layout (a multi-worker replica: 0.1 for
    itself and 0.8 per worker bundle), so that the ingress (0.1) still fits when every unit of
    the cluster is used (Ray otherwise leaves one unscheduled).
    With `autoscale` (a factor > 1), each disaggregated phase scales between its planned count
    (what the target rate needs, from the per-replica goodput the search found) and that count
    times the factor, on its own latency target and its profile coefficients.
    """
    p = best.placement

    def phase(spec, name: str | None = None) -> dict:
        engine = {
            "tensor_parallel_size": spec.entry.tp,
            "pipeline_parallel_size": spec.entry.pp,
            "max_num_batched_tokens": spec.max_batch_tokens,
        }
        if threads:
            engine["num_threads"] = threads
        units = spec.entry.tp * spec.entry.pp
        out = {"num_replicas": spec.count, "num_cpus": 0.9, "engine": engine}
        if units > 1:  # the replica schedules; one placement-group bundle per model worker
            engine["worker_num_cpus"] = 0.8
            out["num_cpus"] = 0.1
            # a tensor-parallel group shares a node; pipeline stages may cross nodes
            out["placement_group_strategy"] = "STRICT_PACK" if spec.entry.pp == 1 else "PACK"
        if autoscale and name is not None:
            out["autoscaling"] = _autoscaling(spec, name, search.slo, autoscale)
        return out

    args = dict(base_args or {})
    if p.colocated is not None:
        args.update(mode="colocated", colocated=phase(p.colocated))
    else:
        args.update(
            mode="disaggregated",
            prefill=phase(p.prefill, "prefill"),
            decode=phase(p.decode, "decode"),
            kv_transport="shm" if search.cluster.num_nodes == 1 else "object_store",
        )
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": 8000},
        "applications": [
            {
                "name": "splitserve",
                "route_prefix": "/",
                "import_path": "app.builder:build_app",
                "args": args,
            }
        ],
    }


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


def _workload(args: argparse.Namespace) -> Workload:
    lengths = None
    if args.dataset:
        from transformers import AutoTokenizer

        from bench.datasets import LengthFilter, load
        from engine.model_store import resolve_model

        tokenizer = AutoTokenizer.from_pretrained(str(resolve_model(None)))
        items = load(
            args.dataset,
            lambda text: tokenizer.encode(text, add_special_tokens=False),
            2000,
            LengthFilter(max_input=args.max_input_len, max_output=args.max_output_len),
        )
        lengths = tuple((i.input_len, i.output_len) for i in items)
    return Workload(args.num_requests, args.input_len, args.output_len, cv=args.cv, dataset=lengths)


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", required=True)
    parser.add_argument("--model", default="default", help="HF dir, config.json or 'default'")
    parser.add_argument("--dtype", default="bfloat16", help="KV dtype for transfer sizes")
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument(
        "--dataset",
        choices=("sharegpt", "humaneval", "docsum"),
        help="lengths sampled from a workload dataset (bench/datasets.py) instead of fixed ones",
    )
    parser.add_argument("--max-input-len", type=int, default=1024, help="dataset filter")
    parser.add_argument("--max-output-len", type=int, default=512, help="dataset cap")
    parser.add_argument("--num-requests", type=int, default=300)
    parser.add_argument("--cv", type=float, default=1.0)
    parser.add_argument("--ttft-ms", type=float, required=True)
    parser.add_argument("--tpot-ms", type=float, required=True)
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--intra-node-gbs", type=float, default=300.0)
    parser.add_argument("--inter-node-gbs", type=float, default=25.0)
    parser.add_argument("--out", default="serve_config.planned.yaml")
    parser.add_argument("--report", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per engine (CPU)")
    parser.add_argument(
        "--autoscale",
        type=float,
        default=None,
        help="let each phase scale from its planned replicas up to this factor times them",
    )
    args = parser.parse_args(argv)
    model = args.model
    if model == "default":
        from engine.model_store import resolve_model

        model = resolve_model(None)
    search = Search(
        profile=Profile.load(args.profile),
        workload=_workload(args),
        slo=SLO(args.ttft_ms, args.tpot_ms),
        target=args.target,
        cluster=Cluster(args.nodes, args.gpus_per_node, args.intra_node_gbs, args.inter_node_gbs),
        kv_bytes_per_token=ModelSpec.from_config(model, args.dtype).kv_bytes_per_token,
    )
    candidates = optimize(search)
    print(table(candidates))
    result = report(candidates, search)
    if result["gain_over_best_colocated"]:
        print(
            f"best per-GPU goodput is {result['gain_over_best_colocated']:.2f}x the best "
            "colocated placement"
        )
    base = {} if args.model == "default" else {"model": str(_model_dir(model))}
    config = serve_config(
        candidates[0], search, base, threads=args.threads, autoscale=args.autoscale
    )
    Path(args.out).write_text(yaml.safe_dump(config, sort_keys=False))
    print(f"wrote {args.out}")
    if args.report:
        Path(args.report).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
