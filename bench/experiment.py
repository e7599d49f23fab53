"""Goodput experiment: each serving configuration on this machine, the same sweep each.

    python -m bench.experiment --out bench/results/goodput-512-64 --profile profile.yaml \\
        --configs disagg-1p1d coloc-2 chunked-2 --rates 0.15 0.25 0.35 0.5 0.65 \\
        --num-requests 30 --input-len 512 --output-len 64
    python -m bench.experiment --out bench/results/goodput-sharegpt --dataset sharegpt ...

Every configuration runs the same number of engine threads (one torch thread per engine, two
engines), so they share the machine's cores on equal terms. A private local Ray cluster is
started for the run and shut down after it; configurations are deployed with Serve from
serve_config.yaml's args plus each configuration's overrides, taking turns rate by rate
(`--order interleaved`, the default) or one whole sweep after another. A sweep stops
early once attainment at the loosest SLO of the grid falls below the target (higher rates
cannot add goodput), then bisects the headline SLO's crossing. The report (bench/report.py)
keeps every request's timings, so any SLO can be evaluated again afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import dataclasses
import json
import os
import platform
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from bench import host
from bench.loadgen import (
    LoadRequest,
    add_workload_args,
    dataset_items,
    make_requests,
    run,
    sampling_of,
    workload_of,
)
from bench.metrics import SLO, RequestRecord, attainment
from deployments.serve_env import (
    CONTROLLER_ENV,
    free_ports,
    process_env,
    serve_env,
    start_serve,
)

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Configuration:
    description: str
    colocated: bool
    overrides: dict  # merged into the base config's args
    caches_prefixes: bool = True  # when the workload shares prefixes (False: a baseline)
    base_config: str = "serve_config.yaml"  # the repository's file it starts from
    gpus: int = 0  # GPUs it computes on; 0: CPU engines, counted by their threads
    # Ray Serve's front-end mode (deployments/serve_env.py): a setting each Ray process reads
    # once, when it starts, so a configuration in another mode runs on a cluster of its own
    serve_mode: str = "default"

    @property
    def cores(self) -> int:
        """What the configuration computes on, the unit of "per core" in the report: its
        engines' threads, or its GPUs."""
        if self.gpus:
            return self.gpus
        phases = ("colocated",) if self.colocated else ("prefill", "decode")
        return sum(
            self.overrides[p].get("num_replicas", 1) * self.overrides[p]["engine"]["num_threads"]
            for p in phases
        )


def _phase(replicas: int, **engine) -> dict:
    # no prefix caching (serve_config.yaml has it on) unless the workload shares prefixes
    # (app_args): dataset prompts drawn twice would measure the cache rather than the layout,
    # and the recorded results predate it
    engine = {"num_threads": 1, "enable_prefix_caching": False, **engine}
    return {"num_replicas": replicas, "num_cpus": 1, "engine": engine}


CONFIGURATIONS = {
    "disagg-1p1d": Configuration(
        "disaggregated: 1 prefill + 1 decode replica, 1 thread each",
        False,
        {"mode": "disaggregated", "prefill": _phase(1), "decode": _phase(1)},
    ),
    "disagg-1p1d-nocache": Configuration(
        "disaggregated: 1 prefill + 1 decode replica, 1 thread each, no prefix caching even "
        "for a workload with shared prefixes (what the cache is worth)",
        False,
        {"mode": "disaggregated", "prefill": _phase(1), "decode": _phase(1)},
        caches_prefixes=False,
    ),
    "coloc-2": Configuration(
        "colocated (vLLM-style continuous batching): 2 replicas, 1 thread each",
        True,
        {"mode": "colocated", "colocated": _phase(2, kv_cache_memory_mb=1024)},
    ),
    "chunked-2": Configuration(
        "colocated with chunked prefill (256-token budget): 2 replicas, 1 thread each",
        True,
        {
            "mode": "colocated",
            "colocated": _phase(
                2, kv_cache_memory_mb=1024, chunked_prefill=True, max_num_batched_tokens=256
            ),
        },
    ),
    "coloc-1x2": Configuration(
        "colocated: 1 replica with 2 threads",
        True,
        {"mode": "colocated", "colocated": _phase(1, num_threads=2, kv_cache_memory_mb=1024)},
    ),
}


