"""Goodput-optimal placement: both algorithms of the reference, plus colocation for comparison.

High node-affinity (fast links between nodes): find the prefill layout with the best goodput per
GPU (decode idealized away) and the decode layout likewise (prefill idealized away), then try
replica ratios n_p : n_d within the cluster and keep the best per-GPU goodput of the whole
placement, simulated (this is where 2P1D-like ratios come from).
Low node-affinity (fast links only inside a node): prefill and decode segments of one pipeline
stage share a node, so both use the same pp and tp_p + tp_d <= GPUs per node; such pairs are
searched jointly, with KV moving over the intra-node link, then replicated.
Colocated: one instance runs both phases (the vLLM-style baseline), replicated.
A profile's `node_contention` (CPU profiles) is applied to every candidate as if all its
instances shared one machine: right for planning the machine that was profiled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from placement.latency_model import Coefficients, Entry, Profile
from placement.simulator import SLO, InstanceSpec, Placement, goodput, simulate
from placement.workload import Workload

_IDEAL = Entry(1, 1, Coefficients(0, 0, 0), Coefficients(0, 0, 0), 10**12)


@dataclass(frozen=True)
class Cluster:
    num_nodes: int = 1
    gpus_per_node: int = 8
    intra_node_gbs: float = 300.0
    inter_node_gbs: float = 25.0

    @property
    def num_gpus(self) -> int:
        return self.num_nodes * self.gpus_per_node


@dataclass(frozen=True)
class Candidate:
    kind: str  # "disaggregated" (high affinity), "disaggregated-paired" (low), "colocated"
    placement: Placement
    goodput_rps: float
    p90_ttft_ms: float
    p90_tpot_ms: float

    @property
    def num_gpus(self) -> int:
        return self.placement.num_gpus

    @property
    def per_gpu(self) -> float:
        return self.goodput_rps / self.num_gpus

    def describe(self) -> str:
        p = self.placement

        def part(tag: str, s: InstanceSpec) -> str:
            return f"{s.count}{tag}(tp{s.entry.tp}xpp{s.entry.pp})"

        if p.colocated is not None:
            return part("C", p.colocated)
        return f"{part('P', p.prefill)} + {part('D', p.decode)}"


@dataclass(frozen=True)
class Search:
    profile: Profile
    workload: Workload
    slo: SLO
    cluster: Cluster
    kv_bytes_per_token: int
    target: float = 0.9
    max_batch_tokens: int = 2048
    max_replicas: int = 8
    seed: int = 0

    def transfer_ms_per_token(self, gbs: float) -> float:
        return self.kv_bytes_per_token / (gbs * 1e9) * 1e3

    def spec(self, entry: Entry, count: int = 1) -> InstanceSpec:
        return InstanceSpec(entry, count, max_batch_tokens=self.max_batch_tokens)

    def on_node(self, placement: Placement) -> Placement:
        """With the profile's node contention (CPU profiles: the instances share a machine)."""
        return replace(placement, node_contention=self.profile.node_contention)

    def evaluate(self, kind: str, placement: Placement) -> Candidate:
        placement = self.on_node(placement)
        found = goodput(placement, self.workload, self.slo, self.target, self.seed)
        rate = max(found.rate, 1e-9)
        results = simulate(placement, self.workload.sample(rate, self.seed))
        ttft = float(np.percentile([r.ttft_ms for r in results], 90))
        tpot = float(np.percentile([r.tpot_ms for r in results], 90))
        return Candidate(kind, placement, found.rate, ttft, tpot)


def _best_phase(search: Search, phase: str) -> tuple[Entry, float]:
    """The layout with the best goodput per GPU for one phase, the other phase idealized."""
    best, best_per_gpu = None, -1.0
    for entry in search.profile.entries:
        if phase == "prefill":
            p = Placement(prefill=search.spec(entry), decode=search.spec(_IDEAL))
        else:
            p = Placement(prefill=search.spec(_IDEAL), decode=search.spec(entry))
        found = goodput(search.on_node(p), search.workload, search.slo, search.target, search.seed)
        rate = found.rate
        per_gpu = rate / (entry.tp * entry.pp)
        if per_gpu > best_per_gpu:
            best, best_per_gpu = entry, per_gpu
    return best, best_per_gpu


def high_affinity(search: Search) -> list[Candidate]:
    prefill, _ = _best_phase(search, "prefill")
    decode, _ = _best_phase(search, "decode")
    gp, gd = prefill.tp * prefill.pp, decode.tp * decode.pp
    transfer = search.transfer_ms_per_token(search.cluster.inter_node_gbs)
    out = []
    for n_p in range(1, search.max_replicas + 1):
        for n_d in range(1, search.max_replicas + 1):
            if n_p * gp + n_d * gd > search.cluster.num_gpus:
                continue
            placement = Placement(
                prefill=search.spec(prefill, n_p),
                decode=search.spec(decode, n_d),
                kv_transfer_ms_per_token=transfer,
            )
            out.append(search.evaluate("disaggregated", placement))
    return out


def low_affinity(search: Search) -> list[Candidate]:
    by_layout = {(e.tp, e.pp): e for e in search.profile.entries}
    transfer = search.transfer_ms_per_token(search.cluster.intra_node_gbs)
    pairs = []
    for (tp_p, pp), prefill in by_layout.items():
        for (tp_d, pp_d), decode in by_layout.items():
            if pp_d != pp or tp_p + tp_d > search.cluster.gpus_per_node:
                continue
            pair = Placement(
                prefill=search.spec(prefill),
                decode=search.spec(decode),
                kv_transfer_ms_per_token=transfer,
            )
            pairs.append(search.evaluate("disaggregated-paired", pair))
    if not pairs:
        return []
    best = max(pairs, key=lambda c: c.per_gpu)
    n = min(search.max_replicas, search.cluster.num_gpus // best.num_gpus)
    p = best.placement
    replicated = Placement(
        prefill=search.spec(p.prefill.entry, n),
        decode=search.spec(p.decode.entry, n),
        kv_transfer_ms_per_token=transfer,
    )
    return pairs + ([search.evaluate("disaggregated-paired", replicated)] if n > 1 else [])


def colocated(search: Search) -> list[Candidate]:
    out = []
    for entry in search.profile.entries:
        n = min(search.max_replicas, search.cluster.num_gpus // (entry.tp * entry.pp))
        for count in sorted({1, n}):
            if count >= 1:
                out.append(
                    search.evaluate("colocated", Placement(colocated=search.spec(entry, count)))
                )
    return out


def optimize(search: Search) -> list[Candidate]:
    """All evaluated candidates, best goodput per GPU first."""
    found = high_affinity(search) + low_affinity(search) + colocated(search)
    return sorted(found, key=lambda c: (-c.per_gpu, c.num_gpus))


def table(candidates: list[Candidate], top: int = 10) -> str:
    rows = [
        "| rank | placement | kind | GPUs | goodput req/s | per GPU | P90 TTFT ms | P90 TPOT ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, c in enumerate(candidates[:top], 1):
        rows.append(
            f"| {i} | {c.describe()} | {c.kind} | {c.num_gpus} | {c.goodput_rps:.2f} | "
            f"{c.per_gpu:.3f} | {c.p90_ttft_ms:.0f} | {_fmt(c.p90_tpot_ms)} |"
        )
    return "\n".join(rows)


def _fmt(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.1f}"
