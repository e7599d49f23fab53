"""Synthetic workloads for the simulator: arrival times and (input, output) lengths.

Arrivals: Poisson (cv = 1) or Gamma inter-arrival times with a coefficient of variation cv
(burstier above 1). Lengths: a fixed int, an inclusive (low, high) range drawn uniformly, or
pairs sampled from a dataset (a list of (input, output) lengths). Deterministic under a seed.

Shared prefixes (vLLM's benchmark `--random-prefix-len` / `--prefix-repetition-num-prefixes`):
`prefix_len` tokens put before every prompt, one of `num_prefixes` distinct ones drawn
uniformly per request (a system prompt, a few-shot preamble, a document asked several
questions). A request's `input_len` counts them; the simulator's prefix caching reuses them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LengthSpec = int | tuple[int, int]


@dataclass(frozen=True)
class SimRequest:
    arrival_ms: float
    input_len: int  # with the shared prefix
    output_len: int
    prefix_len: int = 0  # leading tokens shared with every request of the same prefix_id
    prefix_id: int = 0


@dataclass(frozen=True)
class Workload:
    num_requests: int
    input_len: LengthSpec = 512
    output_len: LengthSpec = 64
    cv: float = 1.0
    dataset: tuple[tuple[int, int], ...] | None = None  # (input, output) pairs, sampled
    prefix_len: int = 0  # shared tokens before each prompt (not counted in input_len above)
    num_prefixes: int = 1  # distinct shared prefixes, one drawn per request

    def __post_init__(self) -> None:
        if self.num_requests < 1 or self.cv <= 0:
            raise ValueError("need num_requests >= 1 and cv > 0")
        if self.prefix_len < 0 or self.num_prefixes < 1:
            raise ValueError("need prefix_len >= 0 and num_prefixes >= 1")

    def sample(self, rate: float, seed: int = 0) -> list[SimRequest]:
        """Requests arriving at `rate` per second."""
        if rate <= 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        rng = np.random.default_rng(seed)
        n = self.num_requests
        shape = 1.0 / self.cv**2  # Gamma(shape, scale) has mean shape*scale, cv 1/sqrt(shape)
        gaps_s = rng.gamma(shape, 1.0 / (rate * shape), size=n)
        arrivals = np.cumsum(gaps_s) * 1e3
        if self.dataset:
            picks = rng.integers(0, len(self.dataset), size=n)
            lens = [self.dataset[i] for i in picks]
        else:
            ins = _draw(self.input_len, n, rng)
            outs = _draw(self.output_len, n, rng)
            lens = list(zip(ins, outs, strict=True))
        groups = self.prefix_ids(n, seed)
        return [
            SimRequest(float(t), self.prefix_len + int(i), int(o), self.prefix_len, g)
            for t, (i, o), g in zip(arrivals, lens, groups, strict=True)
        ]

    def prefix_ids(self, n: int, seed: int = 0) -> list[int]:
        """Which shared prefix each of n requests starts with (its own generator, so that
        arrivals and lengths are the same draws as without prefixes)."""
        if self.prefix_len == 0:
            return [0] * n
        return np.random.default_rng(seed + 3).integers(0, self.num_prefixes, size=n).tolist()


def _draw(spec: LengthSpec, n: int, rng: np.random.Generator) -> list[int]:
    if isinstance(spec, int):
        return [spec] * n
    low, high = spec
    return rng.integers(low, high + 1, size=n).tolist()
