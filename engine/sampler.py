"""Token sampling for a batch: greedy rows in one argmax, the rest row by row.

Seeded requests draw from their own torch.Generator, so a seeded request samples the same tokens
whatever else shares its batch. Rows with a structured output, min_tokens, a logit bias or
penalties are adjusted first, in vLLM's order: the structured output's mask, allowed_token_ids
and bad words (bans), min_tokens' ban on EOS and stop tokens, logit bias, repetition penalty,
then frequency and presence penalties; all before temperature, so they steer greedy requests
too. A row whose constraints together leave no token (say a grammar that may only end while
min_tokens bans EOS) samples EOS: the request ends rather than drawing from nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.outputs import TokenLogprob
from engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class TokenHistory:
    """A request's tokens so far, which its penalties and min_tokens look at."""

    prompt_ids: list[int]
    output_ids: list[int]
    eos_token_id: int | None = None


def apply_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits (V,) -> logits with the excluded tokens at -inf."""
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        logits = _apply_top_p(logits, top_p)
    return logits


# How many of the likeliest tokens top_p looks at first, then next, before sorting the whole
# row: a nucleus is mostly far smaller than the vocabulary, and sorting 49k logits takes ~5 ms
# on one CPU thread (as long as the default model's whole decode step at a batch of 8), a
# top-256 ~0.3 ms.
TOP_P_CANDIDATES = (256, 4096)


def _likeliest(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """probs (V,) -> the likeliest tokens' probabilities and ids, likeliest first: enough of
    them that the nucleus ends within them."""
    for k in TOP_P_CANDIDATES:
        if k < probs.numel():
            top, order = torch.topk(probs, k)
            if top.sum() >= top_p:
                return top, order
    # a flat distribution: the whole row, sorted (a top-k of all of it is slower than a sort)
    return torch.sort(probs, descending=True)


def _apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """logits (V,) -> the smallest set of the likeliest tokens whose probability reaches top_p
    kept (the top token always), the others at -inf."""
    top, order = _likeliest(torch.softmax(logits, dim=-1), top_p)
    # a token is dropped once the tokens before it reach top_p
    drop = top.cumsum(-1) - top >= top_p
    drop[0] = False  # a top_p below float32's least (1e-300) compares as 0 >= 0
    kept = order[~drop]
    out = torch.full_like(logits, float("-inf"))
    out[kept] = logits[kept]
    return out


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """logits (V,) at their temperature -> tokens whose probability is below min_p x the top
    token's at -inf (the top token is always kept)."""
    if min_p <= 0.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    return logits.masked_fill(probs < min_p * probs.max(), float("-inf"))


# Dividing or multiplying float32 logits by a factor past these overflows (x / 0, 0 x inf,
# -inf / inf: NaN), and a NaN fails the draw and with it the whole batch's step. Within them no
# logit overflows, and a factor beyond them changes no draw: a temperature of 1e-10 is already
# greedy and 1e10 already uniform; a repetition penalty's seen logits are already ~0 or far
# below every other.
SCALE_RANGE = (1e-10, 1e10)


def _in_scale_range(factor: float) -> float:
    return min(max(factor, SCALE_RANGE[0]), SCALE_RANGE[1])


def apply_penalties(logits: torch.Tensor, p: SamplingParams, history: TokenHistory) -> None:
    """Adjust one row of logits (V,) in place for `p`'s min_tokens, logit bias and penalties."""
    dev = logits.device
    prompt_ids, output_ids = history.prompt_ids, history.output_ids
    if p.allowed_token_ids:
        allowed = torch.tensor(p.allowed_token_ids, device=dev)
        kept = logits[allowed]
        logits.fill_(float("-inf"))
        logits[allowed] = kept
    if p.bad_words_token_ids:
        logits[banned_words(p.bad_words_token_ids, output_ids)] = float("-inf")
    if len(output_ids) < p.min_tokens:
        eos = [] if p.ignore_eos or history.eos_token_id is None else [history.eos_token_id]
        logits[list(p.stop_token_ids) + eos] = float("-inf")
    if p.logit_bias:
        ids = torch.tensor([t for t, _ in p.logit_bias], device=dev)
        bias = torch.tensor([b for _, b in p.logit_bias], device=dev, dtype=logits.dtype)
        logits.index_add_(0, ids, bias)
    if p.repetition_penalty != 1.0:
        # repeated ids gather and write back the same value: no set to build every step
        seen = torch.tensor(prompt_ids + output_ids, device=dev, dtype=torch.long)
        values = logits[seen]
        rp = _in_scale_range(p.repetition_penalty)
        logits[seen] = torch.where(values > 0, values / rp, values * rp)
    if output_ids and (p.frequency_penalty or p.presence_penalty):
        ids, counts = torch.tensor(output_ids, device=dev).unique(return_counts=True)
        logits[ids] -= p.frequency_penalty * counts.to(logits.dtype) + p.presence_penalty


