"""Latency model of one (model, device, TP, PP) instance, and the profile YAML that holds it.

    prefill step ms = a + b * sum(prompt lengths) + c * sum(prompt lengths ** 2)
                      (a chunk of L tokens at offset o: c * ((o + L) ** 2 - o ** 2))
    decode step ms  = a + b * sum(context lengths in the batch) + c * batch size

The YAML shape is a contract (users read and edit it):

    model: smollm2-135m
    device: cpu-1thread
    entries:
      - tp: 1
        pp: 1
        prefill: {a: 12.0, b: 0.08, c: 5.0e-6}
        decode: {a: 15.0, b: 0.0005, c: 0.03}
        kv_capacity_tokens: 50000

An entry may add `decode_batch_ms` (optional): the decode step's batch term measured per batch
size where it is not a straight line, as on a CPU whose matrix kernels change path with the
number of rows. Where present a decode step is b * sum(contexts) + the curve at the batch size
(linear between the listed sizes; beyond the last one it grows by c per request), and a and c
are the straight line fitted to the same steps, for readers and for tools that take the line
(autoscaling). For example `decode_batch_ms: {1: 50.0, 2: 55.0, 3: 80.0, 4: 100.0, 8: 135.0}`.

An entry of a mixture of experts may add `experts: {count: 8, per_token: 2, read_ms: 9.3}`
(optional): decode's `a` reads every expert, `read_ms` of it per stage, but a step of B
requests reads only the experts its tokens are routed to, E (1 - (1 - k/E)^B) of the E on
average under uniform routing (skewed routing touches fewer: this is the upper bound). So a
decode step's fixed part is a - read_ms * (1 - k/E)^B: at B = 1 Mixtral (8, top 2) reads a
quarter of its experts, DeepSeek-V3 (256, top 8) 3%. A step with a prefill in it reads them all.

An optional top-level `node_contention` (default 0) says how much the instances of one machine
slow each other: a step runs (1 + node_contention * k) times slower while k other instances on
the node are mid-step (see placement/simulator.py). CPUs share cores' memory bandwidth and
caches (the profiler measures it); GPUs that each instance owns do not: leave it at 0.

An optional top-level `step_wander: {sd: 0.15, tau_ms: 700.0, white_sd: 0.14, drift_sd: 0.11,
drift_tau_ms: 35000.0, run_sd: 0.1}` (absent by default; the drift fields default to 0 /
600000, run_sd to 0) says how served steps drift around the model over time, and how the
machine's pace differs from run to run (placement/wander.py); a profile fitted to a server's
step traces carries it (`placement profile --from-steps`).

An optional top-level `serving: {ingress_request_ms: 9.0, ingress_chunk_ms: 1.0,
proxy_request_ms: 3.5, proxy_chunk_ms: 0.57}` (absent: those, this machine's) is what a request
and a streamed chunk cost the host's ingress and Serve proxy in CPU (`bench.stream_cost
--profile` writes it); the plan sizes the front end with it (placement/frontend.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import yaml

from placement.frontend import ServingCost
from placement.wander import StepWander


@dataclass(frozen=True)
class Coefficients:
    a: float
    b: float
    c: float

    def __post_init__(self) -> None:
        if min(self.a, self.b, self.c) < 0:
            raise ValueError(f"latency coefficients must be >= 0, got {self}")


@dataclass(frozen=True)
class ExpertRead:
    """What of decode's fixed `a` is reading the routed experts (see the module docstring)."""

    count: int
    per_token: int
    read_ms: float  # per stage: every expert's weights read once

    def __post_init__(self) -> None:
        if not 1 <= self.per_token <= self.count or self.read_ms < 0:
            raise ValueError(f"experts need 1 <= per_token <= count and read_ms >= 0: {self}")

    def unread_ms(self, batch: int) -> float:
        """The read a decode step of `batch` requests skips: the experts none is routed to."""
        return self.read_ms * (1 - self.per_token / self.count) ** batch


