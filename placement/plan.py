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
from pathlib import Path

import yaml

from placement.hardware import ModelSpec
from placement.latency_model import Profile
from placement.optimizer import Candidate, Cluster, Search, optimize, table
from placement.simulator import SLO
from placement.workload import Workload


def serve_config(
    best: Candidate, search: Search, base_args: dict | None = None, threads: int | None = None
) -> dict:
    """A serve_config.yaml (as a dict) for `serve run` that deploys the chosen placement.

    Each replica asks for 0.9 logical CPU per unit of its layout, so that the ingress (0.1)
    still fits when every unit of the cluster is used (Ray otherwise leaves one unscheduled).
    """
    p = best.placement

    def phase(spec) -> dict:
        engine = {
            "tensor_parallel_size": spec.entry.tp,
            "pipeline_parallel_size": spec.entry.pp,
            "max_num_batched_tokens": spec.max_batch_tokens,
        }
        if threads:
            engine["num_threads"] = threads
        units = spec.entry.tp * spec.entry.pp
        return {"num_replicas": spec.count, "num_cpus": round(0.9 * units, 2), "engine": engine}

    args = dict(base_args or {})
    if p.colocated is not None:
        args.update(mode="colocated", colocated=phase(p.colocated))
    else:
        args.update(
            mode="disaggregated",
            prefill=phase(p.prefill),
            decode=phase(p.decode),
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
    args = parser.parse_args(argv)
    model = args.model
    if model == "default":
        from engine.model_store import resolve_model

        model = resolve_model(None)
    search = Search(
        profile=Profile.load(args.profile),
        workload=Workload(args.num_requests, args.input_len, args.output_len, cv=args.cv),
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
    config = serve_config(candidates[0], search, threads=args.threads)
    Path(args.out).write_text(yaml.safe_dump(config, sort_keys=False))
    print(f"wrote {args.out}")
    if args.report:
        Path(args.report).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