def merge(base: dict, overrides: dict) -> dict:
    """Deep merge: dicts merge key by key, anything else in overrides replaces."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# what the front end carries (with --serve-model from bench.tiny_model, engines fast enough to
# stream a GPU's tokens per second): disagg-1p1d with its tokens joined, a second ingress, and
# Ray Serve's high-throughput front-end modes (deployments/serve_env.py)
_DISAGG = CONFIGURATIONS["disagg-1p1d"].overrides
_BATCHED = merge(_DISAGG, {"decode": {"stream_batching_interval_ms": 50}})
CONFIGURATIONS |= {
    "disagg-1p1d-batched": Configuration(
        "as disagg-1p1d, the decode replica sending a request's tokens once per 50 ms",
        False, _BATCHED,
    ),
    "disagg-1p1d-2ingress": Configuration(
        "as disagg-1p1d, with 2 ingress replicas",
        False, merge(_DISAGG, {"ingress": {"num_replicas": 2}}),
    ),
}  # fmt: skip


def _gpu_phase(share: float, **engine) -> dict:
    # one GPU in all: each configuration's replicas split it (Ray's fractional GPUs)
    return {"num_replicas": 1, "num_gpus": share, "engine": engine}


# on one GPU (serve_config_gpu.yaml: fp32, KV over CUDA IPC, decode steps from CUDA graphs)
_GPU_DISAGG = {"mode": "disaggregated", "prefill": _gpu_phase(0.5), "decode": _gpu_phase(0.5)}
_GPU_BATCHED = merge(_GPU_DISAGG, {"decode": {"stream_batching_interval_ms": 50}})
_GPU_COLOC = {"kv_cache_memory_mb": 16384, "max_num_seqs": 256, "max_num_batched_tokens": 8192}
CONFIGURATIONS |= {
    "gpu-disagg-1p1d": Configuration(
        "one GPU, disaggregated: 1 prefill + 1 decode replica sharing it, KV over CUDA IPC",
        False, _GPU_DISAGG, base_config="serve_config_gpu.yaml", gpus=1,
    ),
    "gpu-disagg-1p1d-eager": Configuration(
        "as gpu-disagg-1p1d, every step launched eagerly (no CUDA graphs)",
        False,
        merge(_GPU_DISAGG, {p: {"engine": {"enforce_eager": True}} for p in ("prefill", "decode")}),
        base_config="serve_config_gpu.yaml", gpus=1,
    ),
    "gpu-disagg-1p1d-batched": Configuration(
        "as gpu-disagg-1p1d, the decode replica sending a request's tokens once per 50 ms "
        "(stream batching: fewer items through the ingress and the proxy)",
        False, _GPU_BATCHED, base_config="serve_config_gpu.yaml", gpus=1,
    ),
    "gpu-disagg-1p1d-4ingress": Configuration(
        "as gpu-disagg-1p1d, with 4 ingress replicas (the streams' chunks spread over them)",
        False, merge(_GPU_DISAGG, {"ingress": {"num_replicas": 4}}),
        base_config="serve_config_gpu.yaml", gpus=1,
    ),
    "gpu-coloc-1": Configuration(
        "one GPU, colocated (vLLM-style continuous batching): 1 replica",
        True, {"mode": "colocated", "colocated": _gpu_phase(1, **_GPU_COLOC)},
        base_config="serve_config_gpu.yaml", gpus=1,
    ),
    "gpu-chunked-1": Configuration(
        "one GPU, colocated with chunked prefill (512-token budget): 1 replica",
        True,
        {"mode": "colocated", "colocated": _gpu_phase(
            1, **{**_GPU_COLOC, "chunked_prefill": True, "max_num_batched_tokens": 512}
        )},
        base_config="serve_config_gpu.yaml", gpus=1,
    ),
}  # fmt: skip


def _in_serve_modes(names: tuple[str, ...]) -> dict[str, Configuration]:
    """Each of `names` again in Ray Serve's high-throughput front-end modes: `<name>-tput` and
    `<name>-haproxy` (deployments/serve_env.py), the same app on a cluster in that mode."""
    return {
        f"{name}-{suffix}": dataclasses.replace(
            CONFIGURATIONS[name],
            description=f"as {name}, in Ray Serve's {mode} front-end mode",
            serve_mode=mode,
        )
        for name in names
        for suffix, mode in (("tput", "throughput"), ("haproxy", "haproxy"))
    }


CONFIGURATIONS |= _in_serve_modes(
    ("disagg-1p1d", "disagg-1p1d-batched", "gpu-disagg-1p1d", "gpu-disagg-1p1d-batched")
)


def app_args(name: str, prefix_caching: bool = False, model: str | None = None) -> dict:
    """`name`'s serve args; `prefix_caching` turns it on in every phase (a workload whose
    prompts share prefixes: serving them is what the cache is for); `model` (a directory)
    serves that model instead of the base config's."""
    base_config = REPO / CONFIGURATIONS[name].base_config
    base = yaml.safe_load(base_config.read_text())["applications"][0]["args"]
    args = merge(base, CONFIGURATIONS[name].overrides)
    if model is not None:
        args["model"] = model
    if prefix_caching and CONFIGURATIONS[name].caches_prefixes:
        for phase in ("prefill", "decode", "colocated"):
            args[phase]["engine"]["enable_prefix_caching"] = True
    return args


