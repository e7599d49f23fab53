"""Where a CPU decode step should take the few-rows Linear forward (kvkernels/few_rows.py),
measured on this host with the model's own matrices.

`W @ x^T` streams each weight matrix once for a few rows; whether that beats `x @ W^T` depends
on the host's BLAS paths and memory: 1.5x faster at one row on 2026-11-22's host, 2x slower on
2026-12-05's first (Intel, AMX), 1.5-1.9x faster at 2-4 rows on its second (AMD). So both
orientations are timed, interleaved, at each row count of HEAD_ROWS and LAYER_ROWS, and the
few-rows forward is kept only where it won by MARGIN.

The answer is kept per host boot, torch version, thread count, the matrices' shapes and
dtypes and the method's settings, in the cache (SPLITSERVE_CACHE/few_rows.json): a replica
that starts later reads it rather than measuring while its neighbours load. `make model`
measures the default model at one thread (the replicas' setting) ahead of time:

    python -m engine.linear_tuning [--threads 1]   # prints the default model's choice
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.model_store import cache_root
from kvkernels.few_rows import FewRows, candidates, few_rows_linear

logger = logging.getLogger(__name__)

MARGIN = 0.05  # the few-rows forward must be this much faster: the plain one is the default
# the row counts timed, past the limits 2026-11-22's host set (LM head 8, layers 3): where
# the orientations break even depends on the host (2026-12-05's AMD host: the layers' few-rows
# forward won up to 5 rows, the LM head's up to 8); a batch past these decodes plainly
HEAD_ROWS = range(1, 17)
LAYER_ROWS = range(1, 9)
ROUNDS = 3  # timed rounds (after one that warms up); the median of each is compared
# what each kind's pass reads: past any last-level cache, so a pass reads memory as a decode
# step does, without reading a large model's whole weights (or its 2 GB vocabulary matrix) 24
# or 64 times; a matrix past it is timed on its first rows (a contiguous view)
MEASURED_BYTES = 256 << 20
CACHE_FILE = "few_rows.json"

_VARIANTS: dict[str, Callable] = {"plain": F.linear, "few_rows": few_rows_linear}
_known: dict[str, FewRows] = {}  # this process's answers, by key


def faster_rows(timings: dict[int, tuple[float, float]], margin: float = MARGIN) -> frozenset:
    """Row counts whose (plain, few-rows) median times favour the few-rows forward by `margin`."""
    return frozenset(r for r, (plain, few) in timings.items() if few < plain * (1 - margin))


def measure(model: nn.Module, rounds: int = ROUNDS) -> tuple[FewRows, dict]:
    """Time both forwards on the model's LM head and layers -> (the choice, the medians in ms
    by kind and row count)."""
    heads, layers = candidates(model)
    report = {
        "head": _timings(_weights(heads), HEAD_ROWS, rounds),
        "layers": _timings(_weights(layers), LAYER_ROWS, rounds),
    }
    return FewRows(faster_rows(report["head"]), faster_rows(report["layers"])), report


def _weights(linears: list[nn.Linear]) -> list[torch.Tensor]:
    """The matrices a pass reads, MEASURED_BYTES in all at most."""
    picked, left = [], MEASURED_BYTES
    for linear in linears:
        weight = linear.weight.detach()
        row_bytes = weight[0].nbytes
        if left < row_bytes:
            break
        picked.append(weight[: left // row_bytes])
        left -= picked[-1].nbytes
    return picked


@torch.no_grad()
def _timings(weights: list[torch.Tensor], rows: Iterable[int], rounds: int) -> dict:
    """row count -> (plain ms, few-rows ms): medians of `rounds` passes over `weights`, the
    two forwards alternating so that a busy neighbour slows both alike."""
    if not weights:
        return {}
    samples: dict[tuple[int, str], list[float]] = {}
    for round_ in range(rounds + 1):
        for r in rows:
            inputs = {w.shape[1]: torch.randn(r, w.shape[1], dtype=w.dtype) for w in weights}
            for name, forward in _VARIANTS.items():
                start = time.perf_counter()
                for w in weights:
                    forward(inputs[w.shape[1]], w, None)
                if round_:  # the first round warms up
                    samples.setdefault((r, name), []).append(time.perf_counter() - start)
    return {
        r: tuple(statistics.median(samples[r, name]) * 1e3 for name in _VARIANTS)
        for r in sorted({r for r, _ in samples})
    }


def cache_file() -> Path:
    """Where the answers are kept: read by every replica, written by the first to measure."""
    return cache_root() / CACHE_FILE


def tuned(model: nn.Module, cache: Path | None = None) -> FewRows:
    """This host's choice for `model`: known to this process, kept in `cache`, or measured now
    (and kept there; a cache that cannot be written only costs the next process a measurement)."""
    heads, layers = candidates(model)
    key = _key(heads + layers)
    if key in _known:
        return _known[key]
    stored = _read(cache).get(key) if cache else None
    if stored is None:
        rows, report = measure(model)
        logger.info("few-rows forward at %s (measured: %s)", rows, report)
        if cache:
            _keep(cache, key, rows, report)
    else:
        rows = FewRows(frozenset(stored["head"]), frozenset(stored["layers"]))
    _known[key] = rows
    return rows


def _key(linears: list[nn.Linear]) -> str:
    shapes = repr([(tuple(m.weight.shape), str(m.weight.dtype)) for m in linears])
    method = repr((HEAD_ROWS, LAYER_ROWS, MEASURED_BYTES, MARGIN))  # a new method asks again
    digest = hashlib.sha1((shapes + method).encode()).hexdigest()[:16]
    return f"{_boot()}/torch-{torch.__version__}/threads-{torch.get_num_threads()}/{digest}"


def _boot() -> str:
    """This boot of this machine: an answer holds for the hardware it was measured on."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return os.uname().nodename


def _read(path: Path) -> dict:
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return stored if isinstance(stored, dict) else {}


def _keep(path: Path, key: str, rows: FewRows, report: dict) -> None:
    """Add the answer to the file (written whole, then renamed: a concurrent reader sees the old
    file or the new one), dropping other boots' answers."""
    boot = key.split("/", 1)[0]
    entries = {k: v for k, v in _read(path).items() if k.startswith(boot + "/")}
    entries[key] = {"head": sorted(rows.head), "layers": sorted(rows.layers), "ms": report}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False) as f:
            json.dump(entries, f, indent=1)
        os.replace(f.name, path)
    except OSError as e:
        logger.warning("could not keep the few-rows choice in %s: %s", path, e)


def main(argv: list[str] | None = None) -> None:
    """Measures (or reads) the default model's choice, as a replica with `--threads` would."""
    from engine import EngineConfig, LLMEngine

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    engine = LLMEngine(EngineConfig(num_threads=args.threads, num_kv_blocks=16))
    # the runner has just measured or read the choice; run as __main__, this module is not the
    # one it imported (another `_known`), so the answer is read where the runner kept it
    rows = tuned(engine.runner.model, cache_file())
    print(f"few-rows forward: LM head at {sorted(rows.head)} rows, layers at {sorted(rows.layers)}")


if __name__ == "__main__":
    main()
