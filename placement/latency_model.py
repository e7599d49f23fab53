"""Latency model of one (model, device, TP, PP) instance, and the profile YAML that holds it.

    prefill step ms = a + b * sum(prompt lengths) + c * sum(prompt lengths ** 2)
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

An optional top-level `node_contention` (default 0) says how much the instances of one machine
slow each other: a step runs (1 + node_contention * k) times slower while k other instances on
the node are mid-step (see placement/simulator.py). CPUs share cores' memory bandwidth and
caches (the profiler measures it); GPUs that each instance owns do not: leave it at 0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import yaml


@dataclass(frozen=True)
class Coefficients:
    a: float
    b: float
    c: float

    def __post_init__(self) -> None:
        if min(self.a, self.b, self.c) < 0:
            raise ValueError(f"latency coefficients must be >= 0, got {self}")


@dataclass(frozen=True)
class Entry:
    tp: int
    pp: int
    prefill: Coefficients
    decode: Coefficients
    kv_capacity_tokens: int

    def prefill_ms(self, prompt_lens: list[int]) -> float:
        lens = np.asarray(prompt_lens, dtype=float)
        p = self.prefill
        return p.a + p.b * lens.sum() + p.c * (lens**2).sum()

    def decode_ms(self, context_lens: list[int]) -> float:
        d = self.decode
        return d.a + d.b * float(sum(context_lens)) + d.c * len(context_lens)


@dataclass(frozen=True)
class Profile:
    model: str
    device: str
    entries: list[Entry] = field(default_factory=list)
    node_contention: float = 0.0

    def __post_init__(self) -> None:
        if self.node_contention < 0:
            raise ValueError(f"node_contention must be >= 0, got {self.node_contention}")

    def entry(self, tp: int = 1, pp: int = 1) -> Entry:
        for e in self.entries:
            if (e.tp, e.pp) == (tp, pp):
                return e
        raise KeyError(f"profile {self.model}/{self.device} has no entry for tp={tp}, pp={pp}")

    def to_yaml(self) -> str:
        return yaml.safe_dump(asdict(self), sort_keys=False)

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
                )
                for e in data["entries"]
            ]
            contention = float(data.get("node_contention", 0.0))
            return cls(str(data["model"]), str(data["device"]), entries, contention)
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed profile: {e!r}") from e


def fit_relative(features: np.ndarray, times_ms: np.ndarray) -> tuple[Coefficients, float]:
    """Least squares on relative error, coefficients kept >= 0.

    features (N, 3), times (N,) -> (coefficients, RMS relative error of the fit). Dividing each
    row by its time makes a 10 ms step as important as a 1 s step. A coefficient that comes out
    negative (noise on a term that does not matter) is fixed at 0 and the rest refitted.
    """
    x = features / times_ms[:, None]
    y = np.ones(len(times_ms))
    active = [0, 1, 2]
    while True:
        sol, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
        if (sol >= 0).all() or len(active) == 1:
            break
        active.pop(int(np.argmin(sol)))
    coef = np.zeros(3)
    coef[active] = np.clip(sol, 0, None)
    rel = (features @ coef - times_ms) / times_ms
    return Coefficients(*map(float, coef)), float(np.sqrt(np.mean(rel**2)))


def prefill_features(batches: list[list[int]]) -> np.ndarray:
    return np.array([[1.0, sum(b), sum(n * n for n in b)] for b in batches])


def decode_features(batches: list[list[int]]) -> np.ndarray:
    return np.array([[1.0, sum(b), len(b)] for b in batches])


def solo_work_ms(shared_ms: np.ndarray, contention: float) -> np.ndarray:
    """Steps that shared a node -> their work at solo speed.

    shared_ms (N, K): ms each step spent while k = 0..K-1 other instances were mid-step. Under
    processor sharing (placement/simulator.py) a step advances at 1 / (1 + contention * k).
    """
    k = np.arange(shared_ms.shape[1])
    return shared_ms @ (1.0 / (1.0 + contention * k))


def fit_contention(
    groups: list[tuple[np.ndarray, np.ndarray]], grid: np.ndarray | None = None
) -> tuple[float, list[tuple[Coefficients, float]]]:
    """One node contention for all groups, and each group's coefficients at it.

    groups: [(features (N, 3), shared_ms (N, K))], e.g. prefill steps and decode steps of the
    instances of one machine. The contention is the machine's, not the phase's, so one value
    serves all groups: the grid value whose solo-speed works the latency model fits best.
    -> (contention, [(coefficients, RMS relative error)] per group).
    """
    grid = np.linspace(0.0, 1.0, 101) if grid is None else grid
    best: tuple[float, float, list] | None = None
    for contention in grid:
        fits = [fit_relative(f, solo_work_ms(s, contention)) for f, s in groups]
        sq = sum(err**2 * len(f) for (_, err), (f, _) in zip(fits, groups, strict=True))
        if best is None or sq < best[0]:
            best = (sq, float(contention), fits)
    assert best is not None
    return best[1], best[2]
