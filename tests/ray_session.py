"""One private local Ray cluster with Serve for the test session (#3: one per session keeps CI
fast; each start and stop costs seconds of processes on 2 cores).

The modules that use it run one after another (conftest orders them), each deploying its own
applications and deleting them when done; a module that needs a cluster of its own (two nodes,
the experiment runner's) stops the shared one first.
"""

from __future__ import annotations

import time
from collections.abc import Container
from dataclasses import dataclass
from pathlib import Path

from deployments.serve_env import CONTROLLER_ENV, free_ports, process_env, start_serve

# the union of what the sharing modules need: no tokenizer thread pools in 16 replicas on 2
# cores; replicas push their load to Serve's autoscaler every second, not every 10 s, so the
# scaling tests see a burst while it lasts
ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
}
NUM_CPUS = 16  # logical: replicas ask for half a CPU each; threads are set per engine
# every process exports its metrics every 2 s, not 10: the metrics tests see a series sooner,
# and a gauge nobody sets again leaves the endpoint ~6 s after its last set, not ~30: Ray's
# metrics agent keeps a series two of its export intervals after its last export
# (tests/test_serve.py). The agent reads the interval from the environment it is started with
# (with only _system_config, it kept a series 21.7 s; with both, 5.6 s)
METRICS_INTERVAL_MS = 2000
SYSTEM_CONFIG = {"metrics_report_interval_ms": METRICS_INTERVAL_MS}
# Serve's controller runs its control loop every 0.5 s, not every 0.1 s: with the five
# applications of tests/test_serve.py idle, the cluster took 11.6 CPU-s per 30 s at 0.1 s and
# 9.2 at 0.5 s (the controller 2.0 -> 0.7). Its waits (autoscaling and downscale delays,
# health-check periods) are timestamps, not loop counts; a replica is seen started, dead or
# unhealthy up to 0.4 s later.
CONTROL_LOOP_INTERVAL_S = 0.5
CLUSTER_ENV = {
    **ENV,
    **CONTROLLER_ENV,
    "RAY_metrics_report_interval_ms": str(METRICS_INTERVAL_MS),
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": str(CONTROL_LOOP_INTERVAL_S),
}


@dataclass(frozen=True)
class RayServe:
    url: str  # Serve's HTTP proxy
    metrics_url: str  # the node's Prometheus endpoint
    node_id: str


class SharedRay:
    """Starts the cluster on first use, stops it on request or at the end of the session."""

    def __init__(self, temp_dir: Path) -> None:
        self.temp_dir = temp_dir  # outside any working_dir: Ray would package itself
        self.current: RayServe | None = None

    def get(self) -> RayServe:
        if self.current is None:
            self.current = self._start()
        return self.current

    def _start(self) -> RayServe:
        import ray

        metrics_port, port = free_ports(2)
        # the node's processes (the metrics agent, Serve's controller and replicas) inherit
        # this environment as they start: no runtime_env, which costs each worker a second
        # Python start (deployments/serve_env.py: start_serve)
        with process_env(CLUSTER_ENV):
            ray.init(
                address="local",
                num_cpus=NUM_CPUS,
                include_dashboard=False,
                _metrics_export_port=metrics_port,
                _temp_dir=str(self.temp_dir),
                _system_config=SYSTEM_CONFIG,
            )
        try:
            start_serve(port)
        except BaseException:
            end_ray_session()  # else every later module's ray.init fails on this cluster
            raise
        return RayServe(
            f"http://127.0.0.1:{port}",
            f"http://127.0.0.1:{metrics_port}/metrics",
            ray.get_runtime_context().get_node_id(),
        )

    def stop(self) -> None:
        if self.current is None:
            return
        end_ray_session()
        self.current = None


def end_ray_session() -> None:
    """Serve and Ray down, this session's garbage collected first: a Ray object left in a
    reference cycle (an actor handle) would otherwise be freed by whichever thread's
    allocation next runs the collector, and one freed during or after a later shutdown makes
    Ray end the process (pytest then exits 1 without its summary, as CI once did)."""
    import gc

    import ray
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()
    gc.collect()
    ray.shutdown()


def deploy(apps: dict[str, tuple[str, object]], timeout_s: float = 300) -> None:
    """name -> (route prefix, built application), started together: serve.run waits for its
    application to be RUNNING even with blocking=False, which would start them one by one."""
    from ray import serve

    from deployments.serve_status import applications

    targets = [
        serve.RunTarget(app, name=name, route_prefix=prefix) for name, (prefix, app) in apps.items()
    ]
    serve.run_many(targets, wait_for_applications_running=False)
    deadline = time.monotonic() + timeout_s
    for name in apps:
        # the controller's answer, not serve.status(): polled here, that took a quarter of a
        # core from the starting replicas (deployments/serve_status.py)
        while (state := applications().get(name)) is None or state.status != "RUNNING":
            if time.monotonic() > deadline:
                status = serve.status()
                undeploy(apps)  # the next module gets the cluster's CPUs back
                raise AssertionError(f"applications did not start: {status}")
            time.sleep(0.25)


def undeploy(names) -> None:
    """Delete the applications and wait until their replicas are gone (their CPUs and memory
    are the next module's)."""
    from ray import serve

    from deployments.serve_status import applications

    names = list(names)
    for name in names:  # all at once: each replica's graceful shutdown takes seconds
        serve.delete(name, _blocking=False)
    deadline = time.monotonic() + 120
    while set(names) & set(applications()):
        assert time.monotonic() < deadline, serve.status()
        time.sleep(0.5)


def replica_stats(app: str, deployment: str) -> dict:
    """One replica's stats (deployments/servers.py: blocks, requests, transfers, pid)."""
    from ray import serve

    return serve.get_deployment_handle(deployment, app_name=app).stats.remote().result()


def every_replica_stats(app: str, deployment: str) -> list[dict]:
    """Each running replica's stats: asked until every replica has answered (told apart by
    pid; the handle picks the replica)."""
    from deployments.serve_status import applications

    states = applications()[app].deployments[deployment].replica_states
    seen: dict[int, dict] = {}
    for _ in range(40):
        stats = replica_stats(app, deployment)
        seen[stats["pid"]] = stats
        if len(seen) == states.get("RUNNING", 0):
            return list(seen.values())
    raise AssertionError(f"{app}/{deployment}: {len(seen)} of {states} replicas answered")


def kill_ingress(app: str) -> None:
    """Kill the app's ingress replica as a crash would (Serve starts another)."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#Ingress#"
    [ingress] = [a for a in ray.util.list_named_actors(True) if a["name"].startswith(prefix)]
    ray.kill(ray.get_actor(ingress["name"], namespace=ingress["namespace"]), no_restart=True)


HI = {"model": "SmolLM2-135M-Instruct", "prompt": "Hi", "max_tokens": 4, "temperature": 0}


def until_served(
    url: str,
    waiting: Container[int] = (503,),
    body: dict | None = None,
    timeout_s: float = 120,
) -> dict:
    """-> the response of a completion (`body`, or a short greedy one of the default model) at
    the app's `url` once it is served (retried while it gets a status in `waiting`: a replica,
    or Serve's replacement of one, starts)."""
    import httpx

    body = body or HI
    deadline = time.monotonic() + timeout_s
    while True:
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        if r.status_code == 200:
            return r.json()
        assert r.status_code in waiting and time.monotonic() < deadline, r.text
        time.sleep(0.25)
