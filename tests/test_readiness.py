"""/health answers 200 only when every engine deployment the ingress calls can serve
(app/readiness.py): Serve's own status objects in the unit tests, a live application whose
decode replica cannot be placed in the last one."""

from __future__ import annotations

import asyncio
import logging
import time

import httpx
import pytest
from ray.serve._private.common import DeploymentStatus, DeploymentStatusTrigger
from ray.serve.schema import DeploymentStatusOverview

from app.readiness import Readiness, unready_deployments


def _state(status: DeploymentStatus, **replicas: int) -> DeploymentStatusOverview:
    trigger = DeploymentStatusTrigger.UNSPECIFIED
    return DeploymentStatusOverview(status, trigger, replicas, "")


@pytest.mark.parametrize(
    ("state", "why"),
    [
        (_state(DeploymentStatus.UPDATING, STARTING=1), "UPDATING: 0 replicas running, 1 starting"),
        (_state(DeploymentStatus.UNHEALTHY), "UNHEALTHY: 0 replicas running, 0 starting"),
        (_state(DeploymentStatus.DEPLOY_FAILED, STOPPING=2), "DEPLOY_FAILED: 0 replicas running"),
        # one replica serves while Serve replaces or adds others
        (_state(DeploymentStatus.UNHEALTHY, RUNNING=1, STARTING=1), None),
        (_state(DeploymentStatus.UPDATING, RUNNING=1), None),
        (_state(DeploymentStatus.HEALTHY, RUNNING=2), None),
        # kept at zero by an autoscaling_config of min_replicas 0: a request starts one
        (_state(DeploymentStatus.HEALTHY), None),
        (_state(DeploymentStatus.UPSCALING, STARTING=1), None),
    ],
)
def test_a_deployment_serves_once_a_replica_runs_or_when_kept_at_zero(state, why):
    unready = unready_deployments({"DecodeServer": state}, ["DecodeServer"])
    if why is None:
        assert unready == {}
    else:
        assert list(unready) == ["DecodeServer"] and unready["DecodeServer"].startswith(why)


def test_every_named_deployment_is_checked_and_a_missing_one_is_not_ready():
    running = _state(DeploymentStatus.HEALTHY, RUNNING=1)
    deployments = {"PrefillServer": running, "Ingress": _state(DeploymentStatus.UPDATING)}
    got = unready_deployments(deployments, ["PrefillServer", "DecodeServer"])
    assert got == {"DecodeServer": "not deployed"}  # the ingress itself is not asked about


class _Counted(Readiness):
    """Serve's answers given in turn (an exception raised), counting the asks."""

    def __init__(self, answers: list, ttl_s: float) -> None:
        super().__init__("app", ["PrefillServer", "DecodeServer"], ttl_s)
        self.answers, self.asks = answers, 0

    def _ask_serve(self) -> dict[str, str]:
        self.asks += 1
        time.sleep(0.05)  # the controller's round trip: probes arriving meanwhile wait for it
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_probes_at_once_ask_serve_once_and_again_after_the_ttl():
    readiness = _Counted([{"DecodeServer": "starting"}, {}], ttl_s=0.3)

    async def probes() -> list[dict]:
        first = await asyncio.gather(*(readiness.unready() for _ in range(20)))
        await asyncio.sleep(0.35)
        return [*first, await readiness.unready()]

    answers = asyncio.run(probes())
    assert readiness.asks == 2
    assert answers[:20] == [{"DecodeServer": "starting"}] * 20 and answers[20] == {}


def test_an_unreachable_controller_keeps_the_last_answer(caplog):
    readiness = _Counted([{}, RuntimeError("controller restarting")], ttl_s=0)
    assert asyncio.run(readiness.unready()) == {}
    with caplog.at_level(logging.WARNING, logger="app.readiness"):
        assert asyncio.run(readiness.unready()) == {}
    assert "controller restarting" in caplog.text


def test_before_any_answer_nothing_is_ready():
    readiness = _Counted([RuntimeError("no controller")], ttl_s=60)
    assert set(asyncio.run(readiness.unready())) == {"PrefillServer", "DecodeServer"}


def test_an_ingress_that_calls_no_replica_is_ready_without_asking():
    readiness = _Counted([], ttl_s=0)
    readiness.names = ()
    assert asyncio.run(readiness.unready()) == {} and readiness.asks == 0


@pytest.mark.serve
@pytest.mark.model
def test_health_is_503_naming_the_deployment_until_it_has_a_replica(ray_serve):
    """A decode replica that asks for more CPUs than the cluster has is never placed: /health
    names it (and the prefill replica while that loads), with the ingress up and answering."""
    from ray import serve

    from app.builder import build_app
    from tests.ray_session import undeploy

    small = {"num_cpus": 0.5, "engine": {"num_threads": 1, "kv_cache_memory_mb": 64}}
    # no graceful shutdown: Serve would wait that long (300 s) on a replica never started
    unplaced = {**small, "num_cpus": 1000, "graceful_shutdown_timeout_s": 0}
    args = {"prefill": small, "decode": unplaced}
    app = serve.RunTarget(build_app(args), name="unplaced", route_prefix="/unplaced")
    serve.run_many([app], wait_for_applications_running=False)
    try:
        deadline, seen = time.monotonic() + 120, []
        while time.monotonic() < deadline:
            r = httpx.get(f"{ray_serve.url}/unplaced/health", timeout=30)
            seen.append((r.status_code, r.text))
            if r.status_code == 503 and "PrefillServer" not in r.text:
                break  # the prefill replica runs; the decode one never will
            time.sleep(0.5)
        status, text = seen[-1]
        assert status == 503, seen
        assert r.json() == {
            "status": "unavailable",
            "message": "DecodeServer: UPDATING: 0 replicas running, 1 starting",
        }
        assert all(code in (404, 503) for code, _ in seen), seen  # 404: Serve's, before the app
        models = httpx.get(f"{ray_serve.url}/unplaced/v1/models", timeout=30)
        assert models.status_code == 200  # the ingress itself serves what needs no replica
    finally:
        undeploy(["unplaced"])