# An ingress replica that takes HTTP itself (the throughput and haproxy modes) stays open 30 s
# when stopped, so that a load balancer outside the cluster can let it go; a private cluster is
# stopped whole, between runs, and its HAProxy retries a refused connection: 30 s lost a stop.
QUICK_DRAIN = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}


class Cluster:
    """A private local Ray cluster with Serve on a free port; one application at a time."""

    APP = "bench"

    def __init__(
        self,
        env: dict[str, str] | None = None,
        num_cpus: int = 8,
        serve_mode: str = "default",
    ) -> None:
        self.env = {"TOKENIZERS_PARALLELISM": "false", **(env or {})}
        self.num_cpus = num_cpus  # logical: replicas ask for 1 each; threads are set per engine
        self.serve_mode = serve_mode  # deployments/serve_env.py: for the cluster's processes

    def __enter__(self) -> Cluster:
        import ray

        self._temp = tempfile.mkdtemp(prefix="splitserve-ray-")  # outside any working_dir
        # a `kill` (SIGTERM) would end the process without __exit__, leaving Ray's agents
        # running; as SystemExit it unwinds through here and shuts the cluster down
        self._sigterm = None
        if threading.current_thread() is threading.main_thread():
            self._sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        # the raylet, and through it the controller, proxy and replicas, inherit this
        # process's environment (no runtime_env: a worker with one starts through a second
        # Python process, deployments/serve_env.py); this process keeps its own (ray.serve
        # read it on import: its handles stay the ones a plain driver has)
        env = serve_env(self.serve_mode, own_ports=True) | QUICK_DRAIN | CONTROLLER_ENV
        with process_env(env | self.env):
            ray.init(
                address="local",
                num_cpus=self.num_cpus,
                include_dashboard=False,
                _temp_dir=self._temp,
            )
            try:
                [port] = free_ports(1)
                self.url = f"http://127.0.0.1:{port}"
                start_serve(port)
            except BaseException:
                # no __exit__ follows a failed __enter__: a cluster left up here made the
                # next module's ray.init fail too
                self.__exit__(None, None, None)
                raise
        return self

    def deploy(self, args: dict, timeout_s: float = 600) -> None:
        from ray import serve

        from app.builder import build_app
        from deployments.serve_status import applications

        serve.run(build_app(args), name=self.APP, route_prefix="/", blocking=False)
        deadline = time.monotonic() + timeout_s
        while (state := applications().get(self.APP)) is None or state.status != "RUNNING":
            if time.monotonic() > deadline:
                raise TimeoutError(f"application did not start: {serve.status()}")
            time.sleep(1)

    def undeploy(self) -> None:
        from ray import serve

        serve.delete(self.APP)

    def __exit__(self, *exc) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        if self._sigterm is not None:
            signal.signal(signal.SIGTERM, self._sigterm)


