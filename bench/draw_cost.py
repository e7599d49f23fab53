"""What the sampler's random draws cost a batch, against the textbook way, side by side.

    python -m bench.draw_cost [--rows 32] [--rounds 7] [--threads 1,2] [--device cuda]

The rows are the default model's own logits at the last positions of a paragraph. Each round
samples them all with `engine.sampler.sample` (seeded generators, one a row), then with the
textbook draw: the same temperature, top-k and min-p, top_p by sorting the whole row, and
torch.multinomial, row by row, on the CPU (what the engine ran before 2026-12-06, on a GPU
too: a seeded request's generator is a CPU one). Medians over rounds, their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from engine import sampler
from engine.sampling_params import SamplingParams

TEXT = (
    "The history of the city goes back to a small fishing village on the river, where traders "
    "from the north met farmers from the valley. Over the centuries it grew into"
)
VARIANTS = {
    "temperature 1": SamplingParams(temperature=1.0, seed=0),
    "temperature 0.8, top_p 0.95": SamplingParams(temperature=0.8, top_p=0.95, seed=0),
    "temperature 1, top_k 50, top_p 0.9": SamplingParams(
        temperature=1.0, top_k=50, top_p=0.9, seed=0
    ),
    # flat: most rows' nucleus is past 4096 tokens, top_p sorts the whole row (its worst case)
    "temperature 3, top_p 0.95": SamplingParams(temperature=3.0, top_p=0.95, seed=0),
}


def textbook_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """top_p by sorting the whole row (logits (V,) -> the excluded tokens at -inf)."""
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    drop = probs.cumsum(-1) - probs >= top_p
    drop[0] = False
    return torch.empty_like(logits).scatter_(
        0, order, sorted_logits.masked_fill(drop, float("-inf"))
    )


def textbook_draw(logits: torch.Tensor, p: SamplingParams, generator) -> int | None:
    row = logits / p.temperature
    if 0 < p.top_k < row.numel():
        row = row.masked_fill(row < torch.topk(row, p.top_k).values[-1], float("-inf"))
    if p.top_p < 1.0:
        row = textbook_top_p(row, p.top_p)
    probs = torch.softmax(sampler.min_p(row.unsqueeze(0), [p.min_p])[0], dim=-1).cpu()
    return int(torch.multinomial(probs, 1, generator=generator).item())


def model_logits(rows: int) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.model_store import resolve_model

    path = resolve_model(None)
    ids = AutoTokenizer.from_pretrained(path)(TEXT, return_tensors="pt").input_ids
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.inference_mode():
        return model(ids).logits[0, -rows:].contiguous()


def time_ms(logits: torch.Tensor, params: SamplingParams, textbook: bool) -> float:
    generators = [torch.Generator().manual_seed(i) for i in range(logits.shape[0])]
    start = time.perf_counter()
    if textbook:  # row by row, as the engine drew before
        for row, generator in zip(logits, generators, strict=True):
            textbook_draw(row, params, generator)
    else:
        sampler.sample(logits, [params] * logits.shape[0], generators)
    return (time.perf_counter() - start) * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.draw_cost")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    logits = model_logits(args.rows).to(args.device)
    print(
        f"{args.rows} rows of {logits.shape[1]} logits on {args.device}, "
        f"medians of {args.rounds} rounds"
    )
    print("| threads | sampling | ours ms | textbook ms | ratio |\n|---|---|---|---|---|")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for name, params in VARIANTS.items():
            times: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(args.rounds):
                for textbook in (False, True):
                    times[textbook].append(time_ms(logits, params, textbook))
            ours, book = (statistics.median(times[t]) for t in (False, True))
            print(f"| {threads} | {name} | {ours:.1f} | {book:.1f} | {book / ours:.1f} |")


if __name__ == "__main__":
    main()
