"""The placement search on synthetic profiles whose answer is known, and the emitted config."""

from __future__ import annotations

from dataclasses import replace

import pytest
import yaml

from deployments.serve_env import controller_options
from placement.latency_model import Coefficients, Entry, Profile
from placement.optimizer import Cluster, Search, high_affinity, low_affinity, optimize, table
from placement.plan import report, serve_config
from placement.simulator import SLO
from placement.workload import Workload

pytestmark = pytest.mark.unit

# A 100 ms prefill per request against a cheap decode: one decode instance keeps up with several
# prefill instances, so within 3 GPUs the best per-GPU goodput is 2 prefill : 1 decode.
CHEAP = Entry(1, 1, Coefficients(0.0, 1.0, 0.0), Coefficients(5.0, 0.0, 0.5), 10**6)


def make_search(entries, gpus: int = 3, **kw) -> Search:
    return Search(
        profile=Profile("synthetic", "test", entries),
        workload=Workload(150, input_len=100, output_len=20),
        slo=SLO(ttft_ms=300, tpot_ms=8),
        cluster=Cluster(1, gpus),
        kv_bytes_per_token=1000,
        max_replicas=3,
        **kw,
    )


def test_high_affinity_finds_the_two_prefill_one_decode_ratio():
    search = make_search([CHEAP])
    best = max(high_affinity(search), key=lambda c: c.per_gpu)
    assert (best.placement.prefill.count, best.placement.decode.count) == (2, 1)
    assert best.goodput_rps > 0


def test_disaggregation_beats_colocation_when_prefills_stall_decodes():
    candidates = optimize(make_search([CHEAP]))
    assert candidates[0].kind.startswith("disaggregated")
    best_colocated = next(c for c in candidates if c.kind == "colocated")
    assert candidates[0].per_gpu > best_colocated.per_gpu
    gain = report(candidates, make_search([CHEAP]))["gain_over_best_colocated"]
    assert gain == pytest.approx(candidates[0].per_gpu / best_colocated.per_gpu)
    assert "2P(tp1xpp1) + 1D(tp1xpp1)" in table(candidates)


def test_low_affinity_pairs_share_pp_and_fit_in_a_node():
    tp2 = Entry(2, 1, Coefficients(0.0, 0.6, 0.0), Coefficients(4.0, 0.0, 0.4), 10**6)
    pp2 = Entry(1, 2, Coefficients(0.0, 0.5, 0.0), Coefficients(3.0, 0.0, 0.3), 10**6)

    def layouts(search: Search) -> set:
        return {
            (
                (c.placement.prefill.entry.tp, c.placement.prefill.entry.pp),
                (c.placement.decode.entry.tp, c.placement.decode.entry.pp),
            )
            for c in low_affinity(search)
        }

    one_node = layouts(make_search([CHEAP, tp2, pp2], gpus=3))
    assert ((2, 1), (1, 1)) in one_node
    assert ((2, 1), (2, 1)) not in one_node  # tp 2 + 2 > 3 GPUs per node
    assert ((1, 2), (1, 2)) not in one_node  # two stage segments of 1 + 1 GPUs need 4
    two_nodes = layouts(replace(make_search([CHEAP, tp2, pp2]), cluster=Cluster(2, 3)))
    assert ((1, 2), (1, 2)) in two_nodes  # one stage segment on each node
    assert all(p[1] == d[1] for p, d in one_node | two_nodes)  # same pipeline depth both sides


def test_emitted_config_is_accepted_by_the_builder():
    from app.builder import build_app
    from app.config import AppArgs

    search = make_search([CHEAP])
    best = optimize(search)[0]
    config = yaml.safe_load(yaml.safe_dump(serve_config(best, search)))
    [app] = config["applications"]
    assert app["import_path"] == "app.builder:build_app"
    args = AppArgs.model_validate(app["args"])
    assert (args.prefill.num_replicas, args.decode.num_replicas) == (2, 1)
    assert config["controller_options"] == controller_options()  # as serve_config.yaml's
    # the ingress counts requests against the targets the plan was made for
    assert (args.slo.ttft_ms, args.slo.tpot_ms) == (search.slo.ttft_ms, search.slo.tpot_ms)
    # every replica plus the ingress fits in the cluster's 3 logical CPUs
    used = 2 * args.prefill.num_cpus + args.decode.num_cpus + args.ingress.num_cpus
    assert used <= search.cluster.num_gpus
    build_app(app["args"])  # binds the deployments exactly as `serve run` would