def _exit_on_sigterm(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


class Clusters:
    """The cluster each turn runs on: one for the whole run, started again whenever a
    configuration's Serve settings differ from those it runs with (each Ray process reads
    them once, when it starts)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.current: Cluster | None = None

    def for_config(self, name: str) -> Cluster:
        mode = CONFIGURATIONS[name].serve_mode
        if self.current is None or self.current.serve_mode != mode:
            self.close()
            self.current = Cluster(self.env, serve_mode=mode).__enter__()
        return self.current

    def close(self) -> None:
        if self.current is not None:
            self.current, cluster = None, self.current
            cluster.__exit__(None, None, None)


@dataclass
class RatePoint:
    rate: float
    duration_s: float
    records: list[RequestRecord]
    started_s: float | None = None  # wall clock (the step traces' clock) when sending began
    host: dict | None = None  # bench.host.probe() just before, + steal_share during the point

    def to_json(self) -> dict:
        t0 = min(r.arrival_s for r in self.records)
        rows = [
            [
                r.arrival_s - t0,
                None if r.first_token_s is None else r.first_token_s - t0,
                None if r.last_token_s is None else r.last_token_s - t0,
                r.num_output_tokens,
                r.num_prompt_tokens,
                r.error,
            ]
            for r in self.records
        ]
        point = {"rate": self.rate, "duration_s": self.duration_s, "records": rows}
        if self.started_s is not None:
            point["started_s"] = self.started_s
        return point if self.host is None else {**point, "host": self.host}


class Sweep:
    """One configuration's rates, one at a time: ascending until even the loosest SLO fails,
    then `bisect` more between the headline SLO's last pass and first fail. Measuring is the
    caller's: the experiment interleaves several configurations' sweeps point by point."""

    def __init__(
        self, rates: list[float], headline: SLO, loosest: SLO, target: float = 0.9, bisect: int = 0
    ) -> None:
        self.pending = sorted(rates)
        self.headline, self.loosest, self.target, self.bisect = headline, loosest, target, bisect
        self.points: list[RatePoint] = []

    def next_rate(self) -> float | None:
        if self.pending:
            return self.pending[0]
        if self.bisect <= 0:
            return None
        passing = [p.rate for p in self.points if self._passes(p, self.headline)]
        failing = [p.rate for p in self.points if not self._passes(p, self.headline)]
        low = max(passing, default=0.0)
        above = [r for r in failing if r > low]
        if not above:
            return None
        return round((low + min(above)) / 2, 4) if low else round(min(above) / 2, 4)

    def add(self, point: RatePoint) -> None:
        self.points.append(point)
        if self.pending and point.rate == self.pending[0]:
            self.pending.pop(0)
            if not self._passes(point, self.loosest):
                self.pending.clear()  # higher rates cannot add goodput
        else:
            self.bisect -= 1

    def _passes(self, point: RatePoint, slo: SLO) -> bool:
        return attainment(point.records, slo) >= self.target

    def sorted_points(self) -> list[RatePoint]:
        return sorted(self.points, key=lambda p: p.rate)


def measure(
    send: Callable[[float], tuple[list[RequestRecord], float]],
    sweep: Sweep,
    rate: float,
    log: Callable[[str], None] = print,
    probe: Callable[[], dict[str, float]] | None = None,
) -> RatePoint:
    """Send one rate's requests and add the point to its sweep; with `probe`, the host's
    condition (bench.host) is measured just before sending and its steal share during it."""
    condition = probe() if probe is not None else None
    cpu_before = host.read_cpu_times() if condition is not None else None
    started = time.time()
    records, duration = send(rate)
    if condition is not None:
        condition["steal_share"] = host.steal_share(cpu_before, host.read_cpu_times())
    point = RatePoint(rate, duration, records, started, condition)
    sweep.add(point)
    log(
        f"  rate {rate:.3f}/s: attainment {attainment(records, sweep.headline):.2f} "
        f"(loosest {attainment(records, sweep.loosest):.2f}), "
        f"errors {sum(not r.ok for r in records)}" + _host_text(condition)
    )
    return point


def _host_text(condition: dict | None) -> str:
    if condition is None:
        return ""
    steal = condition["steal_share"]
    steal_text = "" if steal is None else f", steal {100 * steal:.1f}%"
    return f"; host copy {condition['copy_gbs']:.1f} GB/s{steal_text}"


def sweep(
    send: Callable[[float], tuple[list[RequestRecord], float]],
    rates: list[float],
    headline: SLO,
    loosest: SLO,
    target: float = 0.9,
    bisect: int = 0,
    log: Callable[[str], None] = print,
) -> list[RatePoint]:
    """One configuration's whole sweep against one `send` (see Sweep)."""
    state = Sweep(rates, headline, loosest, target, bisect)
    while (rate := state.next_rate()) is not None:
        measure(send, state, rate, log)
    return state.sorted_points()


def _send(url: str, model: str | None, make: Callable[[float], list[LoadRequest]]):
    def send(rate: float) -> tuple[list[RequestRecord], float]:
        requests = make(rate)
        span = requests[-1].arrival_s
        return asyncio.run(run(url, model, requests, max_duration_s=1.5 * span + 180))

    return send


def _warm_up(url: str, model: str | None) -> None:
    warm = [LoadRequest(0.0, [100 + i for i in range(32)], 4) for _ in range(2)]
    records, _ = asyncio.run(run(url, model, warm, progress=False))
    failed = [r.error for r in records if not r.ok]
    if failed:
        raise RuntimeError(f"warm-up requests failed: {failed}")


ORDERS = ("interleaved", "sequential")


def run_experiment(args: argparse.Namespace, items, unit: SLO, grid: dict) -> dict:
    """Every configuration's sweep. `args.order` 'interleaved' (default) takes turns point by
    point, each configuration deployed afresh for each of its rates, so a shared machine's
    slow stretches fall on all of them alike rather than on whichever ran then; 'sequential'
    runs each configuration's whole sweep on one deployment (fewer model loads)."""
    from bench.report import loosest_slo

    headline = unit.scaled_each(*grid["headline"])
    sweeps = {
        name: Sweep(args.rates, headline, loosest_slo(unit, grid), args.target, args.bisect)
        for name in args.configs
    }
    per_turn = 1 if getattr(args, "order", "interleaved") == "interleaved" else None
    report = {"meta": _meta(args, unit, grid, items), "configs": {}}
    trace = Path(args.out).resolve() / "steps"
    clusters = Clusters({"SPLITSERVE_STEP_TRACE": str(trace / "current")})
    try:
        for turn, name in enumerate(_turns(sweeps)):
            _run_turn(clusters.for_config(name), args, items, name, sweeps[name], per_turn)
            _keep_steps(trace, name, turn)
            report["configs"][name] = _config_report(
                name, sweeps[name], _shares_prefixes(args), getattr(args, "serve_model", None)
            )
            # an hour-long run should not lose the points it measured when a later one fails
            # or is stopped: report.json always holds every one done so far
            save_report(report, Path(args.out))
    finally:
        clusters.close()
    report["configs"] = {n: report["configs"][n] for n in args.configs if n in report["configs"]}
    return report


def _turns(sweeps: dict[str, Sweep]):
    """Configuration names in rounds until every sweep is done; each round starts one
    configuration further on, so none always runs first after the others."""
    round_ = 0
    while names := [n for n, s in sweeps.items() if s.next_rate() is not None]:
        k = round_ % len(names)
        for name in names[k:] + names[:k]:
            if sweeps[name].next_rate() is not None:
                yield name
        round_ += 1


def _run_turn(cluster, args, items, name: str, state: Sweep, limit: int | None) -> None:
    """Deploy `name`, measure up to `limit` of its sweep's rates (None: all left), undeploy."""
    config = CONFIGURATIONS[name]
    print(f"{name}: {config.description}", flush=True)
    cluster.deploy(app_args(name, _shares_prefixes(args), getattr(args, "serve_model", None)))
    try:
        _warm_up(cluster.url, args.model)

        def make(rate: float) -> list[LoadRequest]:
            return make_requests(args, items, rate, args.num_requests)

        send = _send(cluster.url, args.model, make)
        done = 0
        while (rate := state.next_rate()) is not None and (limit is None or done < limit):
            measure(send, state, rate, probe=host.probe)
            done += 1
    finally:
        cluster.undeploy()


def _shares_prefixes(args: argparse.Namespace) -> bool:
    return getattr(args, "prefix_len", 0) > 0


def _config_report(name: str, state: Sweep, prefix_caching: bool, model: str | None = None) -> dict:
    config = CONFIGURATIONS[name]
    return {
        "description": config.description,
        "colocated": config.colocated,
        "cores": config.cores,
        "serve_mode": config.serve_mode,
        "args": app_args(name, prefix_caching, model),
        "points": [p.to_json() for p in state.sorted_points()],
    }


def save_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report))


