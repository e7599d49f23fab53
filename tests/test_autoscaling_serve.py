"""Prefill and decode scale on their own, each for its own reason, on a real local Ray cluster
(more logical CPUs than cores, half-CPU replicas, one torch thread each, the default model).

The policies' latency coefficients are this machine's profile, rounded; targets are chosen so
that one burst overloads exactly one phase. The session's cluster has Serve's metric push
interval cut to 1 s (tests/ray_session.py).
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from bench.autoscale import ReplicaWatcher
from deployments.serve_status import running_replicas

pytestmark = [pytest.mark.serve, pytest.mark.model]

MODEL = "SmolLM2-135M-Instruct"
APP = "scaling"
PREFILL_LATENCY = {"a": 85.0, "b": 2.7, "c": 0.001}
DECODE_LATENCY = {"a": 75.0, "b": 0.005, "c": 3.2}


def _scaling(**kw) -> dict:
    return {
        "min_replicas": 1,
        "max_replicas": 2,
        "upscale_delay_s": 1.0,
        "downscale_delay_s": 6.0,
        "look_back_period_s": 2.0,
        **kw,
    }


def _phase(autoscaling: dict, **extra) -> dict:
    engine = {"num_threads": 1, "kv_cache_memory_mb": 128}
    return {"num_cpus": 0.5, "engine": engine, "autoscaling": autoscaling, **extra}


ARGS = {
    "mode": "disaggregated",
    # a queue of a few long prompts is well past half of 8 s; 40 short ones are not
    "prefill": _phase(_scaling(ttft_target_ms=8000, latency=PREFILL_LATENCY)),
    # 24 running requests step about 155 ms: past 0.8 x 140 ms; 4 long prompts are not
    "decode": _phase(_scaling(tpot_target_ms=140, latency=DECODE_LATENCY)),
}


async def _burst(base: str, requests: list[dict]) -> list[tuple[int, int]]:
    """-> (HTTP status, completion tokens) per request, all sent at once."""

    async def one(client: httpx.AsyncClient, body: dict) -> tuple[int, int]:
        r = await client.post(f"{base}/v1/completions", json={"model": MODEL, **body})
        if r.status_code != 200:  # shown with the failed assertion
            print(f"HTTP {r.status_code}: {r.text}")
        return r.status_code, r.json().get("usage", {}).get("completion_tokens", 0)

    async with httpx.AsyncClient(timeout=600) as client:
        return await asyncio.gather(*(one(client, body) for body in requests))


def _long_prompts(n: int, length: int = 900) -> list[dict]:
    return [
        {"prompt": [100 + (i * 7 + j) % 4000 for j in range(length)], "max_tokens": 2}
        for i in range(n)
    ]


def _long_outputs(n: int, tokens: int) -> list[dict]:
    return [
        {"prompt": [200 + i, 300, 400], "max_tokens": tokens, "ignore_eos": True} for i in range(n)
    ]


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.5)


def _all_blocks_free(app: str) -> None:
    from ray import serve

    for name in ("PrefillServer", "DecodeServer"):
        handle = serve.get_deployment_handle(name, app_name=app)
        for _ in range(4):  # whichever replica answers: only one is left per deployment
            stats = handle.stats.remote().result()
            assert stats["num_free_blocks"] == stats["num_kv_blocks"], (name, stats)
            assert stats["num_running"] == stats["num_waiting"] == 0


@pytest.fixture(scope="module")
def app(ray_serve):
    from app.builder import build_app
    from tests.ray_session import deploy, undeploy

    deploy({APP: ("/", build_app(ARGS))})
    yield ray_serve.url
    undeploy([APP])


def test_long_prompts_scale_prefill_while_decode_stays(app):
    # 14 prompts queue ~35 s of prefill: the second replica, decided within ~5 s, has time to
    # start even on a machine still busy with the suite's previous app (10 once fell short)
    with ReplicaWatcher(APP) as watch:
        results = asyncio.run(_burst(app, _long_prompts(14)))
    assert results == [(200, 2)] * 14  # nothing failed or was cut short
    assert watch.max("PrefillServer") == 2 and watch.max("DecodeServer") == 1
    _wait_for(lambda: running_replicas(APP, "PrefillServer") == 1, 120, "prefill scale-down")
    _all_blocks_free(APP)


def test_long_outputs_scale_decode_while_prefill_stays_and_scale_down_loses_nothing(app):
    _wait_for(lambda: running_replicas(APP, "PrefillServer") == 1, 120, "prefill back at 1")
    with ReplicaWatcher(APP) as watch:
        results = asyncio.run(_burst(app, _long_outputs(24, 120)))
    assert results == [(200, 120)] * 24
    assert watch.max("DecodeServer") == 2 and watch.max("PrefillServer") == 1
    # requests that outlive the scale-down: the replica leaving finishes its share first.
    # 400 tokens: the scale-down comes ~8 s into the tail (its 6 s delay, the look-back), and
    # 200 tokens took only 8.7 s on a host decoding at ~43 ms a step (the replica went 0.7 s
    # before the tail's end, after the watcher's last sample)
    with ReplicaWatcher(APP) as tail_watch:
        tail = asyncio.run(_burst(app, _long_outputs(4, 400)))
    assert tail == [(200, 400)] * 4
    decode_counts = tail_watch.series("DecodeServer")
    assert decode_counts[0] == 2 and decode_counts[-1] == 1  # scaled down mid-tail
    _wait_for(lambda: running_replicas(APP, "DecodeServer") == 1, 120, "decode scale-down")
    _all_blocks_free(APP)
