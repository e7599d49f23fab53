"""Ray Serve's front-end modes as environments (deployments/serve_env.py)."""

from __future__ import annotations

import socket

import pytest

from deployments.serve_env import MODES, free_ports, ray_default_ports, serve_env


def test_each_mode_adds_to_the_one_before():
    default, throughput, haproxy = (serve_env(m) for m in MODES)
    assert default == {}
    assert throughput == {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
    assert haproxy == {**throughput, "RAY_SERVE_ENABLE_HA_PROXY": "1"}


def test_a_private_haproxy_cluster_takes_free_ports_of_its_own():
    env = serve_env("haproxy", own_ports=True)
    assert serve_env("haproxy").items() < env.items()
    ports = [int(env[f"RAY_SERVE_HAPROXY_{name}_PORT"]) for name in ("STATS", "METRICS")]
    assert len(set(ports)) == 2 and not {8404, 9101} & set(ports)
    for port in ports:  # free: this process can bind them
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
    assert serve_env("throughput", own_ports=True) == serve_env("throughput")  # no HAProxy


class _FakeSocket:
    """What free_ports binds: a port the "kernel" chose; closed when free_ports is done."""

    def __init__(self, port: int, log: list) -> None:
        self.port, self.log = port, log

    def getsockname(self):
        return ("127.0.0.1", self.port)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.log.append(self.port)


def _kernel(ports: list[int], closed: list[int]):
    handed = iter(ports)
    return lambda: _FakeSocket(next(handed), closed)


def test_free_ports_pass_over_rays_own_and_hold_every_port_until_done():
    """52365 is the dashboard agent's, 40500 direct ingress's (both inside Linux's ephemeral
    range): a port picked before the cluster starts must be neither. A skipped port, like a
    repeated one, stays held until all are found, so the kernel does not hand it out again."""
    closed: list[int] = []
    ports = free_ports(2, bind=_kernel([52365, 40500, 45000, 45000, 45001, 45002], closed))
    assert ports == [45000, 45001]
    assert sorted(closed) == [40500, 45000, 45000, 45001, 52365]  # all bound, all let go


def test_free_ports_give_up_with_a_clear_error_rather_than_loop():
    with pytest.raises(RuntimeError, match="found 0 of 1 free ports outside Ray's own"):
        free_ports(1, bind=_kernel([52365] * 1000, []))


def test_rays_default_ports_are_its_constants():
    from ray._private import ray_constants
    from ray.serve._private import constants

    taken = ray_default_ports()
    assert ray_constants.DEFAULT_DASHBOARD_AGENT_LISTEN_PORT == 52365 and 52365 in taken
    assert {6379, 8265, 8000, 9000, 8404, 9101} < taken
    low, high = constants.RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT, 41000
    assert set(range(low, high + 1)) < taken and high + 1 not in taken
    assert len(taken) == 7 + 2 * 1001  # the two direct-ingress ranges, both ends in
    assert not taken & set(free_ports(64))  # and real picks avoid them


def test_an_unknown_mode_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown Serve mode 'fast'; known: default, throughput"):
        serve_env("fast")


def test_the_command_line_prints_words_for_env_and_refuses_a_bad_mode(capsys):
    from deployments.serve_env import main

    main(["haproxy"])
    words = capsys.readouterr().out.split()
    assert dict(w.split("=") for w in words) == serve_env("haproxy")
    main(["default"])
    assert capsys.readouterr().out == "\n"  # `env` gets nothing to set
    with pytest.raises(SystemExit) as e:  # the Makefile's `&&` then starts nothing
        main(["fast"])
    assert e.value.code == 2


def test_every_config_starts_serves_controller_with_the_same_settings():
    """serve_config.yaml, the GPU one and the planner's carry CONTROLLER_ENV as Serve's
    `controller_options`, which Serve's own schema for `serve run` accepts."""
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from deployments.serve_env import CONTROLLER_ENV, controller_options

    assert CONTROLLER_ENV == {"RAY_SERVE_FORCE_STOP_UNHEALTHY_REPLICAS": "1"}
    for name in ("serve_config.yaml", "serve_config_gpu.yaml"):
        config = yaml.safe_load((Path(__file__).parents[1] / name).read_text())
        assert config["controller_options"] == controller_options(), name
        parsed = ServeDeploySchema.model_validate(config)
        assert parsed.controller_options.runtime_env["env_vars"] == CONTROLLER_ENV
