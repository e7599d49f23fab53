"""Token sampling for a batch: greedy rows in one argmax, the sampled ones drawn together.

Seeded requests draw from their own torch.Generator, so a seeded request samples the same tokens
whatever else shares its batch. Rows with a structured output, min_tokens, a logit bias or
penalties are adjusted first, in vLLM's order: the structured output's mask, allowed_token_ids
and bad words (bans), min_tokens' ban on EOS and stop tokens, logit bias, repetition penalty,
then frequency and presence penalties; all before temperature, so they steer greedy requests
too. A row whose constraints together leave no token (say a grammar that may only end while
min_tokens bans EOS) samples EOS: the request ends rather than drawing from nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.outputs import TokenLogprob
from engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class FixedAdjustments:
    """A request's logit adjustments that stay the same from step to step (allowed_token_ids,
    logit_bias) as tensors on the logits' device, which its engine makes once and keeps: made
    from the request's tuples every step, a list of the whole vocabulary (49k ids) cost each
    step of the batch 10-15 ms on this CPU."""

    allowed: torch.Tensor | None = None
    bias_ids: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    @classmethod
    def of(cls, p: SamplingParams, device: torch.device, dtype: torch.dtype) -> FixedAdjustments:
        allowed = torch.tensor(p.allowed_token_ids, device=device) if p.allowed_token_ids else None
        if not p.logit_bias:
            return cls(allowed)
        ids = torch.tensor([t for t, _ in p.logit_bias], device=device)
        bias = torch.tensor([b for _, b in p.logit_bias], device=device, dtype=dtype)
        return cls(allowed, ids, bias)


@dataclass(frozen=True)
class TokenHistory:
    """A request's tokens so far, which its penalties and min_tokens look at; `fixed`: its
    FixedAdjustments where its engine keeps them (else made for the step)."""

    prompt_ids: list[int]
    output_ids: list[int]
    eos_token_id: int | None = None
    fixed: FixedAdjustments | None = None


def top_k_top_p(rows: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """rows (n, V) of logits, a top_k and a top_p each -> the excluded tokens at -inf, in
    place (0 and 1.0 exclude none)."""
    dev = rows.device
    limited = [j for j, k in enumerate(top_k) if 0 < k < rows.shape[-1]]
    if limited:
        place = torch.tensor([[top_k[j] - 1] for j in limited], device=dev)
        largest = max(top_k[j] for j in limited)
        _exclude(rows, limited, lambda sub: sub < torch.topk(sub, largest).values.gather(1, place))
    nucleus = [j for j, p in enumerate(top_p) if p < 1.0]
    if nucleus:
        wanted = torch.tensor([top_p[j] for j in nucleus], device=dev)
        _exclude(rows, nucleus, lambda sub: _outside_nucleus(torch.softmax(sub, dim=-1), wanted))
    return rows


def _exclude(
    rows: torch.Tensor, which: list[int], excluded: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    """Sets -inf where excluded(rows[which]) says, in place; every row's (the usual batch,
    whose requests mostly sample alike) without copying them out and back."""
    if len(which) == rows.shape[0]:
        rows.masked_fill_(excluded(rows), float("-inf"))
    else:
        sub = rows[which]
        rows[which] = sub.masked_fill(excluded(sub), float("-inf"))


# How many of the likeliest tokens top_p looks at first, then next, before sorting the whole
# row: a nucleus is mostly far smaller than the vocabulary, and sorting 49k logits takes ~5 ms
# on one CPU thread (as long as the default model's whole decode step at a batch of 8), a
# top-256 ~0.3 ms.
TOP_P_CANDIDATES = (256, 4096)


def _outside_nucleus(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """probs (n, V), top_p (n,) -> (n, V) bool: True outside each row's nucleus, the smallest
    set of its likeliest tokens whose probability reaches its top_p (the top token always; a
    token as likely as the nucleus' least is in it too). Each row looks at the likeliest 256
    tokens, then 4096, until its nucleus ends within them; a row whose nucleus does not (a
    flat distribution) sorts all of them (a top-k of the whole row is slower)."""
    least = torch.empty_like(top_p, dtype=probs.dtype)
    pending = torch.arange(probs.shape[0], device=probs.device)
    for k in (*(k for k in TOP_P_CANDIDATES if k < probs.shape[-1]), None):
        sub = probs if len(pending) == len(probs) else probs[pending]
        if k is None:
            top, done = torch.sort(sub, descending=True).values, pending
        else:
            top = torch.topk(sub, k, sorted=True).values
            ends = top.sum(-1) >= top_p[pending]
            done, top, pending = pending[ends], top[ends], pending[~ends]
        # a token is in while the tokens before it fall short of top_p; a top_p below
        # float32's least (1e-300) compares as 0 < 0, which keeps none: the top one stays
        kept = (top.cumsum(-1) - top < top_p[done].unsqueeze(1)).sum(-1).clamp_(min=1)
        least[done] = top.gather(1, (kept - 1).unsqueeze(1)).squeeze(1)
        if not pending.numel():
            break
    return probs < least.unsqueeze(1)


def min_p(rows: torch.Tensor, values: list[float]) -> torch.Tensor:
    """rows (n, V) of logits at their temperature, a min_p each -> tokens whose probability is
    below min_p x the top token's at -inf, in place (the top token is always kept; 0 keeps
    all)."""
    limited = [j for j, m in enumerate(values) if m > 0.0]
    if limited:
        floor = torch.tensor([[values[j]] for j in limited], device=rows.device)

        def below(sub: torch.Tensor) -> torch.Tensor:
            probs = torch.softmax(sub, dim=-1)
            return probs < floor * probs.amax(-1, keepdim=True)

        _exclude(rows, limited, below)
    return rows


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
    fixed = history.fixed or FixedAdjustments.of(p, dev, logits.dtype)
    if fixed.allowed is not None:
        kept = logits[fixed.allowed]
        logits.fill_(float("-inf"))
        logits[fixed.allowed] = kept
    if p.bad_words_token_ids:
        logits[banned_words(p.bad_words_token_ids, output_ids)] = float("-inf")
    if len(output_ids) < p.min_tokens:
        eos = [] if p.ignore_eos or history.eos_token_id is None else [history.eos_token_id]
        logits[list(p.stop_token_ids) + eos] = float("-inf")
    if fixed.bias is not None:
        logits.index_add_(0, fixed.bias_ids, fixed.bias)
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
    drawn = [i for i, p in enumerate(params) if not p.is_greedy and not broken[i]]
    at_once = CPU_ROWS_AT_ONCE if logits.device.type == "cpu" else len(params)
    for start in range(0, len(drawn), at_once):
        rows = drawn[start : start + at_once]  # indexing copies: the draw scales them in place
        draws = draw(logits[rows], [params[i] for i in rows], [generators[i] for i in rows])
        for i, token in zip(rows, draws, strict=True):
            tokens[i] = token
    return [None if broken[i] else t for i, t in enumerate(tokens)]


# A GPU draws a batch's rows at once (a kernel each step of the draw, one transfer back); a
# CPU a few at a time: a row's float64 variates (~400 KB at 49k tokens) stay in its cache
# from the uniforms through their logs to the argmax, a batch's (32 rows: 12.5 MB) go out to
# memory and back between each, which made 32 rows take twice as long (38 vs 19 ms).
CPU_ROWS_AT_ONCE = 4


def draw(
    rows: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int | None]:
    """rows (n, V) of logits, changed in place -> their random draws, all at once on the rows'
    device (one transfer back, not one a row); None where a row's probabilities are not a
    distribution (an infinite logit makes NaN in the softmax): that request fails, not its
    batch."""
    # transformers' and vLLM's order: temperature, top-k, top-p, then min-p
    rows /= torch.tensor(
        [[_in_scale_range(p.temperature)] for p in params], device=rows.device, dtype=rows.dtype
    )
    top_k_top_p(rows, [p.top_k for p in params], [p.top_p for p in params])
    probs = torch.softmax(min_p(rows, [p.min_p for p in params]), dim=-1)
    total = probs.sum(-1)
    ok = torch.isfinite(total) & (total > 0)  # NaN from an infinite logit, or nothing left
    # The exponential race, torch.multinomial's own draw of one sample: the token whose
    # probability over an Exp(1) variate is largest. A tiny change of the probabilities (the
    # KV recomputed after a preemption) moves the winner only where two ratios nearly tie.
    race = probs.double() / exponentials(probs.shape, probs.device, generators)
    tokens, ok = race.argmax(-1).tolist(), ok.tolist()
    return [t if good else None for t, good in zip(tokens, ok, strict=True)]


def exponentials(
    shape: torch.Size, device: torch.device, generators: list[torch.Generator | None]
) -> torch.Tensor:
    """(n, V) float64 Exp(1) variates on `device`, each -log of a uniform: torch's
    exponential_, which multinomial runs, takes ~2 ms for a row of 49k on one CPU thread (as
    long as a decode step of the default model), float64 uniforms and their logs ~0.5 ms. A
    seeded row's come from a generator on `device` that its own generator seeds: that takes
    one number from the request's (a CPU one, whose state travels with the hand-off), so its
    stream goes on wherever the request goes, in whatever batch. (A GPU's generator is not a
    CPU's: a seed repeats its tokens on the same kind of device, as in vLLM.)"""
    seeded = [j for j, g in enumerate(generators) if g is not None]
    if not seeded:
        return torch.rand(shape, dtype=torch.float64, device=device).log_().neg_()
    uniforms = torch.empty(shape, dtype=torch.float64, device=device)
    if len(seeded) < len(generators):
        free = [j for j, g in enumerate(generators) if g is None]
        uniforms[free] = torch.rand((len(free), shape[-1]), dtype=torch.float64, device=device)
    for j in seeded:
        seed = int(torch.randint(2**63 - 1, (), generator=generators[j]))
        uniforms[j].uniform_(generator=torch.Generator(device=device).manual_seed(seed))
    return uniforms.log_().neg_()  # a uniform < 1: every variate is > 0


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
