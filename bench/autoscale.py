"""Autoscaling under a stepped request rate, against the fixed 1P1D deployment.

    python -m bench.autoscale --out bench/results/autoscale --profile profile.yaml \\
        --schedule 0.15:60 0.6:90 0.15:90 --input-len 512 --output-len 64

Each configuration runs the same open-loop schedule of Poisson segments (rate:seconds) on a
private local Ray cluster: `autoscaled` (prefill and decode each 1..2 replicas on their own
policy, targets = the headline SLO of the goodput experiment, coefficients from the profile)
and `fixed-1p1d`. Replica counts are sampled every second; the plot shows them with the P90
TTFT and TPOT of the requests arriving in each time window; the summary gives each
configuration's SLO attainment over the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
from pathlib import Path

import numpy as np

from bench.experiment import Cluster, app_args, merge
from bench.loadgen import LoadRequest, run
from bench.metrics import SLO, RequestRecord, attainment, percentiles

PUSH_INTERVAL_ENV = {"RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1"}


class ReplicaWatcher:
    """Samples (seconds since start, RUNNING replicas per deployment) of one Serve app."""

    def __init__(self, app: str, names=("PrefillServer", "DecodeServer"), period_s=1.0):
        import time

        self.app, self.names, self.period_s = app, names, period_s
        self.samples: list[tuple[float, dict[str, int]]] = []
        self._t0 = time.monotonic()
        self._clock = time.monotonic
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from deployments.serve_status import applications

        while not self._stop.is_set():  # not serve.status(): its CPU is the benchmark's
            deployments = applications()[self.app].deployments
            counts = {n: deployments[n].running for n in self.names}
            self.samples.append((self._clock() - self._t0, counts))
            self._stop.wait(self.period_s)

    def series(self, name: str) -> list[int]:
        return [counts[name] for _, counts in self.samples]

    def max(self, name: str) -> int:
        return max(self.series(name))

    def __enter__(self) -> ReplicaWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def stepped_arrivals(schedule: list[tuple[float, float]], seed: int = 0) -> list[float]:
    """Poisson arrivals (seconds) through consecutive (rate, duration) segments."""
    rng = np.random.default_rng(seed)
    arrivals, start = [], 0.0
    for rate, duration in schedule:
        t = start + rng.exponential(1 / rate)
        while t < start + duration:
            arrivals.append(float(t))
            t += rng.exponential(1 / rate)
        start += duration
    return arrivals


def autoscaled_args(profile: str, slo: SLO, max_replicas: int = 2) -> dict:
    from placement.latency_model import Profile

    entry = Profile.load(profile).entry(1, 1)

    def scaling(coef, **target) -> dict:
        return {
            "min_replicas": 1,
            "max_replicas": max_replicas,
            "upscale_delay_s": 5.0,
            "downscale_delay_s": 20.0,
            "look_back_period_s": 5.0,
            "latency": {"a": coef.a, "b": coef.b, "c": coef.c},
            **target,
        }

    return merge(
        app_args("disagg-1p1d"),
        {
            "prefill": {"autoscaling": scaling(entry.prefill, ttft_target_ms=slo.ttft_s * 1e3)},
            "decode": {"autoscaling": scaling(entry.decode, tpot_target_ms=slo.tpot_s * 1e3)},
        },
    )


def windows(records: list[RequestRecord], t0: float, width_s: float) -> list[dict]:
    """P90 TTFT / TPOT of the requests arriving in each window."""
    by_window: dict[int, list[RequestRecord]] = {}
    for r in records:
        by_window.setdefault(int((r.arrival_s - t0) // width_s), []).append(r)
    return [
        {
            "t_s": (w + 0.5) * width_s,
            "ttft_p90_s": percentiles([r.ttft_s for r in rs], (90,))["p90"],
            "tpot_p90_s": percentiles([r.tpot_s for r in rs], (90,))["p90"],
            "requests": len(rs),
        }
        for w, rs in sorted(by_window.items())
    ]


def run_config(
    cluster: Cluster, args: dict, requests: list[LoadRequest], model: str | None
) -> dict:
    cluster.deploy(args)
    try:
        with ReplicaWatcher(cluster.APP) as watch:
            span = requests[-1].arrival_s
            records, _ = asyncio.run(run(cluster.url, model, requests, 2 * span + 300))
    finally:
        cluster.undeploy()
    return {"records": records, "replicas": watch.samples}


def plot(results: dict, schedule, slo: SLO, out: Path, width_s: float) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    for i, (name, res) in enumerate(results.items()):
        ts = [t for t, _ in res["replicas"]]
        for j, dep in enumerate(("PrefillServer", "DecodeServer")):
            counts = [c[dep] for _, c in res["replicas"]]
            style = "-" if j == 0 else "--"
            axes[0].step(ts, np.array(counts) + 0.04 * i, style, color=f"C{i}", where="post",
                         label=f"{name} {dep.removesuffix('Server').lower()}")  # fmt: skip
        t0 = min(r.arrival_s for r in res["records"])
        rows = windows(res["records"], t0, width_s)
        axes[1].plot([w["t_s"] for w in rows], [w["ttft_p90_s"] for w in rows], "o-",
                     color=f"C{i}", label=name)  # fmt: skip
        axes[2].plot([w["t_s"] for w in rows], [w["tpot_p90_s"] * 1e3 for w in rows], "o-",
                     color=f"C{i}", label=name)  # fmt: skip
    axes[1].axhline(slo.ttft_s, color="gray", ls=":", label="TTFT SLO")
    axes[2].axhline(slo.tpot_s * 1e3, color="gray", ls=":", label="TPOT SLO")
    edges = np.cumsum([0] + [d for _, d in schedule])
    for ax in axes:
        for e in edges[1:-1]:
            ax.axvline(e, color="k", lw=0.5, alpha=0.3)
    rates = " -> ".join(f"{r:g}" for r, _ in schedule)
    axes[0].set(ylabel="running replicas", title=f"request rate {rates} req/s")
    axes[1].set(ylabel="P90 TTFT (s)", yscale="log")
    axes[2].set(ylabel="P90 TPOT (ms)", xlabel="time since start (s), by arrival")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "autoscale.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    from bench.report import DEFAULT_GRID, slo_unit_from_profile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--profile", required=True)
    parser.add_argument("--schedule", nargs="+", default=["0.15:60", "0.6:90", "0.15:90"])
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--window-s", type=float, default=30.0)
    parser.add_argument("--model", help="the served name; default: the first /v1/models lists")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    schedule = [tuple(map(float, s.split(":"))) for s in args.schedule]
    slo = slo_unit_from_profile(args.profile, args.input_len, args.output_len).scaled_each(
        *DEFAULT_GRID["headline"]
    )
    rng = np.random.default_rng(args.seed + 1)
    requests = [
        LoadRequest(t, rng.integers(100, 49_000, args.input_len).tolist(), args.output_len)
        for t in stepped_arrivals(schedule, args.seed)
    ]
    configs = {
        "autoscaled": autoscaled_args(args.profile, slo),
        "fixed-1p1d": app_args("disagg-1p1d"),
    }
    results = {}
    with Cluster(env=PUSH_INTERVAL_ENV) as cluster:
        for name, app in configs.items():
            print(f"{name}: {len(requests)} requests", flush=True)
            results[name] = run_config(cluster, app, requests, args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        name: {
            "attainment": attainment(res["records"], slo),
            "errors": sum(not r.ok for r in res["records"]),
            "max_prefill_replicas": max(c["PrefillServer"] for _, c in res["replicas"]),
            "max_decode_replicas": max(c["DecodeServer"] for _, c in res["replicas"]),
        }
        for name, res in results.items()
    }
    raw = {
        name: {
            "replicas": res["replicas"],
            "windows": windows(
                res["records"], min(r.arrival_s for r in res["records"]), args.window_s
            ),
        }
        for name, res in results.items()
    }
    report = {"schedule": schedule, "slo": vars(slo), "summary": summary, "series": raw}
    (out / "autoscale.json").write_text(json.dumps(report, indent=1))
    plot(results, schedule, slo, out, args.window_s)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
