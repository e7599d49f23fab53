"""deployments/serve_status.py reads the controller's details as serve.status() does: here
against Serve's own reading of the same details (ServeInstanceDetails._get_status, what
serve.status() returns); tests/test_serve.py compares the two on live applications."""

from __future__ import annotations

import json

from ray.serve._private.common import DeploymentStatus, DeploymentStatusTrigger, ReplicaState
from ray.serve.schema import ApplicationStatus, ServeInstanceDetails

from deployments import serve_status
from deployments.serve_status import AppStatus, parse_details


def _replica(state: ReplicaState, i: int) -> dict:
    return {
        "node_id": "node", "node_ip": "10.0.0.1", "actor_id": f"actor{i}", "actor_name": f"r{i}",
        "worker_id": "worker", "log_file_path": "/log", "replica_id": f"r{i}", "state": state,
        "pid": 100 + i, "start_time_s": 1.0,
    }  # fmt: skip


def _deployment(name: str, status: DeploymentStatus, states: list[ReplicaState]) -> dict:
    return {
        "name": name, "status": status, "status_trigger": DeploymentStatusTrigger.UNSPECIFIED,
        "message": "", "deployment_config": {"name": name}, "target_num_replicas": len(states),
        "required_resources": {}, "replicas": [_replica(s, i) for i, s in enumerate(states)],
    }  # fmt: skip


def _app(name: str, status: ApplicationStatus, message: str, *deployments: dict) -> dict:
    return {
        "name": name, "route_prefix": f"/{name}", "docs_path": None, "status": status,
        "message": message, "last_deployed_time_s": 1.0, "deployed_app_config": None,
        "source": "imperative", "external_scaler_enabled": False,
        "deployments": {d["name"]: d for d in deployments},
    }  # fmt: skip


R = ReplicaState
DETAILS = {
    "proxies": {},
    "applications": {
        "up": _app(
            "up",
            ApplicationStatus.RUNNING,
            "",
            _deployment("Ingress", DeploymentStatus.HEALTHY, [R.RUNNING]),
            _deployment("DecodeServer", DeploymentStatus.UPSCALING, [R.RUNNING, R.STARTING]),
        ),
        "starting": _app(
            "starting",
            ApplicationStatus.DEPLOYING,
            "waiting for replicas",
            _deployment(
                "PrefillServer", DeploymentStatus.UPDATING, [R.STARTING, R.PENDING_MIGRATION]
            ),
            _deployment("Idle", DeploymentStatus.HEALTHY, []),  # kept at zero replicas
            _deployment("Gone", DeploymentStatus.UNHEALTHY, [R.STOPPING, R.STOPPING, R.RUNNING]),
        ),
    },
}


def test_the_details_read_as_serve_status_reads_them():
    ours = parse_details(DETAILS)
    theirs = ServeInstanceDetails(**DETAILS)._get_status().applications
    assert ours.keys() == theirs.keys() == {"up", "starting"}
    for name, app in theirs.items():
        assert ours[name].status == app.status.value
        assert ours[name].message == app.message
        assert ours[name].deployments.keys() == app.deployments.keys()
        for deployment, state in app.deployments.items():
            assert ours[name].deployments[deployment].status == state.status.value
            assert ours[name].deployments[deployment].replica_states == state.replica_states
    assert ours["up"].deployments["DecodeServer"].running == 1
    assert ours["starting"].deployments["Gone"].replica_states == {"STOPPING": 2, "RUNNING": 1}
    assert ours["starting"].deployments["Idle"].running == 0


def test_plain_strings_read_as_the_enums():
    """Serve's str enums, or their values (the details as JSON): the same statuses."""
    assert parse_details(json.loads(json.dumps(DETAILS))) == parse_details(DETAILS)


def test_running_replicas_of_what_is_not_deployed_is_zero(monkeypatch):
    monkeypatch.setattr(serve_status, "applications", lambda: parse_details(DETAILS))
    assert serve_status.running_replicas("up", "DecodeServer") == 1
    assert serve_status.running_replicas("up", "PrefillServer") == 0
    assert serve_status.running_replicas("elsewhere", "DecodeServer") == 0


def test_no_applications_read_as_none():
    assert parse_details({"proxies": {}, "applications": {}}) == {}
    assert parse_details({}) == {}
    assert AppStatus("RUNNING").deployments == {}