def banned_words(words: tuple[tuple[int, ...], ...], output_ids: list[int]) -> list[int]:
    """The last token of each bad word whose other tokens end the output so far (vLLM's rule:
    the output alone, not the prompt, is matched)."""
    banned = []
    for word in words:
        head = list(word[:-1])
        if not head or output_ids[-len(head) :] == head:
            banned.append(word[-1])
    return banned


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    history: list[TokenHistory | None] | None = None,
    allowed: TokenMasks | None = None,
) -> list[int | None]:
    """logits (B, V) float32 -> one token id per row, None for a row that has no distribution
    to draw from (NaN or infinite logits: the model's numbers broke), whose request then fails
    alone. `history` holds each row's tokens so far, needed only for rows whose params adjust
    logits or that have a mask (None elsewhere); `allowed`: the rows whose structured output
    limits the tokens that may follow, and those tokens."""
    masked = list(allowed.rows) if allowed is not None else []
    adjusted = [i for i, p in enumerate(params) if p.adjusts_logits]
    if adjusted or masked:
        if history is None:
            raise ValueError("rows with penalties, min_tokens or a mask need their token history")
        raw, logits = logits, logits.clone()  # the caller's logits stay as the model made them
        if masked:  # one transfer and one fill for all the masked rows
            ok = unpack_masks(allowed.bits.to(logits.device), logits.shape[-1])
            logits[masked] = logits[masked].masked_fill(~ok, float("-inf"))
        for i in adjusted:
            apply_penalties(logits[i], params[i], history[i])
        _end_where_nothing_left(logits, raw, sorted({*masked, *adjusted}), history)
    # max() propagates NaN: a row whose best value is NaN holds no distribution to draw from
    best = logits.max(dim=-1)
    tokens: list[int | None] = best.indices.tolist()
    broken = best.values.isnan().tolist()
    for i, p in enumerate(params):
        if broken[i]:
            tokens[i] = None
        elif not p.is_greedy:
            tokens[i] = _draw(logits[i], p, generators[i])
    return tokens


def _draw(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int | None:
    """One row's random draw; None where its probabilities are not a distribution (an
    infinite logit makes NaN in the softmax): that request fails, not its batch."""
    # transformers' and vLLM's order: temperature, top-k, top-p, then min-p
    row = apply_top_k_top_p(logits / _in_scale_range(p.temperature), p.top_k, p.top_p)
    row = apply_min_p(row, p.min_p)
    # drawn on the CPU: a seeded request's generator is a CPU one, whose state travels
    # with the hand-off whatever device either replica computes on
    probs = torch.softmax(row, dim=-1).cpu()
    # The exponential race, torch.multinomial's own draw of one sample: the token whose
    # probability over an Exp(1) variate is largest. A tiny change of the probabilities (the
    # KV recomputed after a preemption) moves the winner only where two ratios nearly tie.
    # Each Exp(1) here is -log of a uniform: torch's exponential_, which multinomial runs,
    # takes ~2 ms for a row of 49k on one CPU thread (as long as a decode step of the default
    # model), float64 uniforms and their logs ~0.5 ms.
    total = probs.sum()
    if not (torch.isfinite(total) and total > 0):  # NaN from an infinite logit, or nothing
        return None
    exp1 = torch.rand(probs.shape, dtype=torch.float64, generator=generator).log_().neg_()
    return int((probs.double() / exp1).argmax())  # a uniform < 1: every variate is > 0


@dataclass(frozen=True)
class TokenMasks:
    """What structured outputs allow next: `rows` of the batch and, one row each, the packed
    bitmask of their allowed tokens ((len(rows), W) int32, engine.grammar)."""

    rows: tuple[int, ...]
    bits: torch.Tensor


def unpack_masks(bits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(n, W) packed int32 -> (n, vocab_size) bool, on the bits' device."""
    shifts = torch.arange(32, dtype=torch.int32, device=bits.device)
    return ((bits.unsqueeze(-1) >> shifts) & 1).bool().view(bits.shape[0], -1)[:, :vocab_size]


def _end_where_nothing_left(
    logits: torch.Tensor, raw: torch.Tensor, rows: list[int], history: list[TokenHistory | None]
) -> None:
    """Rows whose every token is banned get EOS alone (without an EOS token: the model's own
    row), so that greedy and sampled draws alike pick something defined."""
    empty = torch.isneginf(logits[rows]).all(dim=-1).tolist()
    for i, nothing_left in zip(rows, empty, strict=True):
        if not nothing_left:
            continue
        eos = history[i].eos_token_id
        if eos is None:
            logits[i] = raw[i]
        else:
            logits[i, eos] = 0.0


def token_logprobs(
    logits: torch.Tensor, tokens: list[int], counts: list[int | None]
) -> list[TokenLogprob | None]:
    """logits (B, V) as the model produced them, the sampled token per row and how many top
    alternatives each row asked for (None: no logprobs) -> one TokenLogprob per asking row."""
    rows = [i for i, k in enumerate(counts) if k is not None]
    out: list[TokenLogprob | None] = [None] * len(counts)
    if not rows:
        return out
    logprobs = torch.log_softmax(logits[rows].float(), dim=-1)  # only the rows that asked
    chosen = logprobs.gather(1, torch.tensor([[tokens[i]] for i in rows], device=logits.device))
    ranks = (logprobs > chosen).sum(dim=-1) + 1  # ties share the best place
    k = max(counts[i] for i in rows)
    values, ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0])
    chosen, values, ids = chosen.cpu().tolist(), values.cpu().tolist(), ids.cpu().tolist()
    for j, (i, rank) in enumerate(zip(rows, ranks.cpu().tolist(), strict=True)):
        top = tuple(zip(map(int, ids[j][: counts[i]]), values[j][: counts[i]], strict=True))
        out[i] = TokenLogprob(tokens[i], chosen[j][0], top, rank)
    return out
