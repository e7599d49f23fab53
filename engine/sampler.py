"""Token sampling for a batch: greedy rows in one argmax, the rest row by row.

Seeded requests draw from their own torch.Generator, so a seeded request samples the same tokens
whatever else shares its batch.
"""

from __future__ import annotations

import torch

from engine.sampling_params import SamplingParams


def apply_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits (V,) -> logits with the excluded tokens at -inf."""
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # keep the smallest prefix whose mass reaches top_p (the top token is always kept)
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(0, order, sorted_logits)
    return logits


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """logits (B, V) float32 -> one token id per row."""
    tokens = logits.argmax(dim=-1).tolist()
    for i, p in enumerate(params):
        if p.is_greedy:
            continue
        row = apply_top_k_top_p(logits[i] / p.temperature, p.top_k, p.top_p)
        # drawn on the CPU: a seeded request's generator is a CPU one, whose state travels
        # with the hand-off whatever device either replica computes on
        probs = torch.softmax(row, dim=-1).cpu()
        tokens[i] = int(torch.multinomial(probs, 1, generator=generators[i]).item())
    return tokens