@dataclass(frozen=True)
class Entry:
    tp: int
    pp: int
    prefill: Coefficients
    decode: Coefficients
    kv_capacity_tokens: int
    decode_batch_ms: tuple[tuple[int, float], ...] = ()  # (batch size, ms), sizes increasing
    experts: ExpertRead | None = None  # a mixture of experts: what decode's `a` reads of them

    def __post_init__(self) -> None:
        sizes = [n for n, _ in self.decode_batch_ms]
        if sizes != sorted(set(sizes)) or (sizes and sizes[0] < 1):
            raise ValueError(f"decode_batch_ms needs increasing batch sizes >= 1, got {sizes}")
        if any(ms < 0 for _, ms in self.decode_batch_ms):
            raise ValueError(f"decode_batch_ms must be >= 0 ms, got {self.decode_batch_ms}")
        if self.experts and (self.decode_batch_ms or self.experts.read_ms > self.decode.a):
            raise ValueError(
                "experts.read_ms is a part of decode.a, and a measured decode_batch_ms curve "
                f"holds the experts' reads already: {self.experts}, decode.a {self.decode.a}"
            )

    def prefill_ms(self, prompt_lens: list[int]) -> float:
        lens = np.asarray(prompt_lens, dtype=float)
        p = self.prefill
        return p.a + p.b * lens.sum() + p.c * (lens**2).sum()

    def decode_ms(self, context_lens: list[int]) -> float:
        batch, context = len(context_lens), float(sum(context_lens))
        extra = self.decode_batch_extra_ms(batch)
        return self.decode_fixed_ms(batch) + self.decode.b * context + extra

    def decode_fixed_ms(self, batch: int) -> float:
        """Decode's `a` for a step of `batch` requests: a mixture's, less the experts unread."""
        unread = self.experts.unread_ms(batch) if self.experts else 0.0
        return self.decode.a - unread

    def decode_batch_extra_ms(self, batch: int) -> float:
        """What `batch` running requests add to a decode step over its fixed `a` (the context
        term apart): c per request, or the measured curve less a."""
        d = self.decode
        if not self.decode_batch_ms:
            return d.c * batch
        sizes, ms = zip(*self.decode_batch_ms, strict=True)
        if batch > sizes[-1]:
            return ms[-1] + d.c * (batch - sizes[-1]) - d.a
        return float(np.interp(batch, sizes, ms)) - d.a