def test_emitted_autoscaling_starts_at_the_plan_and_carries_the_slo_and_profile():
    from app.builder import build_app, deployment_options
    from app.config import AppArgs

    search = make_search([CHEAP])
    best = optimize(search)[0]
    config = yaml.safe_load(yaml.safe_dump(serve_config(best, search, autoscale=2.0)))
    [app] = config["applications"]
    args = AppArgs.model_validate(app["args"])
    prefill, decode = args.prefill.autoscaling, args.decode.autoscaling
    assert (prefill.min_replicas, prefill.max_replicas) == (2, 4)  # planned 2 prefill
    assert (decode.min_replicas, decode.max_replicas) == (1, 2)
    assert prefill.ttft_target_ms == search.slo.ttft_ms
    assert decode.tpot_target_ms == search.slo.tpot_ms
    assert decode.latency.a == CHEAP.decode.a and prefill.latency.b == CHEAP.prefill.b
    options = deployment_options(args.prefill, "PrefillServer", "prefill")
    assert "num_replicas" not in options
    assert options["autoscaling_config"]["policy"]["policy_kwargs"]["ttft_target_ms"] == (
        search.slo.ttft_ms
    )
    build_app(app["args"])


def test_health_check_options_reach_serve_and_are_checked():
    from pydantic import ValidationError

    from app.builder import deployment_options
    from app.config import AppArgs

    defaults = deployment_options(AppArgs().decode, "DecodeServer", "decode")
    assert (defaults["health_check_period_s"], defaults["health_check_timeout_s"]) == (10, 10)
    args = AppArgs.model_validate(
        {"decode": {"health_check_period_s": 1, "health_check_timeout_s": 5}}
    )
    options = deployment_options(args.decode, "DecodeServer", "decode")
    assert (options["health_check_period_s"], options["health_check_timeout_s"]) == (1, 5)
    prefill = deployment_options(args.prefill, "PrefillServer", "prefill")
    assert prefill["health_check_period_s"] == 10  # per phase
    with pytest.raises(ValidationError, match="health_check_period_s"):
        AppArgs.model_validate({"prefill": {"health_check_period_s": 0}})
    # the engine's step limit (what the health check fails on), per phase, null for none
    args = AppArgs.model_validate(
        {"decode": {"step_timeout_s": 5}, "prefill": {"step_timeout_s": None}}
    )
    assert args.engine_config("decode").step_timeout_s == 5
    assert args.engine_config("prefill").step_timeout_s is None
    assert AppArgs().engine_config("colocated").step_timeout_s == 60
    with pytest.raises(ValidationError, match="step_timeout_s"):
        AppArgs.model_validate({"decode": {"step_timeout_s": 0}})


def test_every_deployment_drains_what_it_holds_before_it_is_removed():
    """Serve's graceful shutdown, 300 s by default for the engine replicas and the HTTP entries
    (an Ingress, a multi-model router) alike. The entries had Serve's 20 s: a `serve deploy`
    of changed args replaces every replica, and a stream longer than that was cut mid-answer
    (measured against `ray start` + `serve deploy`, a 600-token stream)."""
    from pydantic import ValidationError

    from app.builder import deployment_options, entry_options
    from app.config import AppArgs, MultiModelArgs

    args = AppArgs()
    options = [
        deployment_options(args.decode, "DecodeServer", "decode"),
        entry_options(args.ingress, "Ingress", args.ingress.runtime_env),
        entry_options(MultiModelArgs.model_validate({"models": [{}]}).router, "ModelRouter"),
    ]
    assert [o["graceful_shutdown_timeout_s"] for o in options] == [300, 300, 300]
    env = {"env_vars": {"HF_TOKEN": "x"}}
    args = AppArgs.model_validate(
        {"ingress": {"graceful_shutdown_timeout_s": 30, "num_replicas": 2, "runtime_env": env}}
    )
    ingress = entry_options(args.ingress, "Ingress", args.ingress.runtime_env)
    assert (ingress["graceful_shutdown_timeout_s"], ingress["num_replicas"]) == (30, 2)
    assert ingress["ray_actor_options"] == {"num_cpus": 0.1, "runtime_env": env}
    assert ingress["health_check_timeout_s"] == 10  # the checks' options beside it
    with pytest.raises(ValidationError, match="ingress.graceful_shutdown_timeout_s"):
        AppArgs.model_validate({"ingress": {"graceful_shutdown_timeout_s": -1}})


