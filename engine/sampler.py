"""Token sampling for a batch: greedy rows in one argmax, the rest row by row.

Seeded requests draw from their own torch.Generator, so a seeded request samples the same tokens
whatever else shares its batch. Rows with a logit bias or penalties are adjusted first, in
vLLM's order: logit bias, repetition penalty, then frequency and presence penalties; all of
them before temperature, so they steer greedy requests too.
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


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """logits (V,) at their temperature -> tokens whose probability is below min_p x the top
    token's at -inf (the top token is always kept)."""
    if min_p <= 0.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    return logits.masked_fill(probs < min_p * probs.max(), float("-inf"))


def apply_penalties(
    logits: torch.Tensor, p: SamplingParams, prompt_ids: list[int], output_ids: list[int]
) -> None:
    """Adjust one row of logits (V,) in place for `p`'s logit bias and penalties."""
    dev = logits.device
    if p.logit_bias:
        ids = torch.tensor([t for t, _ in p.logit_bias], device=dev)
        bias = torch.tensor([b for _, b in p.logit_bias], device=dev, dtype=logits.dtype)
        logits.index_add_(0, ids, bias)
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), device=dev, dtype=torch.long)
        values = logits[seen]
        rp = p.repetition_penalty
        logits[seen] = torch.where(values > 0, values / rp, values * rp)
    if output_ids and (p.frequency_penalty or p.presence_penalty):
        ids, counts = torch.tensor(output_ids, device=dev).unique(return_counts=True)
        logits[ids] -= p.frequency_penalty * counts.to(logits.dtype) + p.presence_penalty


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    history: list[tuple[list[int], list[int]] | None] | None = None,
) -> list[int]:
    """logits (B, V) float32 -> one token id per row. `history` holds each row's (prompt ids,
    output ids so far), needed only for rows with penalties (None elsewhere)."""
    penalized = [i for i, p in enumerate(params) if p.has_penalties]
    if penalized:
        if history is None:
            raise ValueError("rows with penalties need their (prompt ids, output ids) history")
        logits = logits.clone()  # the caller's logits stay as the model produced them
        for i in penalized:
            prompt_ids, output_ids = history[i]
            apply_penalties(logits[i], params[i], prompt_ids, output_ids)
    tokens = logits.argmax(dim=-1).tolist()
    for i, p in enumerate(params):
        if p.is_greedy:
            continue
        # transformers' and vLLM's order: temperature, top-k, top-p, then min-p
        row = apply_top_k_top_p(logits[i] / p.temperature, p.top_k, p.top_p)
        row = apply_min_p(row, p.min_p)
        # drawn on the CPU: a seeded request's generator is a CPU one, whose state travels
        # with the hand-off whatever device either replica computes on
        probs = torch.softmax(row, dim=-1).cpu()
        tokens[i] = int(torch.multinomial(probs, 1, generator=generators[i]).item())
    return tokens
