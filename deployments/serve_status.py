"""What Serve's controller says of its applications and replicas, read without serve.status()'s
cost.

`serve.status()` validates the controller's whole answer (ServeInstanceDetails: every
application's deployments with their configs) into pydantic models, and in Ray 2.60 validating
a deployment's config rebuilds its RequestRouterConfig, which cloudpickles the router class by
value (ray/serve/config.py: _serialize_request_router_cls). With the test suite's 5
applications (15 deployments) a call cost 59 ms of CPU in the caller; the controller's answer
itself, 1 ms. Whoever polls it pays that each time: the ingress's readiness check (on a
thread, but holding the GIL from its streams), a test or benchmark waiting for a replica (4
calls a second took a quarter of a core while 14 replicas started on two).

This reads the same answer (the controller's dict, in ServeInstanceDetails' schema, as
serve.status() gets it) into the few fields the callers use, named as serve.status() names
them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class DeploymentStatus:
    status: str  # HEALTHY, UPDATING, UNHEALTHY, ...
    replica_states: dict[str, int] = field(default_factory=dict)  # RUNNING: 2, STARTING: 1

    @property
    def running(self) -> int:
        return self.replica_states.get("RUNNING", 0)


@dataclass(frozen=True)
class AppStatus:
    status: str  # DEPLOYING, RUNNING, DEPLOY_FAILED, DELETING, ...
    message: str = ""
    deployments: dict[str, DeploymentStatus] = field(default_factory=dict)


def applications() -> dict[str, AppStatus]:
    """Each application's status, by name (empty while Serve has no controller)."""
    # serve.status()'s own way to the controller
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return {}
    return parse_details(client.get_serve_details())


def running_replicas(app: str, deployment: str) -> int:
    """RUNNING replicas of one deployment (0 for one not deployed)."""
    state = applications().get(app)
    found = state.deployments.get(deployment) if state else None
    return found.running if found else 0


def parse_details(details: Mapping) -> dict[str, AppStatus]:
    """The controller's details -> application name: AppStatus."""
    return {
        name: AppStatus(
            status=_text(app["status"]),
            message=app.get("message") or "",
            deployments={
                deployment: DeploymentStatus(
                    status=_text(d["status"]),
                    replica_states=dict(Counter(_text(r["state"]) for r in d.get("replicas", ()))),
                )
                for deployment, d in (app.get("deployments") or {}).items()
            },
        )
        for name, app in (details.get("applications") or {}).items()
    }


def _text(value) -> str:
    """Serve's status enums (str enums, or their values once serialized) as plain text."""
    return str(getattr(value, "value", value))
