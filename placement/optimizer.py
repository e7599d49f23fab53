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
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from placement.latency_model import Coefficients, Entry, Profile
from placement.simulator import (
    PREFIX_AFFINITY,
    SLO,
    InstanceSpec,
    Placement,
    goodput,
    simulate_draws,
)
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


def transfer_ms_per_token(kv_bytes_per_token: int, gbs: float) -> float:
    """KV transfer time per prompt token over a link of `gbs` GB/s."""
    return kv_bytes_per_token / (gbs * 1e9) * 1e3


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
    on_simulated: Callable[[], None] | None = field(default=None, compare=False)  # progress

    def goodput_of(self, placement: Placement):
        found = goodput(placement, self.workload, self.slo, self.target, self.seed)
        if self.on_simulated is not None:
            self.on_simulated()
        return found

    def transfer_ms_per_token(self, gbs: float) -> float:
        return transfer_ms_per_token(self.kv_bytes_per_token, gbs)

    def spec(self, entry: Entry, count: int = 1) -> InstanceSpec:
        # prefix caching and prefix-aware routing on, as in the serve_config.yaml plan.py writes
        return InstanceSpec(
            entry,
            count,
            self.max_batch_tokens,
            prefix_caching=True,
            prefix_affinity=PREFIX_AFFINITY,
        )

    def on_node(self, placement: Placement) -> Placement:
        """With the profile's node contention and step wander (CPU profiles: the instances
        share a machine)."""
        p = self.profile
        return replace(placement, node_contention=p.node_contention, wander=p.step_wander)

    def evaluate(self, kind: str, placement: Placement) -> Candidate:
        placement = self.on_node(placement)
        found = self.goodput_of(placement)
        rate = max(found.rate, 1e-9)
        results = simulate_draws(placement, self.workload.sample(rate, self.seed), self.seed)
        ttft = float(np.percentile([r.ttft_ms for r in results], 90))
        tpot = float(np.percentile([r.tpot_ms for r in results], 90))
        return Candidate(kind, placement, found.rate, ttft, tpot)


def _fits(entry: Entry, cluster: Cluster) -> bool:
    """One instance of this layout fits: its TP group inside a node, all of it in the cluster."""
    return entry.tp <= cluster.gpus_per_node and entry.tp * entry.pp <= cluster.num_gpus


def _ranked_phase(search: Search, phase: str) -> list[Entry]:
    """The layouts that fit, best goodput per GPU first, for one phase, the other idealized."""
    scored = []
    for entry in search.profile.entries:
        if not _fits(entry, search.cluster):
            continue
        if phase == "prefill":
            p = Placement(prefill=search.spec(entry), decode=search.spec(_IDEAL))
        else:
            p = Placement(prefill=search.spec(_IDEAL), decode=search.spec(entry))
        rate = search.goodput_of(search.on_node(p)).rate
        scored.append((-rate / (entry.tp * entry.pp), entry.tp * entry.pp, len(scored), entry))
    return [entry for *_, entry in sorted(scored)]


def _best_pair(search: Search) -> tuple[Entry, Entry] | None:
    """The best prefill and the best decode layout; when one instance of each does not fit the
    cluster together, the pair of best ranks (lowest rank sum) that does."""
    prefills, decodes = _ranked_phase(search, "prefill"), _ranked_phase(search, "decode")
    pairs = sorted(
        ((i + j, i, p, d) for i, p in enumerate(prefills) for j, d in enumerate(decodes)),
        key=lambda x: x[:2],
    )
    for *_, p, d in pairs:
        if p.tp * p.pp + d.tp * d.pp <= search.cluster.num_gpus:
            return p, d
    return None


def high_affinity(search: Search) -> list[Candidate]:
    pair = _best_pair(search)
    if pair is None:
        return []
    prefill, decode = pair
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
            if pp_d != pp or _segment_slots(tp_p + tp_d, search.cluster) < pp:
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
    p = best.placement
    segment = p.prefill.entry.tp + p.decode.entry.tp
    n = min(search.max_replicas, _segment_slots(segment, search.cluster) // p.prefill.entry.pp)
    replicated = Placement(
        prefill=search.spec(p.prefill.entry, n),
        decode=search.spec(p.decode.entry, n),
        kv_transfer_ms_per_token=transfer,
    )
    return pairs + ([search.evaluate("disaggregated-paired", replicated)] if n > 1 else [])


def _segment_slots(segment_gpus: int, cluster: Cluster) -> int:
    """How many stage segments (a prefill part and a decode part of one pipeline stage, which
    share a node) the cluster holds: a pair of pp stages needs pp of them."""
    return (cluster.gpus_per_node // segment_gpus) * cluster.num_nodes


def colocated(search: Search) -> list[Candidate]:
    out = []
    for entry in search.profile.entries:
        if not _fits(entry, search.cluster):
            continue
        n = min(search.max_replicas, search.cluster.num_gpus // (entry.tp * entry.pp))
        for count in sorted({1, n}):
            out.append(search.evaluate("colocated", Placement(colocated=search.spec(entry, count))))
    return out


def optimize(search: Search) -> list[Candidate]:
    """All evaluated candidates, best goodput per GPU first."""
    found = high_affinity(search) + low_affinity(search) + colocated(search)
    return sorted(found, key=lambda c: (-c.per_gpu, c.num_gpus))


def meet_rate(candidates: list[Candidate], search: Search, rate: float) -> Candidate:
    """The cheapest placement that serves `rate` req/s within the SLOs: the fewest GPUs among
    the candidates that reach it, else the best per-GPU candidate replicated k times (the
    reference's replication to the target rate; k from its goodput, raised until the
    simulation agrees). Raises ValueError when the cluster is too small."""
    reaching = [c for c in candidates if c.goodput_rps >= rate]
    if reaching:
        return min(reaching, key=lambda c: (c.num_gpus, -c.goodput_rps))
    best = candidates[0]
    k = max(2, math.ceil(rate / max(best.goodput_rps, 1e-9)))
    while True:
        scaled = _replicated(best.placement, k)
        if scaled.num_gpus > search.cluster.num_gpus:
            raise ValueError(
                f"{rate} req/s needs more than {search.cluster.num_gpus} GPUs: {k} x "
                f"({best.describe()}) would use {scaled.num_gpus}"
            )
        found = search.evaluate(best.kind, scaled)
        if found.goodput_rps >= rate:
            return found
        k += 1


def _replicated(p: Placement, k: int) -> Placement:
    def times(spec: InstanceSpec | None) -> InstanceSpec | None:
        return None if spec is None else replace(spec, count=spec.count * k)

    return replace(
        p, prefill=times(p.prefill), decode=times(p.decode), colocated=times(p.colocated)
    )


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