def _keep_steps(trace: Path, name: str, turn: int) -> None:
    """The replicas of `name` are gone: their step traces become that configuration's, one
    directory per deployment (placement.step_traces counts overlap within one only)."""
    current = trace / "current"
    if current.exists():
        (trace / name).mkdir(parents=True, exist_ok=True)
        current.rename(trace / name / f"{turn:03d}")


def _meta(args: argparse.Namespace, unit: SLO, grid: dict, items) -> dict:
    lengths = None
    if items is not None:
        lengths = [[i.input_len, i.output_len] for i in items]
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{platform.machine()}, {_cores()} cores",
        "command": "python -m bench.experiment " + " ".join(args.argv),
        "workload": {
            "dataset": args.dataset,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "num_requests": args.num_requests,
            "cv": args.cv,
            "seed": args.seed,
            "prefix_len": getattr(args, "prefix_len", 0),
            "num_prefixes": getattr(args, "num_prefixes", 1),
            "sampling": sampling_of(args),
            "dataset_lengths": lengths,
        },
        "slo_unit": {"ttft_s": unit.ttft_s, "tpot_s": unit.tpot_s, "source": args.slo_source},
        "grid": grid,
        "target": args.target,
        "order": getattr(args, "order", "interleaved"),
    }


def _num_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def _cores() -> int:

    return len(os.sched_getaffinity(0))


