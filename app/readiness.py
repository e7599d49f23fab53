"""Whether the application can serve: what the ingress's /health and /ping answer.

The ingress replica starts in a second; the prefill and decode replicas take as long as their
model takes to load. Until each engine deployment the ingress calls has a running replica,
/health answers 503 and names what it waits for, as vLLM's server, which answers nothing until
its engine is up, and later a 503 when the engine has died. A readiness probe (a load
balancer's, Kubernetes') then sends requests only to an application that serves them; the
requests themselves would wait in Serve's handles meanwhile, not fail.

The replica counts come from Serve's controller (what `serve.status()` reads, without its
cost: deployments/serve_status.py), asked at most once per `ttl_s` per ingress replica, off the
event loop. A deployment with no running replica that Serve keeps at zero on purpose (an
autoscaling_config of min_replicas 0, healthy or scaling up) can serve: a request starts one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Protocol

logger = logging.getLogger(__name__)

# a deployment without a running replica in these states is starting, or has lost them all
_NOT_SERVING = ("UPDATING", "UNHEALTHY", "DEPLOY_FAILED")
_STARTING = ("STARTING", "UPDATING", "RECOVERING")  # replica states on the way to running


class DeploymentState(Protocol):
    """What Serve's DeploymentStatusOverview says of one deployment."""

    status: str
    replica_states: Mapping[str, int]


def unready_deployments(
    deployments: Mapping[str, DeploymentState], names: Sequence[str]
) -> dict[str, str]:
    """The deployments of `names` that cannot serve now -> name: why (empty: all can)."""
    why = {}
    for name in names:
        state = deployments.get(name)
        if state is None:
            why[name] = "not deployed"
        elif not state.replica_states.get("RUNNING", 0) and state.status in _NOT_SERVING:
            starting = sum(state.replica_states.get(s, 0) for s in _STARTING)
            status = getattr(state.status, "value", state.status)  # Serve's str enum
            why[name] = f"{status}: 0 replicas running, {starting} starting"
    return why


class Readiness:
    """The application's engine deployments, checked at most once per `ttl_s`."""

    def __init__(self, app_name: str, deployment_names: Sequence[str], ttl_s: float = 1.0) -> None:
        self.app_name, self.names, self.ttl_s = app_name, tuple(deployment_names), ttl_s
        self._checked_at = -float("inf")
        self._unready: dict[str, str] = {name: "not checked yet" for name in self.names}
        self._lock = asyncio.Lock()  # many probes at once ask the controller once

    async def unready(self) -> dict[str, str]:
        """name: why, for each deployment that cannot serve now (empty: the app can)."""
        if not self.names:  # an ingress that calls no replica (unit tests)
            return {}
        async with self._lock:
            if time.monotonic() - self._checked_at >= self.ttl_s:
                await self._check()
            return dict(self._unready)

    async def _check(self) -> None:
        try:  # a blocking call to the controller: on a thread, not the event loop
            self._unready = await asyncio.to_thread(self._ask_serve)
        except Exception as e:  # Serve keeps serving while its controller restarts
            logger.warning("readiness: Serve's status unavailable (%s); keeping the last", e)
        self._checked_at = time.monotonic()

    def _ask_serve(self) -> dict[str, str]:
        from deployments.serve_status import applications

        app = applications().get(self.app_name)
        if app is None:
            return {name: f"application {self.app_name!r} not deployed" for name in self.names}
        return unready_deployments(app.deployments, self.names)
