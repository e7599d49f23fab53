"""What random draws, penalties, logit bias, min_tokens, logprobs and structured outputs add to a
decode step, side by side.

    python -m bench.sampling_cost [--threads 2] [--context 512] [--batches 1,8,32] [--rounds 3]

Each round times a plain greedy decode step, then the same batch with every request drawing at
temperature 1 from its own seeded generator, then drawing at temperature 0.8 within top_p 0.95,
then with every request asking for presence, frequency and repetition penalties, a logit bias
and min_tokens (the sampler adjusts each row's logits before the argmax), then with every
request asking for logprobs with 5 alternatives (a log-softmax and a top-k over the vocabulary
per row), then with every request writing a JSON object whose one string field must be long
(the grammar's mask at every step, with most of the vocabulary allowed inside a string:
llguidance's costliest kind of step); medians over rounds, and their ratios to plain. Then the
prefill step of one prompt, plain and with prompt logprobs (a logits row per prompt token: the
LM head over every position, a log-softmax and a top-k each).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from bench.engine_throughput import ours_decode_step_s, ours_prefill_s
from engine import EngineConfig, LLMEngine
from engine.sampling_params import StructuredOutput

PENALIZED = {
    "presence_penalty": 0.5,
    "frequency_penalty": 0.5,
    "repetition_penalty": 1.1,
    "logit_bias": ((100, 1.0), (200, -1.0)),
    "min_tokens": 4,
}
LONG_STRING = {  # no request can end within the timed steps
    "type": "object",
    "properties": {"story": {"type": "string", "minLength": 1000}},
    "required": ["story"],
}
VARIANTS = {
    "plain": {},
    # random draws, each request from its own seeded generator (top_p: a sort of the row too)
    "sampled": {"temperature": 1.0, "seed": 0},
    "top_p": {"temperature": 0.8, "top_p": 0.95, "seed": 0},
    "penalized": PENALIZED,
    "logprobs": {"logprobs": 5},
    "json": {"structured_output": StructuredOutput("json", json.dumps(LONG_STRING))},
}


def _prefill_table(engine: LLMEngine, lengths: list[int], rounds: int) -> None:
    times: dict[tuple[int, bool], list[float]] = {}
    for _ in range(rounds):
        for length in lengths:
            for scored in (False, True):
                fields = {"prompt_logprobs": 1} if scored else {}
                times.setdefault((length, scored), []).append(
                    ours_prefill_s(engine, length, **fields)
                )
    print(f"\nprefill step of one prompt, medians of {rounds} rounds")
    print("| prompt tokens | plain ms | prompt logprobs ms | ratio |\n|---|---|---|---|")
    for length in lengths:
        plain, scored = (statistics.median(times[length, s]) * 1e3 for s in (False, True))
        print(f"| {length} | {plain:.1f} | {scored:.1f} | {scored / plain:.3f} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.sampling_cost")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", default="128,512", help="prefill lengths; '' to skip")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    engine = LLMEngine(EngineConfig(num_threads=args.threads, kv_cache_memory_mb=1024))
    times: dict[tuple[int, str], list[float]] = {}
    for _ in range(args.rounds):
        for batch in batches:
            for name, fields in VARIANTS.items():
                step = ours_decode_step_s(engine, batch, args.context, args.steps, **fields)
                times.setdefault((batch, name), []).append(step)
    print(f"decode step, {args.context}-token contexts, {args.threads} threads, medians of "
          f"{args.rounds} rounds x {args.steps} steps")  # fmt: skip
    others = [n for n in VARIANTS if n != "plain"]
    print("| batch | plain ms | " + " | ".join(f"{n} ms | ratio" for n in others) + " |")
    print("|---" * (2 + 2 * len(others)) + "|")
    for batch in batches:
        plain = statistics.median(times[batch, "plain"]) * 1e3
        cells = [f"{batch}", f"{plain:.1f}"]
        for name in others:
            ms = statistics.median(times[batch, name]) * 1e3
            cells += [f"{ms:.1f}", f"{ms / plain:.3f}"]
        print("| " + " | ".join(cells) + " |")
    if args.prompts:
        _prefill_table(engine, [int(n) for n in args.prompts.split(",")], args.rounds)


if __name__ == "__main__":
    main()
