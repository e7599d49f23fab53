"""Beam search as vLLM's OpenAI server runs it (`use_beam_search`), apart from the engine.

Each step asks the engine, for every running beam, the likeliest next tokens (a one-token
request whose prompt is the beam so far, with 2 x width logprobs: prefix caching makes it a
prefill of the last tokens). Every candidate that ends a sequence (EOS, the model's own stop
ids, `stop_token_ids`) is kept as a finished beam; of the others, the `width` with the highest
cumulative logprob run on. After `max_tokens` steps (or when none runs), the finished and
running beams are ranked by cumulative logprob / length ** length_penalty, the length counting
the prompt and not a final stop token, and the best `width` are the choices, as in vLLM
(vllm/beam_search.py, get_beam_search_score). Pure Python: the caller runs the steps.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

# a position's likeliest next tokens, (token id, logprob), the most likely first
Candidates = Sequence[tuple[int, float]]
# one beam's step, (step number, beam's place among the running, beam) -> its candidates
Step = Callable[[int, int, "Beam"], Awaitable[Candidates]]


@dataclass(frozen=True)
class BeamSearchParams:
    width: int  # the request's n
    max_tokens: int
    stop_ids: frozenset[int]  # the tokens that end a beam (EOS unless ignored, stop_token_ids)
    length_penalty: float = 1.0
    keep_stop_token: bool = False  # include_stop_str_in_output: the stop token is an output's

    @property
    def num_candidates(self) -> int:
        """Alternatives a step asks for each beam: vLLM's 2 x width, so that `width` remain
        when every beam's likeliest tokens end it."""
        return 2 * self.width


@dataclass(frozen=True)
class Beam:
    tokens: tuple[int, ...] = ()  # generated (a final stop token only when kept)
    cum_logprob: float = 0.0  # of every token chosen, the stop token's too
    steps: tuple[Candidates, ...] = ()  # each token's position's candidates (its logprobs)
    finish_reason: str | None = None  # "stop": a stop token ended it; None: it may go on

    def then(self, token: int, logprob: float, step: Candidates, stop: bool, keep: bool) -> Beam:
        shown = not stop or keep
        return Beam(
            self.tokens + (token,) * shown,
            self.cum_logprob + logprob,
            self.steps + (step,) * shown,
            "stop" if stop else None,
        )

    def token_logprobs(self, k: int) -> list[tuple[int, float, Candidates, int]]:
        """Each token's (id, logprob, k alternatives, rank): its step's candidates are the
        likeliest first, so its place among them is its rank."""
        out = []
        for token, step in zip(self.tokens, self.steps, strict=True):
            rank = next(r for r, (t, _) in enumerate(step, 1) if t == token)
            out.append((token, step[rank - 1][1], tuple(step[:k]), rank))
        return out


class BeamSearch:
    def __init__(self, params: BeamSearchParams, num_prompt_tokens: int) -> None:
        if params.width < 1 or params.max_tokens < 1:
            raise ValueError(f"a beam search needs a width and max_tokens of at least 1: {params}")
        self.params, self.num_prompt_tokens = params, num_prompt_tokens
        self.running: list[Beam] = [Beam()]
        self.finished: list[Beam] = []
        self.num_steps = 0

    @property
    def done(self) -> bool:
        return not self.running or self.num_steps >= self.params.max_tokens

    def advance(self, candidates: Sequence[Candidates]) -> None:
        """One step: `candidates[i]`, the likeliest next tokens of running beam i."""
        if len(candidates) != len(self.running):
            raise ValueError(f"{len(candidates)} steps for {len(self.running)} running beams")
        p, going = self.params, []
        for beam, step in zip(self.running, candidates, strict=True):
            for token, logprob in step:
                stop = token in p.stop_ids
                (self.finished if stop else going).append(
                    beam.then(token, logprob, step, stop, p.keep_stop_token)
                )
        # stable: equal logprobs keep the beams' order, then the candidates'
        going.sort(key=lambda b: -b.cum_logprob)
        self.running = going[: p.width]
        self.num_steps += 1

    def best(self) -> list[Beam]:
        """The `width` best beams, finished or not, best first."""
        return sorted(self.finished + self.running, key=self._rank)[: self.params.width]

    def _rank(self, beam: Beam) -> float:
        """Ascending in vLLM's score, cum_logprob / length ** length_penalty (<= 0), taken as
        log(-cum_logprob) - length_penalty * log(length): the same order, and no overflow
        or division by zero for any finite length_penalty."""
        if beam.cum_logprob >= 0:  # probability 1: the best score there is
            return -math.inf
        # a kept stop token is not counted in the length (vLLM's score drops a final EOS)
        length = self.num_prompt_tokens + len(beam.tokens)
        if beam.finish_reason == "stop" and self.params.keep_stop_token:
            length -= 1
        return math.log(-beam.cum_logprob) - self.params.length_penalty * math.log(max(length, 1))


async def run(search: BeamSearch, step: Step) -> list[Beam]:
    """The search to its end, each step's beams side by side; -> the best beams. A step that
    fails cancels the others and is raised, as does cancelling this (a client that left)."""
    while not search.done:
        beams = list(enumerate(search.running))
        tasks = [asyncio.ensure_future(step(search.num_steps, j, beam)) for j, beam in beams]
        try:
            candidates = await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        search.advance(candidates)
    return search.best()
