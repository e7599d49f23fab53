"""Ray Serve's front-end modes as environments (deployments/serve_env.py)."""

from __future__ import annotations

import socket

import pytest

from deployments.serve_env import MODES, serve_env


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
