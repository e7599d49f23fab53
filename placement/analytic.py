"""Latency-model coefficients from a roofline estimate, for hardware we do not have.

Per pipeline stage of one instance with tensor parallelism `tp` and `pp` stages (each stage holds
layers / pp, or where pp does not divide them, as the engine splits them, ceil(layers / pp) for
the first stages: the figures are the largest stage's, the pipeline's bottleneck; each GPU
holds what the engine's shard of a stage holds, `ModelSpec.rank_params`: 1 / tp of the split
weights and whole what no plan splits). A request's latency through the pipeline is pp times
the stage time (an upper bound for uneven stages); a stage works on one batch at a time.

prefill (compute-bound):
    b = 2 * params_per_gpu / (peak * mfu)                       per prompt token
      + activation all-reduce (TP) and stage hand-off (PP)      per token
    c = 2 * (layers / pp) * (hidden / tp) / (peak * mfu)        causal QK^T and PV, per token^2
    a = weight bytes per GPU / bandwidth                        the floor of a tiny batch
decode (memory-bound):
    a = weight bytes per GPU / (bandwidth * mbu) + overhead     weights read once per step
    b = KV bytes per token per GPU / (bandwidth * mbu)          per context token in the batch
    c = 2 * params_per_gpu / (peak * mfu) + communication       per request in the batch
KV capacity = (memory * utilization - weights) per GPU / KV bytes per token per GPU.

A mixture of experts: FLOPs count the parameters a token runs through (`active_params`); memory
counts every expert, and so does decode's `a`, with the entry's `experts` saying how much of it
is the routed experts' read: a decode step of B requests reads only the E (1 - (1 - k/E)^B) of
them its tokens are routed to (placement/latency_model.py). Mixtral (8, top 2) reads 25% of
them at B = 1 and 90% at B = 8; DeepSeek-V3 (256, top 8) 3% and 22%.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.parallel import ParallelLayout
from placement.hardware import DeviceSpec, ModelSpec
from placement.latency_model import Coefficients, Entry, ExpertRead


@dataclass(frozen=True)
class Efficiency:
    mfu: float = 0.5  # achieved share of peak FLOP/s in large matmuls
    mbu: float = 0.7  # achieved share of memory bandwidth
    mem_util: float = 0.9  # share of GPU memory for weights + KV
    overhead_ms: float = 1.0  # per step: kernel launches, scheduling
    allreduce_latency_ms: float = 0.01  # per all-reduce call


def fits(model: ModelSpec, device: DeviceSpec, tp: int, pp: int) -> bool:
    # each rank holds whole query and KV heads (engine/parallel.py), a KV head replicated on
    # several where tp is a multiple of them (a latent: one KV head), and an equal slice of
    # every MLP's and expert's intermediate rows (engine/sharding.py)
    kv_split = model.num_kv_heads % tp == 0 or tp % model.num_kv_heads == 0
    heads_split = model.num_heads % tp == 0 and kv_split
    rows = (model.intermediate_size, *(model.experts.widths() if model.experts else ()))
    if not heads_split or any(n % tp for n in rows):
        return False
    if pp > model.num_layers or tp > device.gpus_per_node:
        return False
    return _weight_bytes_per_gpu(model, tp, pp) < device.mem_gb * 1e9 * Efficiency().mem_util


def _stage_share(model: ModelSpec, pp: int) -> float:
    """The largest stage's share of the layers: 1 / pp, or more where pp does not divide them
    (the engine's first L % pp stages hold one layer more, engine/parallel.py)."""
    return -(-model.num_layers // pp) / model.num_layers


def _weight_bytes_per_gpu(model: ModelSpec, tp: int, pp: int) -> float:
    return model.rank_params(tp) * model.dtype_bytes * _stage_share(model, pp)


def kv_bytes_per_token_per_gpu(model: ModelSpec, tp: int, pp: int) -> float:
    """What a token's KV takes on the GPU of the largest stage: its layers' share, and the KV
    heads split over the tp ranks, at least one on each (a latent is one, whole on each)."""
    kv_heads = ParallelLayout(tp, pp).kv_heads_per_rank(model.num_kv_heads)
    return model.kv_bytes_per_token * _stage_share(model, pp) * kv_heads / model.num_kv_heads


def entry(
    model: ModelSpec,
    device: DeviceSpec,
    tp: int = 1,
    pp: int = 1,
    eff: Efficiency = Efficiency(),
) -> Entry:
    if not fits(model, device, tp, pp):
        raise ValueError(f"{model.name} does not fit {device.name} with tp={tp}, pp={pp}")
    flops = device.peak_tflops * 1e12 * eff.mfu / 1e3  # per ms
    bandwidth = device.mem_bandwidth_gbs * 1e9 * eff.mbu / 1e3  # bytes per ms
    weights = _weight_bytes_per_gpu(model, tp, pp)
    stage = _stage_share(model, pp)  # of the layers, in the largest stage
    params = model.rank_params(tp, active=True) * stage  # what a token's FLOPs run through
    layers = -(-model.num_layers // pp)
    # TP: two all-reduces of the activations per layer (ring: 2 (tp - 1) / tp of the bytes)
    act = model.hidden_size * model.dtype_bytes
    tp_bytes = 0.0 if tp == 1 else 2 * layers * act * 2 * (tp - 1) / tp
    tp_ms = tp_bytes / (device.intra_node_gbs * 1e9 / 1e3)
    tp_calls = 0.0 if tp == 1 else 2 * layers * eff.allreduce_latency_ms
    pp_ms = 0.0 if pp == 1 else act / (device.intra_node_gbs * 1e9 / 1e3)  # next stage's input
    prefill = Coefficients(
        a=weights / bandwidth + eff.overhead_ms + tp_calls,
        b=2 * params / flops + tp_ms + pp_ms,
        c=2 * layers * (model.hidden_size / tp) / flops,
    )
    kv_per_gpu = kv_bytes_per_token_per_gpu(model, tp, pp)
    decode = Coefficients(
        a=weights / bandwidth + eff.overhead_ms + tp_calls,
        b=kv_per_gpu / bandwidth,
        c=2 * params / flops + tp_ms + pp_ms,
    )
    free = device.mem_gb * 1e9 * eff.mem_util - weights
    experts = None
    if model.experts is not None:
        e = model.experts
        routed = e.layers * e.count * e.expert_params(model.hidden_size) * model.dtype_bytes
        experts = ExpertRead(e.count, e.per_token, routed * stage / tp / bandwidth)
    return Entry(tp, pp, prefill, decode, int(free / kv_per_gpu), experts=experts)


def profile(model: ModelSpec, device: DeviceSpec, eff: Efficiency = Efficiency()):
    """A Profile with one entry per (tp, pp) that fits: tp divides the heads within a node,
    pp up to 16 divides the layers or is a power of two (DeepSeek-V3's 61 layers in 2 or 4
    stages, Qwen3-235B's 94 in 4)."""
    from placement.latency_model import Profile

    tps = [t for t in range(1, device.gpus_per_node + 1) if device.gpus_per_node % t == 0]
    pps = [
        p
        for p in range(1, min(model.num_layers, 16) + 1)
        if model.num_layers % p == 0 or p & (p - 1) == 0
    ]
    entries = [
        entry(model, device, t, p, eff) for t in tps for p in pps if fits(model, device, t, p)
    ]
    return Profile(model.name, f"{device.name} (roofline)", entries)


def main(argv: list[str] | None = None) -> None:
    import argparse

    from placement.cli_args import add_kv_cache_dtype_arg
    from placement.hardware import DEVICES

    parser = argparse.ArgumentParser(description="Write a roofline profile for a model + device.")
    parser.add_argument("--model", required=True, help="HF model directory or its config.json")
    parser.add_argument("--device", required=True, choices=sorted(DEVICES))
    parser.add_argument("--dtype", default="bfloat16")
    add_kv_cache_dtype_arg(parser)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    spec = ModelSpec.from_config(args.model, args.dtype, args.kv_cache_dtype)
    result = profile(spec, DEVICES[args.device])
    if not result.entries:
        raise SystemExit(f"{args.model} fits no tp x pp layout on {args.device}")
    result.save(args.out)
    print(
        f"wrote {args.out}: {len(result.entries)} layouts "
        f"({', '.join(f'tp{e.tp}xpp{e.pp}' for e in result.entries[:8])}...)"
    )


if __name__ == "__main__":
    main()