def test_serve_sends_a_replica_twice_its_batch_unless_told(caplog):
    """max_ongoing_requests follows the engine's max_num_seqs (a fixed 64 capped the batch of a
    replica with max_num_seqs 256 at 64); a value below the batch is taken, with a warning."""
    import logging

    from app.builder import deployment_options
    from app.config import AppArgs

    assert AppArgs().decode.max_ongoing_requests == 64  # the default engine's 32
    args = AppArgs.model_validate(
        {
            "decode": {"engine": {"max_num_seqs": 256}},
            "prefill": {"engine": {"max_num_seqs": 8}, "max_ongoing_requests": 4},
        }
    )
    assert args.decode.max_ongoing_requests == 512 and args.prefill.max_ongoing_requests == 4
    with caplog.at_level(logging.WARNING, logger="app.builder"):
        assert (
            deployment_options(args.decode, "DecodeServer", "decode")["max_ongoing_requests"] == 512
            and not caplog.records
        )
        deployment_options(args.prefill, "PrefillServer", "prefill")
    assert "PrefillServer: max_ongoing_requests 4 is below engine.max_num_seqs 8" in caplog.text


def test_the_apps_slo_is_checked_with_errors_that_name_the_field():
    from app.config import AppArgs

    assert AppArgs().slo is None  # not counted unless set
    for bad, field in (
        ({"ttft_ms": 0, "tpot_ms": 50}, "slo.ttft_ms"),
        ({"ttft_ms": 400}, "slo.tpot_ms"),
        ({"ttft_ms": 400, "tpot_ms": 50, "p90": 1}, "slo.p90"),
    ):
        with pytest.raises(ValueError, match=field):
            AppArgs.model_validate({"slo": bad})


def test_a_plan_raises_the_step_timeout_only_where_a_step_it_allows_nears_the_default():
    """A watchdog for hung steps must not replace healthy replicas: the plan's longest step
    (a prefill of the whole token budget; a decode batch whose contexts fill the cache) times
    the margin, in whole seconds, when that exceeds the engine's 60 s."""
    from app.config import AppArgs
    from placement.plan import step_timeout_s
    from placement.simulator import InstanceSpec

    # 1 ms a prompt token: 2048 tokens take 2 s, 20 s with the margin; decode 5 + 0.5 x 128 ms
    assert step_timeout_s(InstanceSpec(CHEAP), "prefill") is None
    assert step_timeout_s(InstanceSpec(CHEAP), "colocated") is None
    slow = replace(CHEAP, prefill=Coefficients(0.0, 5.0, 0.001))  # 2048 tokens: 14,434 ms
    assert step_timeout_s(InstanceSpec(slow), "prefill") == 145.0
    assert step_timeout_s(InstanceSpec(slow), "decode") is None
    assert step_timeout_s(InstanceSpec(slow), "colocated") == 145.0
    # 10^6 tokens of context at 0.01 ms each: a 10.07 s decode step (5 + 0.5 x 128 ms besides)
    long_context = replace(CHEAP, decode=Coefficients(5.0, 0.01, 0.5))
    assert step_timeout_s(InstanceSpec(long_context), "decode") == 101.0
    # and in the emitted config, which the app accepts, per phase
    search = make_search([CHEAP])
    best = optimize(search)[0]
    best = replace(
        best,
        placement=replace(
            best.placement, decode=replace(best.placement.decode, entry=long_context)
        ),
    )
    args = AppArgs.model_validate(serve_config(best, search)["applications"][0]["args"])
    assert args.decode.step_timeout_s == 101.0 and args.prefill.step_timeout_s == 60.0
    assert args.engine_config("decode").step_timeout_s == 101.0
