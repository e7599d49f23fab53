"""Engine throughput vs transformers' `generate`, same model, dtype and thread count, one run.

    python -m bench.engine_throughput [--threads 2] [--context 512] [--batches 1,8,32,64]
                                      [--steps 8] [--rounds 1] [--kv-cache-dtype fp8]

Prefill: tokens/s of one `--context`-token prompt. Decode: tokens/s at each batch size with
`--context`-token contexts (every request prefilled first; only decode steps are timed). For
transformers, a decode step is (generate(1 + K new tokens) - generate(1 new token)) / K, which
is what its own decode loop costs. Memory-bandwidth utilization at batch 1 = weight bytes read
per step / step time, against a copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from bench.host import copy_bandwidth_gbs, median_time
from engine import EngineConfig, LLMEngine, SamplingParams
from engine.model_store import resolve_model


def prompts(batch: int, context: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (batch, context), generator=g).tolist()


def ours_prefill_s(engine: LLMEngine, context: int, **sampling) -> float:
    """Median prefill step of one `context`-token prompt (extra SamplingParams fields in
    `sampling`); each request ends at its first token."""
    [ids] = prompts(1, context, engine.runner.shape.vocab_size, seed=1)
    params = SamplingParams(max_tokens=1, **sampling)

    def run():
        engine.add_request(None, ids, params)
        engine.step()

    run()  # warm-up
    return median_time(run, 3)


def ours_decode_step_s(
    engine: LLMEngine,
    batch: int,
    context: int,
    steps: int,
    cycle: dict[str, tuple] | None = None,
    **sampling,
) -> float:
    """Median decode step at `batch` requests of `context` tokens (extra SamplingParams fields
    in `sampling`; a field in `cycle`: request i takes its value i modulo their count)."""
    vocab = engine.runner.shape.vocab_size
    for i, ids in enumerate(prompts(batch, context, vocab)):
        turn = {name: values[i % len(values)] for name, values in (cycle or {}).items()}
        fields = {"max_tokens": steps + 3, "temperature": 0.0, "ignore_eos": True}
        params = SamplingParams(**{**fields, **sampling, **turn})  # greedy unless asked
        engine.add_request(None, ids, params)
    while engine.scheduler.waiting:  # prefill everything first
        engine.step()
    engine.step()  # warm-up decode step
    step_s = median_time(engine.step, steps)
    while engine.has_unfinished:
        engine.step()
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    return step_s


class _StepClock:
    """A generate() streamer that timestamps every put: the prompt, then each new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def hf_times(model, batch: int, context: int, steps: int) -> tuple[float, float]:
    """-> (prefill seconds, median decode step seconds) of transformers' own generate loop."""
    ids = torch.tensor(prompts(batch, context, model.config.vocab_size))
    clock = _StepClock()
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=steps + 2,
            min_new_tokens=steps + 2,
            do_sample=False,
            pad_token_id=0,
            streamer=clock,
        )
    # times[0]: prompt put at the start; times[1]: first token (prefill); then one per decode step
    prefill = clock.times[1] - t0
    decode = statistics.median(
        b - a for a, b in zip(clock.times[2:], clock.times[3:], strict=False)
    )
    return prefill, decode


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--steps", type=int, default=8, help="timed decode steps per point")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved repeats per batch")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--kv-cache-dtype", default="auto", help="ours: auto, fp8, fp8_e5m2")
    parser.add_argument("--out", type=Path, default=Path("bench/results/engine_throughput.json"))
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    kv_mb = 64 + max(batches) * (args.context + args.steps + 8) * 46 * 1024 // 2**20
    engine = LLMEngine(
        EngineConfig(dtype=args.dtype, kv_cache_memory_mb=kv_mb, kv_cache_dtype=args.kv_cache_dtype)
    )
    hf = AutoModelForCausalLM.from_pretrained(
        resolve_model(None), dtype=getattr(torch, args.dtype), attn_implementation="sdpa"
    ).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.runner.model.parameters())
    bandwidth = copy_bandwidth_gbs()

    rows = []
    ours_pf = ours_prefill_s(engine, args.context)
    hf_times(hf, 1, args.context, 2)  # warm-up
    hf_pf = statistics.median(hf_times(hf, 1, args.context, 1)[0] for _ in range(3))
    rows.append(
        {
            "phase": "prefill",
            "batch": 1,
            "ours_tok_s": args.context / ours_pf,
            "hf_tok_s": args.context / hf_pf,
            "ours_ms": ours_pf * 1e3,
            "hf_ms": hf_pf * 1e3,
        }
    )
    for b in batches:
        # interleaved rounds: both sides see the same machine load; medians across rounds
        ours_r, theirs_r = [], []
        for _ in range(args.rounds):
            ours_r.append(ours_decode_step_s(engine, b, args.context, args.steps))
            theirs_r.append(hf_times(hf, b, args.context, args.steps)[1])
        ours, theirs = statistics.median(ours_r), statistics.median(theirs_r)
        rows.append(
            {
                "phase": "decode",
                "batch": b,
                "ours_tok_s": b / ours,
                "hf_tok_s": b / theirs,
                "ours_ms": ours * 1e3,
                "hf_ms": theirs * 1e3,
            }
        )
        print(rows[-1], flush=True)
    b1 = next(r for r in rows if r["phase"] == "decode" and r["batch"] == 1)
    report = {
        "threads": args.threads,
        "context": args.context,
        "kv_cache_dtype": args.kv_cache_dtype,
        "dtype": args.dtype,
        "rounds": args.rounds,
        "steps": args.steps,
        "weight_mb": weight_bytes / 2**20,
        "copy_bandwidth_gbs": bandwidth,
        "batch1_weight_read_gbs": weight_bytes / (b1["ours_ms"] / 1e3) / 1e9,
        "rows": rows,
    }
    report["batch1_bandwidth_utilization"] = report["batch1_weight_read_gbs"] / bandwidth
    if any(r["batch"] == 32 and r["phase"] == "decode" for r in rows):
        b32 = next(r for r in rows if r["phase"] == "decode" and r["batch"] == 32)
        report["b32_vs_hf_b1"] = b32["ours_tok_s"] / b1["hf_tok_s"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(markdown(report))


def markdown(report: dict) -> str:
    lines = [
        f"context {report['context']} tokens, {report['dtype']}, {report['threads']} threads, "
        f"{report['rounds']} round(s) of {report['steps']} decode steps",
        "",
        "| phase | batch | ours tok/s | transformers tok/s | ours ms/step | transformers ms/step "
        "| speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['phase']} | {r['batch']} | {r['ours_tok_s']:.1f} | {r['hf_tok_s']:.1f} | "
            f"{r['ours_ms']:.1f} | {r['hf_ms']:.1f} | {r['ours_tok_s'] / r['hf_tok_s']:.2f}x |"
        )
    lines += [
        "",
        f"batch-1 decode reads {report['weight_mb']:.0f} MB of weights per step: "
        f"{report['batch1_weight_read_gbs']:.1f} GB/s vs {report['copy_bandwidth_gbs']:.1f} GB/s "
        f"copy bandwidth = {100 * report['batch1_bandwidth_utilization']:.0f}% utilization",
    ]
    if "b32_vs_hf_b1" in report:
        lines.append(
            f"batch-32 aggregate decode = {report['b32_vs_hf_b1']:.1f}x transformers' "
            "batch-1 rate (target >= 10x)"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
