"""Simulate one given placement under a workload: attainment and latency percentiles at each
rate, and the placement's goodput.

    python -m placement simulate --profile smollm2-cpu-1thread.yaml --prefill 1x1:1 \\
        --decode 1x1:1 --workload 512:64 --ttft-slo 9288 --tpot-slo 143 --cluster 1x2 \\
        --rates 0.2 0.4 0.6
    python -m placement simulate --device H100-80GB --model Llama-2-13b/config.json \\
        --colocated 2x1:4 --chunked-prefill --workload sharegpt --ttft-slo 400 --tpot-slo 100

An instance is TPxPP:COUNT (the profile's entry for that layout, COUNT replicas). KV moves over
the intra-node link when the placement fits on one node, else over the inter-node link. The
profile's node contention applies (CPU profiles) unless --node-contention says otherwise, and
so does its step wander (a profile fitted to served steps): each rate is then the mean of
several simulations, one per draw of the wander, and beside it the range of attainment that
90% of single runs reach (each its own draw of the wander and of the machine's pace): what one
measured run of that many requests may show. Shared prompt prefixes (`--prefix-len P
--num-prefixes K`) are taken from each prefill or colocated instance's prefix cache once it has
computed them, and go to the instance that was sent their prefix before, as the server's
prefix-aware router does (`--no-prefix-caching`: every prompt computed whole;
`--no-prefix-affinity`: routed by load alone).
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import replace

import numpy as np

from placement.cli_args import (
    add_source_args,
    add_workload_args,
    cluster_from,
    model_spec,
    profile_from,
    slo_from,
    workload_from,
)
from placement.latency_model import Profile
from placement.optimizer import Cluster, transfer_ms_per_token
from placement.simulator import (
    PREFIX_AFFINITY,
    SLO,
    InstanceSpec,
    Placement,
    attainment,
    attainment_band,
    goodput,
    simulate_draws,
)
from placement.workload import Workload


def parse_instance(text: str) -> tuple[int, int, int]:
    """'2x1:3' -> (tp 2, pp 1, 3 replicas); the count defaults to 1."""
    match = re.fullmatch(r"(\d+)x(\d+)(?::(\d+))?", text)
    if match is None or int(match[1]) < 1 or int(match[2]) < 1 or (match[3] and int(match[3]) < 1):
        raise ValueError(f"instance {text!r}: expected TPxPP:COUNT, e.g. 1x1:2")
    return int(match[1]), int(match[2]), int(match[3] or 1)


def placement_from(
    args: argparse.Namespace, profile: Profile, cluster: Cluster, kv_bytes_per_token: int
) -> Placement:
    def spec(text: str, chunked: bool = False) -> InstanceSpec:
        tp, pp, count = parse_instance(text)
        try:
            entry = profile.entry(tp, pp)
        except KeyError as e:
            raise ValueError(str(e)) from None
        return InstanceSpec(
            entry,
            count,
            args.max_batch_tokens,
            args.max_batch_size,
            chunked,
            prefix_caching=not args.no_prefix_caching,
            prefix_affinity=None if args.no_prefix_affinity else PREFIX_AFFINITY,
        )

    contention = profile.node_contention
    if args.node_contention is not None:
        contention = args.node_contention
    if args.colocated:
        if args.prefill or args.decode:
            raise ValueError("give --colocated, or --prefill and --decode, not both")
        placement = Placement(colocated=spec(args.colocated, args.chunked_prefill))
    elif args.prefill and args.decode:
        placement = Placement(prefill=spec(args.prefill), decode=spec(args.decode))
    else:
        raise ValueError("give --prefill and --decode (disaggregated), or --colocated")
    used = placement.num_gpus
    if used > cluster.num_gpus:
        raise ValueError(f"the placement uses {used} GPUs, the cluster has {cluster.num_gpus}")
    one_node = used <= cluster.gpus_per_node
    gbs = cluster.intra_node_gbs if one_node else cluster.inter_node_gbs
    return replace(
        placement,
        kv_transfer_ms_per_token=transfer_ms_per_token(kv_bytes_per_token, gbs),
        node_contention=contention,
        wander=profile.step_wander,
    )


def rate_rows(
    placement: Placement, workload: Workload, slo: SLO, rates: list[float], seed: int = 0
) -> list[dict]:
    """Per rate: joint attainment and P50 / P90 TTFT and TPOT (ms) of the simulated requests."""
    rows = []
    for rate in rates:
        requests = workload.sample(rate, seed)
        results = simulate_draws(placement, requests, seed)
        ttft = [r.ttft_ms for r in results]
        tpot = [r.tpot_ms for r in results if math.isfinite(r.tpot_ms)] or [0.0]
        rows.append({
            "rate": rate, "attainment": attainment(results, slo),
            "p50_ttft_ms": float(np.percentile(ttft, 50)),
            "p90_ttft_ms": float(np.percentile(ttft, 90)),
            "p50_tpot_ms": float(np.percentile(tpot, 50)),
            "p90_tpot_ms": float(np.percentile(tpot, 90)),
        })  # fmt: skip
        if placement.wander is not None:  # one run of these requests may measure any of this
            rows[-1]["attainment_band"] = attainment_band(placement, requests, slo)
    return rows


def rate_table(rows: list[dict]) -> str:
    """Markdown; with a column for the band of runs where the steps wander."""
    banded = any("attainment_band" in r for r in rows)
    lines = [
        "| rate req/s | attainment | "
        + ("90% of runs | " if banded else "")
        + "P50 TTFT ms | P90 TTFT ms | P50 TPOT ms | P90 TPOT ms |",
        "|---" * (7 if banded else 6) + "|",
    ]
    for r in rows:
        band = "-".join(f"{x:.3f}" for x in r["attainment_band"]) if banded else None
        lines.append(
            f"| {r['rate']:g} | {r['attainment']:.3f} | "
            + (f"{band} | " if banded else "")
            + f"{r['p50_ttft_ms']:.0f} | {r['p90_ttft_ms']:.0f} | {r['p50_tpot_ms']:.1f} | "
            f"{r['p90_tpot_ms']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_source_args(parser)
    add_workload_args(parser)
    parser.add_argument("--prefill", help="TPxPP:COUNT prefill instances")
    parser.add_argument("--decode", help="TPxPP:COUNT decode instances")
    parser.add_argument("--colocated", help="TPxPP:COUNT colocated instances")
    parser.add_argument("--chunked-prefill", action="store_true", help="colocated, Sarathi-style")
    parser.add_argument("--max-batch-tokens", type=int, default=2048)
    parser.add_argument("--max-batch-size", type=int, default=128)
    parser.add_argument(
        "--no-prefix-caching", action="store_true", help="prefill every prompt whole (default: "
        "cached shared prefixes, as serve_config.yaml)",
    )  # fmt: skip
    parser.add_argument(
        "--no-prefix-affinity", action="store_true", help="route prompts by load alone "
        "(default: to the instance sent their prefix before, as the server's router)",
    )  # fmt: skip
    parser.add_argument("--node-contention", type=float, help="default: the profile's")
    parser.add_argument("--rates", type=float, nargs="*", default=[], help="req/s to report")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cluster = cluster_from(args)
    profile = profile_from(args, cluster)
    kv_bytes = model_spec(args).kv_bytes_per_token
    try:
        placement = placement_from(args, profile, cluster, kv_bytes)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    workload, slo = workload_from(args), slo_from(args)
    if args.rates:
        print(rate_table(rate_rows(placement, workload, slo, args.rates, args.seed)))
    found = goodput(placement, workload, slo, args.attainment, args.seed)
    print(
        f"goodput: {found.rate:.3f} req/s ({found.rate / placement.num_gpus:.3f} per GPU) at "
        f"attainment >= {args.attainment} of TTFT <= {slo.ttft_ms:g} ms and TPOT <= "
        f"{slo.tpot_ms:g} ms"
    )


if __name__ == "__main__":
    main()