@dataclass(frozen=True)
class Profile:
    model: str
    device: str
    entries: list[Entry] = field(default_factory=list)
    node_contention: float = 0.0
    step_wander: StepWander | None = None
    serving: ServingCost | None = None  # the host's front-end CPU costs; None: the defaults

    def __post_init__(self) -> None:
        if self.node_contention < 0:
            raise ValueError(f"node_contention must be >= 0, got {self.node_contention}")

    def entry(self, tp: int = 1, pp: int = 1) -> Entry:
        for e in self.entries:
            if (e.tp, e.pp) == (tp, pp):
                return e
        raise KeyError(f"profile {self.model}/{self.device} has no entry for tp={tp}, pp={pp}")

    def to_yaml(self) -> str:
        data = asdict(self)
        for entry in data["entries"]:  # a mapping reads best; absent when the line is the model
            curve = entry.pop("decode_batch_ms")
            if curve:
                entry["decode_batch_ms"] = {int(n): float(ms) for n, ms in curve}
            if entry["experts"] is None:
                del entry["experts"]
        for optional in ("step_wander", "serving"):
            if data[optional] is None:
                del data[optional]
        return yaml.safe_dump(data, sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        return cls.from_dict(yaml.safe_load(Path(path).read_text()))

    @classmethod
    def from_dict(cls, data: dict) -> Profile:
        try:
            entries = [
                Entry(
                    tp=int(e["tp"]),
                    pp=int(e["pp"]),
                    prefill=Coefficients(**e["prefill"]),
                    decode=Coefficients(**e["decode"]),
                    kv_capacity_tokens=int(e["kv_capacity_tokens"]),
                    decode_batch_ms=_curve(e.get("decode_batch_ms", {})),
                    experts=ExpertRead(**e["experts"]) if e.get("experts") else None,
                )
                for e in data["entries"]
            ]
            contention = float(data.get("node_contention", 0.0))
            wander = data.get("step_wander")
            wander = None if wander is None else StepWander(**wander)
            serving = data.get("serving")
            serving = None if serving is None else ServingCost(**serving)
            return cls(
                str(data["model"]), str(data["device"]), entries, contention, wander, serving
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"malformed profile: {e!r}") from e


def _curve(mapping: dict) -> tuple[tuple[int, float], ...]:
    return tuple(sorted((int(n), float(ms)) for n, ms in mapping.items()))


def fit_relative(features: np.ndarray, times_ms: np.ndarray) -> tuple[Coefficients, float]:
    """Least squares on relative error, coefficients kept >= 0.

    features (N, 3), times (N,) -> (coefficients, RMS relative error of the fit)."""
    coef, err = fit_nonnegative(features, times_ms)
    return Coefficients(*map(float, coef)), err


def fit_shaped(
    features: np.ndarray, times_ms: np.ndarray, shape: Coefficients
) -> tuple[Coefficients, float]:
    """fit_relative where the rows determine every coefficient; where they do not (every
    prompt one length, chunks of one size, and so on) least squares would pick an arbitrary
    split between the terms that extrapolates anywhere, so `shape` (a solo profile's
    coefficients) is kept and only scaled to the times."""
    if np.linalg.matrix_rank(features) == features.shape[1]:
        return fit_relative(features, times_ms)
    model = features @ np.array([shape.a, shape.b, shape.c])
    ratio = model / times_ms  # relative least squares on one factor k: k = sum(r) / sum(r^2)
    k = float(ratio.sum() / (ratio**2).sum())
    rel = k * ratio - 1
    return Coefficients(shape.a * k, shape.b * k, shape.c * k), float(np.sqrt(np.mean(rel**2)))


def fit_nonnegative(features: np.ndarray, times_ms: np.ndarray) -> tuple[np.ndarray, float]:
    """features (N, K), times (N,) -> (K coefficients >= 0, RMS relative error of the fit).

    Dividing each row by its time makes a 10 ms step as important as a 1 s step. A coefficient
    that comes out negative (noise on a term that does not matter) is fixed at 0 and the rest
    refitted."""
    x = features / times_ms[:, None]
    y = np.ones(len(times_ms))
    active = list(range(features.shape[1]))
    while True:
        sol, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
        if (sol >= 0).all() or len(active) == 1:
            break
        active.pop(int(np.argmin(sol)))
    coef = np.zeros(features.shape[1])
    coef[active] = np.clip(sol, 0, None)
    rel = (features @ coef - times_ms) / times_ms
    return coef, float(np.sqrt(np.mean(rel**2)))


def prefix_attention(tokens: int, offset: int = 0) -> int:
    """What the prefill's c term multiplies for `tokens` computed after `offset` tokens of the
    same prompt: they attend over the prefix as well, (o + L)^2 - o^2; L^2 for a whole prompt.
    The trace fit and the simulator's chunked prefill both charge a chunk this."""
    return (offset + tokens) ** 2 - offset**2


def prefill_features(
    batches: list[list[int]], offsets: list[list[int]] | None = None
) -> np.ndarray:
    """Rows [1, tokens, attention] of the prefill model; offsets default to 0 (whole prompts)."""
    if offsets is None:
        offsets = [[0] * len(b) for b in batches]
    return np.array([
        [1.0, sum(b), sum(prefix_attention(n, o) for n, o in zip(b, at, strict=True))]
        for b, at in zip(batches, offsets, strict=True)
    ])  # fmt: skip


def decode_features(batches: list[list[int]]) -> np.ndarray:
    return np.array([[1.0, sum(b), len(b)] for b in batches])


# where the decode curve may have a point: dense where CPU kernels change path (a few rows),
# sparse where the step grows steadily
CURVE_SIZES = (1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def decode_curve_sizes(batches: list[list[int]], min_steps: float = 3.0) -> tuple[int, ...]:
    """The batch sizes a decode curve is fitted at: the candidates up to the largest batch seen
    and that batch itself, less interior sizes with fewer than `min_steps` steps' worth of
    weight near them (a point nothing pins down would take any value). () below three
    distinct batch sizes: a line is all such steps can tell."""
    seen = sorted({len(b) for b in batches})
    if len(seen) < 3:
        return ()
    sizes = [n for n in CURVE_SIZES if seen[0] <= n < seen[-1]] + [seen[-1]]
    while len(sizes) > 2:
        weight = decode_curve_features(batches, tuple(sizes))[:, 1:].sum(axis=0)
        thin = [i for i in range(1, len(sizes) - 1) if weight[i] < min_steps]
        if not thin:
            break
        sizes.pop(min(thin, key=lambda i: weight[i]))
    return tuple(sizes)


def decode_curve_features(batches: list[list[int]], sizes: tuple[int, ...]) -> np.ndarray:
    """(N, 1 + len(sizes)): the summed contexts, then each size's share of the batch size
    (linear interpolation weights: the curve's value at a batch is their dot product).
    Without sizes: the line's features (decode_features)."""
    if not sizes:
        return decode_features(batches)
    counts = np.array([len(b) for b in batches], dtype=float)
    hats = np.stack([np.interp(counts, sizes, np.eye(len(sizes))[k]) for k in range(len(sizes))])
    return np.column_stack([[float(sum(b)) for b in batches], hats.T])


def fit_decode_curve(
    batches: list[list[int]], times_ms: np.ndarray, sizes: tuple[int, ...]
) -> tuple[Coefficients, tuple[tuple[int, float], ...], float]:
    """Decode steps -> (the line a, b, c; the curve by batch size; RMS relative error).

    The curve and b come from one fit; a and c are then the straight line through the same
    steps with that b (relative error again), which is what the profile's readers and the tools
    that take a line see. Without sizes (decode_curve_sizes) the line is the model."""
    if not sizes:
        line, err = fit_relative(decode_features(batches), times_ms)
        return line, (), err
    coef, err = fit_nonnegative(decode_curve_features(batches, sizes), times_ms)
    counts = np.array([len(b) for b in batches], dtype=float)
    rest = times_ms - coef[0] * np.array([float(sum(b)) for b in batches])
    line, *_ = np.linalg.lstsq(np.column_stack([np.ones_like(counts), counts]) / times_ms[:, None],
                               rest / times_ms, rcond=None)  # fmt: skip
    a, c = np.clip(line, 0, None)
    curve = tuple((int(n), float(ms)) for n, ms in zip(sizes, coef[1:], strict=True))
    return Coefficients(float(a), float(coef[0]), float(c)), curve, err


def solo_work_ms(shared_ms: np.ndarray, contention: float) -> np.ndarray:
    """Steps that shared a node -> their work at solo speed.

    shared_ms (N, K): ms each step spent while k = 0..K-1 other instances were mid-step. Under
    processor sharing (placement/simulator.py) a step advances at 1 / (1 + contention * k).
    """
    k = np.arange(shared_ms.shape[1])
    return shared_ms @ (1.0 / (1.0 + contention * k))


def fit_contention(
    groups: list[tuple[np.ndarray, np.ndarray]], grid: np.ndarray | None = None
) -> tuple[float, list[np.ndarray]]:
    """One node contention for all groups, and each group's step works at it.

    groups: [(features (N, F), shared_ms (N, K))], e.g. prefill steps and decode steps of the
    instances of one machine. The contention is the machine's, not the phase's, so one value
    serves all groups: the grid value whose solo-speed works the latency model fits best.
    -> (contention, each group's solo-speed step works at it: the caller fits its model).
    """
    grid = np.linspace(0.0, 1.0, 101) if grid is None else grid
    best: tuple[float, float, list] | None = None
    for contention in grid:
        works = [solo_work_ms(s, contention) for _, s in groups]
        errs = [fit_nonnegative(f, w)[1] for (f, _), w in zip(groups, works, strict=True)]
        sq = sum(err**2 * len(f) for err, (f, _) in zip(errs, groups, strict=True))
        if best is None or sq < best[0]:
            best = (sq, float(contention), works)
    assert best is not None
    return best[1], best[2]
