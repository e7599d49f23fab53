"""The prefill and decode scaling rules against closed-form predictions, and their config."""

from __future__ import annotations

import pytest

from deployments.autoscaling import (
    DecodePolicy,
    Latency,
    PrefillPolicy,
    decode_replicas,
    predicted_decode_step_ms,
    predicted_prefill_wait_ms,
    prefill_replicas,
)

pytestmark = pytest.mark.unit
PRE = Latency(a=100.0, b=2.0, c=0.0)  # 512 tokens: 100 + 1024 ms
DEC = Latency(a=50.0, b=0.01, c=5.0)


def test_prefill_wait_is_the_latency_model_over_the_replicas():
    assert predicted_prefill_wait_ms(0, 1, PRE, 2048) == 0.0
    assert predicted_prefill_wait_ms(4096, 2, PRE, 2048) == 100 + 2 * 2048
    assert predicted_prefill_wait_ms(4096, 1, PRE, 2048) == 2 * 100 + 2 * 4096  # two batches
    quad = Latency(0.0, 0.0, 1e-3)
    assert predicted_prefill_wait_ms(3000, 1, quad, 2048) == pytest.approx(1e-3 * 3000 * 2048)


def test_prefill_scales_up_to_meet_the_ttft_target_and_down_with_hysteresis():
    # target 10 s, headroom 0.5: a replica may hold 5 s of queued prefill
    queued = 6000.0  # 1 replica: 3*100 + 12000 ms; 3 replicas: 100 + 4000 ms
    assert prefill_replicas(queued, 1, PRE, 10_000) == 3
    assert prefill_replicas(0.0, 3, PRE, 10_000) == 0  # idle: Serve's min_replicas applies
    # 2 replicas would wait 100 + 2000 ms: above the down bar (2.5 s)? no -> 2 is enough
    assert prefill_replicas(2000.0, 3, PRE, 10_000) == 2
    # 3000 tokens: 2 replicas wait 3.1 s: within the up bar (5 s), not the down bar (2.5 s)
    assert prefill_replicas(3000.0, 3, PRE, 10_000) == 3  # stays: no flapping
    assert prefill_replicas(3000.0, 1, PRE, 10_000) == 2
    assert prefill_replicas(10**9, 1, PRE, 10_000, max_replicas=4) == 4


def _dec(running, context, kv_used, capacity, pending=0.0) -> dict[str, float]:
    return {
        "running_requests": running,
        "context_tokens": context,
        "kv_used_tokens": kv_used,
        "kv_capacity_tokens": capacity,
        "pending_imports": pending,
    }


def test_decode_scales_on_the_step_time_the_tpot_target_allows():
    # 40 requests at 600 tokens: one replica steps 50 + 240 + 200 = 490 ms
    assert predicted_decode_step_ms(40, 24_000, 1, DEC) == pytest.approx(490.0)
    signals = _dec(40, 24_000, 24_000, 100_000)
    # TPOT target 400 ms, headroom 0.8 -> 320 ms: 2 replicas step 270 ms
    assert decode_replicas(signals, 1, DEC, 400.0) == 2
    assert decode_replicas(_dec(0, 0, 0, 100_000), 2, DEC, 400.0) == 0  # idle


def test_decode_scales_on_kv_use_and_on_requests_waiting_for_kv_room():
    # cheap steps, but 90% of one replica's KV is in use (target 80%)
    assert decode_replicas(_dec(4, 45_000, 45_000, 50_000), 1, DEC, 10_000.0) == 2
    # a handed-off request waits for blocks: one more replica, whatever the step time
    assert decode_replicas(_dec(1, 100, 100, 100_000, pending=1), 2, DEC, 10_000.0) == 3
    # capacity is reported summed over replicas; per replica it is the same here
    assert decode_replicas(_dec(4, 45_000, 45_000, 100_000), 2, DEC, 10_000.0) == 2


def test_policies_decide_from_the_summed_signals():
    prefill = PrefillPolicy.__new__(PrefillPolicy)  # decide() is pure: no gauges needed
    prefill.target, prefill.lat, prefill.budget, prefill.headroom = 10_000, PRE, 2048, 0.5
    desired, derived = prefill.decide({"queued_prompt_tokens": 6000.0}, 1)
    assert desired == 3 and derived["predicted_queue_wait_ms"] == 300 + 12_000
    decode = DecodePolicy.__new__(DecodePolicy)
    decode.target, decode.lat, decode.headroom, decode.kv_target = 400.0, DEC, 0.8, 0.8
    desired, derived = decode.decide(_dec(40, 24_000, 24_000, 100_000), 1)
    assert desired == 2 and derived["predicted_step_ms"] == pytest.approx(490.0)


def test_autoscaling_args_become_a_serve_autoscaling_config():
    from ray.serve.config import AutoscalingConfig

    from app.config import AppArgs

    latency = {"a": 85.0, "b": 2.7, "c": 0.001}
    args = AppArgs.model_validate(
        {
            "prefill": {
                "autoscaling": {"max_replicas": 3, "ttft_target_ms": 9000, "latency": latency}
            },
            "decode": {"autoscaling": {"tpot_target_ms": 160, "latency": latency}},
        }
    )
    config = args.prefill.autoscaling.serve_config("prefill", 2048)
    serve_config = AutoscalingConfig(**config)  # Serve's own schema accepts it
    assert serve_config.max_replicas == 3 and serve_config.min_replicas == 1
    assert config["policy"]["policy_function"] == "deployments.autoscaling:PrefillPolicy"
    assert config["policy"]["policy_kwargs"]["ttft_target_ms"] == 9000
    policy = serve_config.policy.get_policy()
    assert policy is PrefillPolicy
    for bad, needle in (
        ({"prefill": {"autoscaling": {"latency": latency}}}, "ttft_target_ms"),
        ({"decode": {"autoscaling": {"ttft_target_ms": 1, "latency": latency}}}, "tpot_target_ms"),
        (
            {
                "decode": {
                    "autoscaling": {"tpot_target_ms": 1, "latency": latency},
                    "autoscaling_config": {},
                }
            },
            "not both",
        ),
        (
            {
                "decode": {
                    "autoscaling": {"tpot_target_ms": 1, "min_replicas": 3, "latency": latency}
                }
            },
            "min_replicas <= initial_replicas <= max_replicas",
        ),
    ):
        with pytest.raises(ValueError, match=needle):
            AppArgs.model_validate(bad)


def test_decode_scales_down_when_the_load_above_the_fixed_step_cost_is_small():
    lat = Latency(a=75.0, b=0.005, c=3.2)
    few = _dec(4, 400, 400, 40_000)  # 4 short requests left on 2 replicas
    # one replica steps 75 + 2 + 12.8 ms: its load (14.8) is well within 0.7 x (112 - 75)
    assert decode_replicas(few, 2, lat, 140.0) == 1
    busy = _dec(12, 1200, 1200, 40_000)  # one replica: 75 + 6 + 38.4 = 119 ms > 112 ms
    assert decode_replicas(busy, 2, lat, 140.0) == 2  # stays: one replica (load 44) is over
