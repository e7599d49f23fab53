"""The default app in Ray Serve's high-throughput front end (deployments/serve_env.py,
`haproxy`: RAY_SERVE_THROUGHPUT_OPTIMIZED and RAY_SERVE_ENABLE_HA_PROXY) serves as it does in
Serve's default mode: the engine's greedy tokens, streamed and not, through the official
client; a bad input's 400; a client gone mid-stream leaves no block held. The rest of the
suite runs the default mode; `make serve SERVE_MODE=haproxy` runs this one.

Its own cluster: Serve's settings are read by each Ray process when it starts.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

pytestmark = pytest.mark.serve
REPO = Path(__file__).resolve().parent.parent
MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def server(own_ray_cluster):
    from bench.experiment import Cluster

    args = yaml.safe_load((REPO / "serve_config.yaml").read_text())["applications"][0]["args"]
    with Cluster(serve_mode="haproxy", num_cpus=4) as cluster:
        cluster.deploy(args)
        yield cluster.url


def _stats() -> list[dict]:
    from bench.experiment import Cluster
    from tests.test_serve import _replica_stats

    return _replica_stats(Cluster.APP)


@pytest.mark.parametrize("grpc", [True, False])
def test_the_ingress_calls_by_this_processs_transport_not_the_builders(monkeypatch, grpc):
    """A handle pickled by the process that built the app keeps that process's transport; the
    ingress takes its own replica's (gRPC in the high-throughput modes)."""
    from ray.serve._private import constants

    from app.replica_calls import this_process_transport

    class Handle:
        def options(self, **kw):
            return kw

    monkeypatch.setattr(constants, "RAY_SERVE_USE_GRPC_BY_DEFAULT", grpc)
    assert this_process_transport(Handle()) == {"_by_reference": not grpc}
    assert this_process_transport(None) is None


def test_haproxy_takes_the_http_port(server):
    """The port clients use is HAProxy's (the binary that ray[serve] brings), not a Python
    proxy's: no Python process relays a chunk between them and the ingress replica."""
    port = int(server.rsplit(":", 1)[1])
    listening = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            for conn in proc.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port:
                    listening[proc.pid] = proc.name()
        except psutil.Error:
            continue
    assert listening and set(listening.values()) == {"haproxy"}, listening


def test_greedy_tokens_equal_the_engines_streamed_and_not(server, make_engine):
    import openai

    from engine import SamplingParams

    prompt = "The capital of France is"
    [expected] = make_engine(64).generate([prompt], SamplingParams(max_tokens=12, temperature=0))
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    fields = {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0}
    whole = client.completions.create(**fields, extra_body={"return_token_ids": True})
    assert whole.choices[0].text == expected.text
    assert whole.choices[0].model_extra["token_ids"] == expected.token_ids
    assert whole.usage.completion_tokens == 12
    streamed = client.completions.create(**fields, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected.text
    chat = [{"role": "user", "content": "Name a colour."}]
    fields = {"model": MODEL, "messages": chat, "max_tokens": 8, "temperature": 0}
    reply = client.chat.completions.create(**fields).choices[0].message.content
    chunks = client.chat.completions.create(**fields, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply


def test_a_bad_input_is_a_400_and_the_server_keeps_serving(server):
    bad = httpx.post(
        f"{server}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": -1}
    )
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "max_tokens"
    assert httpx.get(f"{server}/health").status_code == 200
    ok = httpx.post(
        f"{server}/v1/completions",
        json={"model": MODEL, "prompt": "x", "max_tokens": 2},
        timeout=60,
    )
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_a_browsers_preflight_passes_haproxy(server):
    """CORS (app/cors.py) answered by the ingress behind HAProxy, as behind Serve's proxy."""
    page = {"origin": "https://chat.example"}
    preflight = {**page, "access-control-request-method": "POST"}
    r = httpx.options(f"{server}/v1/completions", headers=preflight, timeout=30)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
    r = httpx.get(f"{server}/v1/models", headers=page, timeout=30)
    assert r.headers.get_list("access-control-allow-origin") == ["*"]


def test_a_client_gone_mid_stream_leaves_no_block_held(server):
    """HAProxy closes its side when the client does: the ingress sees the disconnect and
    aborts the request on the decode replica (1400 tokens would take minutes here)."""
    body = {"model": MODEL, "prompt": "Count to one thousand:", "max_tokens": 1400,
            "ignore_eos": True, "stream": True}  # fmt: skip
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: {")
            if seen >= 3:  # decoding
                busy = _stats()
                break
    assert sum(s["num_running"] for s in busy) == 1, busy
    deadline = time.monotonic() + 15
    while True:
        stats = _stats()
        if all(s["num_free_blocks"] == s["num_kv_blocks"] for s in stats):
            break
        assert time.monotonic() < deadline, json.dumps(stats)
        time.sleep(0.5)
    assert all(s["num_running"] == 0 and s["num_waiting"] == 0 for s in stats)


def test_clients_that_leave_at_the_first_token_leave_no_kv_behind(server):
    """As in Serve's default mode (tests/test_serve.py): here Serve cancels a cancelled
    request's gRPC calls by its own bookkeeping, which the prefill call is kept out of."""
    from bench.experiment import Cluster
    from tests.test_serve import leaving_early_leaves_nothing

    leaving_early_leaves_nothing(f"{server}/v1/completions", Cluster.APP, MODEL)
