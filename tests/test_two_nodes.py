"""Two Ray nodes on one machine (Ray's own cluster utilities): prefill and decode scale out
onto the second node, one replica per node, and the new replicas pair with each other."""

from __future__ import annotations

import asyncio
import time

import pytest

from deployments.serve_env import free_ports, process_env, start_serve
from deployments.serve_status import running_replicas
from tests.ray_session import CLUSTER_ENV, deploy, end_ray_session
from tests.test_autoscaling_serve import (
    DECODE_LATENCY,
    PREFILL_LATENCY,
    _burst,
    _long_outputs,
    _phase,
    _scaling,
    _wait_for,
)

pytestmark = [pytest.mark.serve, pytest.mark.model]

# Tight targets: the scale-out itself is what this test needs, not the signals' calibration
# (test_autoscaling_serve checks that), so a short burst is enough. A queued 400-token prompt
# predicts 1165 ms, past 0.5 x 1000 ms; two running requests predict a decode step 6.4 ms above
# its fixed cost, past 0.8 x 100 - 75 = 5 ms.
ARGS = {
    "mode": "disaggregated",
    "kv_transport": "object_store",  # works across nodes: a cross-node pair would not fail
    # CI hosts two nodes' processes on 2 cores: a replica there can miss Serve's queue-length
    # probes for over a second, which the default 1 s wait turns into a cross-node hand-off
    "same_node_wait_s": 10.0,
    "prefill": _phase(
        _scaling(ttft_target_ms=1000, latency=PREFILL_LATENCY, downscale_delay_s=600),
        max_replicas_per_node=1,
    ),
    "decode": _phase(
        _scaling(tpot_target_ms=100, latency=DECODE_LATENCY, downscale_delay_s=600),
        max_replicas_per_node=1,
    ),
}


@pytest.fixture(scope="module")
def two_nodes(own_ray_cluster):
    import ray
    from ray.cluster_utils import Cluster

    with process_env(CLUSTER_ENV):  # both nodes' processes inherit it: no runtime_env
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 8})
        cluster.add_node(num_cpus=8)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    yield cluster
    end_ray_session()
    cluster.shutdown()


def _stats_by_node(app: str, name: str) -> dict[str, dict]:
    from ray import serve

    handle = serve.get_deployment_handle(name, app_name=app)
    seen: dict[str, dict] = {}
    for _ in range(60):  # the router spreads these calls over the replicas
        stats = handle.stats.remote().result()
        seen[stats["node_id"]] = stats
        if len(seen) == 2:
            break
    return seen


def test_scaled_out_replicas_pair_on_their_own_node(two_nodes):
    from ray import serve

    from app.builder import build_app

    [port] = free_ports(1)
    start_serve(port)
    deploy({"two": ("/", build_app(ARGS))})
    base = f"http://127.0.0.1:{port}"
    # prompts that queue at prefill for seconds, outputs that keep several requests decoding
    burst = [
        {"prompt": [100 + (i * 13 + j) % 4000 for j in range(400)], "max_tokens": 64,
         "ignore_eos": True}
        for i in range(10)
    ]  # fmt: skip
    assert asyncio.run(_burst(base, burst)) == [(200, 64)] * 10
    # the burst makes the autoscaler add a replica to each phase; on a loaded host the new
    # replica may still be loading weights when the burst ends (none is removed before 600 s)
    for name in ("PrefillServer", "DecodeServer"):
        _wait_for(lambda n=name: running_replicas("two", n) == 2, 180, f"{name} scaled out to 2")
    before = _stats_by_node("two", "DecodeServer")
    assert len(before) == 2  # one decode replica on each node
    assert set(_stats_by_node("two", "PrefillServer")) == set(before)  # and one prefill on each
    # light load now that both pairs exist: every hand-off stays on its node
    for _ in range(3):
        assert asyncio.run(_burst(base, _long_outputs(4, 8))) == [(200, 8)] * 4
    after = _stats_by_node("two", "DecodeServer")
    for node, stats in after.items():
        assert stats["num_cross_node_handoffs"] == before[node]["num_cross_node_handoffs"], node
    # every object-store transfer was released by its reader (none left to the keepers' TTL)
    prefill = serve.get_deployment_handle("PrefillServer", app_name="two")
    deadline = time.monotonic() + 30
    while any(prefill.stats.remote().result()["num_kept_kv_transfers"] for _ in range(10)):
        assert time.monotonic() < deadline
        time.sleep(0.5)