def main(argv: list[str] | None = None) -> None:
    import sys

    from bench.loadgen import parse_goodput
    from bench.report import DEFAULT_GRID, slo_unit_from_profile, write_report

    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for report.json, tables, plots")
    parser.add_argument("--configs", nargs="+", default=["disagg-1p1d", "coloc-2", "chunked-2"])
    parser.add_argument("--rates", nargs="+", type=float, required=True)
    parser.add_argument("--bisect", type=int, default=1, help="extra rates at the crossing")
    parser.add_argument("--num-requests", type=int, default=30)
    parser.add_argument("--model", help="the served name; default: the first /v1/models lists")
    parser.add_argument(
        "--serve-model", help="a model directory every configuration serves (bench.tiny_model's)"
    )
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument(
        "--order", choices=ORDERS, default="interleaved",
        help="interleaved: configurations take turns rate by rate, redeployed for each (a "
        "shared machine's drift falls on all alike); sequential: one deployment per sweep",
    )  # fmt: skip
    slo = parser.add_mutually_exclusive_group(required=True)
    slo.add_argument("--profile", help="SLO unit from a profile: prefill(input), decode step")
    slo.add_argument("--goodput", nargs=2, metavar="KEY:MS", help="SLO unit in ms (vLLM style)")
    add_workload_args(parser)
    args = parser.parse_args(argv)
    args.argv = argv
    unknown = set(args.configs) - set(CONFIGURATIONS)
    if unknown:
        parser.error(f"unknown configurations {sorted(unknown)}; known: {list(CONFIGURATIONS)}")
    needed = max(CONFIGURATIONS[name].gpus for name in args.configs)
    if needed and _num_gpus() < needed:
        parser.error(f"{args.configs} need {needed} GPU(s); this machine has {_num_gpus()}")
    try:
        workload_of(args, args.num_requests)
    except ValueError as e:
        parser.error(str(e))
    items = dataset_items(args)
    if args.profile:
        # the SLO unit is the prefill of a whole prompt, prefix and all: what a cache saves
        # shows as goodput at the same targets
        unit = slo_unit_from_profile(
            args.profile, args.input_len, args.output_len, items, args.prefix_len
        )
        grid, args.slo_source = DEFAULT_GRID, f"profile {args.profile}"
    else:
        unit = parse_goodput(args.goodput)
        grid, args.slo_source = {"headline": [1.0, 1.0], "ttft": [1.0], "tpot": [1.0]}, "given"
    report = run_experiment(args, items, unit, grid)
    out = Path(args.out)
    save_report(report, out)
    print(write_report(report, out, args.profile, out / "steps" if args.profile else None))


if __name__ == "__main__":
    main()
