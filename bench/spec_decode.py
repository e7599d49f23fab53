"""What speculative decoding does to TPOT, on the three workloads, side by side: n-gram
drafts by default, a draft model's with `--spec '{"model": DIR, "num_speculative_tokens": k}'`
("default": the embedded model drafting for itself, every greedy draft kept: what drafting
costs here, without a draft model's saving).

    python -m bench.spec_decode [--threads 2] [--batches 1,8] [--requests 8] [--max-tokens 128]
                                [--rounds 2] [--spec '{"num_speculative_tokens": 4, ...}']
                                [--tp 1] [--pp 1]

With `--tp` or `--pp` above 1 both engines share one tensor- or pipeline-parallel runner on a
private local Ray cluster (each worker `--threads` threads), a draft model on its first worker.

For each workload (ShareGPT chat, HumanEval code, docsum summarization: bench/datasets.py)
the same `--requests` prompts are decoded greedily to at most `--max-tokens` tokens (EOS
ends them), `batch` at a time, by one engine without drafts ("plain") and one that verifies
drafts ("spec"), in turn, sharing the target's weights. A request's TPOT is (last token's time
- first token's) / (tokens - 1), its first token excluded (the prefill, the same in both).
Greedy, both produce the same tokens (checked). Medians over requests and rounds; the
acceptance rate is kept drafts / verified drafts, and "tokens/step" the tokens a speculating
request took per decode step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bench.datasets import LengthFilter, load
from engine import EngineConfig, LLMEngine, SamplingParams
from engine.spec_decode import SpeculativeConfig

WORKLOADS = ("sharegpt", "humaneval", "docsum")
DEFAULT_SPEC = {"num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}


def decode_run(engine: LLMEngine, prompts: list[list[int]], batch: int, max_tokens: int):
    """Decode the prompts `batch` at a time -> (TPOT per request in s, their tokens, the
    tokens decoded after the first, and the decode steps those took summed over requests)."""
    tpots, tokens, decoded, request_steps = [], [], 0, 0
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    for i in range(0, len(prompts), batch):
        ids = [engine.add_request(None, p, params) for p in prompts[i : i + batch]]
        times: dict[str, list[float]] = {r: [] for r in ids}
        out_ids: dict[str, list[int]] = {r: [] for r in ids}
        while engine.has_unfinished:
            outputs = engine.step()
            now = time.perf_counter()
            for out in outputs:
                if times[out.request_id]:  # a decode step's output
                    decoded += len(out.new_token_ids)
                    request_steps += 1
                times[out.request_id] += [now] * len(out.new_token_ids)
                out_ids[out.request_id] += out.new_token_ids
        for r in ids:
            t = times[r]
            if len(t) > 1:
                tpots.append((t[-1] - t[0]) / (len(t) - 1))
            tokens.append(out_ids[r])
    return tpots, tokens, decoded, request_steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.spec_decode")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--spec", type=json.loads, default=DEFAULT_SPEC)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    engines = _engines(args)
    plain = engines["plain"]
    lengths = LengthFilter(max_input=768)
    tokenize = plain.tokenizer.encode
    prompts = {
        w: [list(d.prompt_ids) for d in load(w, tokenize, args.requests, lengths)]
        for w in WORKLOADS
    }
    batches = [int(b) for b in args.batches.split(",")]
    tpots: dict[tuple, list[float]] = {}
    counts: dict[tuple, list[int]] = {}  # drafts, kept, decoded tokens, request-steps
    for _ in range(args.rounds):
        for workload in WORKLOADS:
            for batch in batches:
                outputs = {}
                for name, engine in engines.items():
                    before = engine.num_draft_tokens, engine.num_accepted_tokens
                    t, outputs[name], decoded, request_steps = decode_run(
                        engine, prompts[workload], batch, args.max_tokens
                    )
                    tpots.setdefault((workload, batch, name), []).extend(t)
                    now = engine.num_draft_tokens, engine.num_accepted_tokens
                    run = [now[0] - before[0], now[1] - before[1], decoded, request_steps]
                    total = counts.setdefault((workload, batch, name), [0, 0, 0, 0])
                    counts[workload, batch, name] = [a + b for a, b in zip(total, run, strict=True)]
                if outputs["plain"] != outputs["spec"]:
                    print(f"note: {workload} batch {batch}: the greedy tokens differ")
    _report(args, batches, tpots, counts)
    if not plain.config.parallel.is_single:
        import ray

        plain.runner.shutdown()
        ray.shutdown()


def _engines(args) -> dict[str, LLMEngine]:
    """The plain and the speculating engine over one copy of the target's weights (one runs
    at a time); a parallel runner is started with the draft's config, its draft on a worker."""
    spec = SpeculativeConfig(**args.spec)
    layout = {"tensor_parallel_size": args.tp, "pipeline_parallel_size": args.pp}
    common = {"num_threads": args.threads, "kv_cache_memory_mb": 1024, **layout}
    spec_config = EngineConfig(**common, speculative=spec, worker_num_cpus=0.5)
    runner = None
    if not spec_config.parallel.is_single:
        import ray

        from engine.model_store import resolve_model
        from engine.workers import WorkerGroupRunner

        ray.init(address="local", num_cpus=2, include_dashboard=False)  # private, ours to end
        path = str(resolve_model(None))
        runner = WorkerGroupRunner(path, spec_config, spec_config.parallel)
    plain = LLMEngine(EngineConfig(**common, worker_num_cpus=0.5), runner=runner)
    spec = LLMEngine(spec_config, runner=plain.runner, tokenizer=plain.tokenizer)
    return {"plain": plain, "spec": spec}


def _report(args, batches: list[int], tpots: dict, counts: dict) -> None:
    print(
        f"TPOT, greedy, up to {args.max_tokens} tokens, {args.requests} requests per workload, "
        f"{args.threads} threads, tp={args.tp} pp={args.pp}, medians over requests x "
        f"{args.rounds} rounds; spec: {args.spec}"
    )
    print("| workload | batch | plain ms | spec ms | ratio | acceptance | tokens/step |")
    print("|---|---|---|---|---|---|---|")
    for workload in WORKLOADS:
        for batch in batches:
            plain_ms = statistics.median(tpots[workload, batch, "plain"]) * 1e3
            spec_ms = statistics.median(tpots[workload, batch, "spec"]) * 1e3
            drafts, kept, decoded, request_steps = counts[workload, batch, "spec"]
            print(
                f"| {workload} | {batch} | {plain_ms:.1f} | {spec_ms:.1f} | "
                f"{spec_ms / plain_ms:.2f} | {kept / max(1, drafts):.2f} | "
                f"{decoded / max(1, request_steps):.2f} |"
            )


if __name__ == "__main__":
    main()
