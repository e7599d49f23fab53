"""`python -m placement plan | simulate`: argument parsing, rate targets, and both commands run
end to end on a 13B config (no weights) and on the synthetic profile of test_optimizer."""

from __future__ import annotations

import json

import pytest
import yaml

from app.config import AppArgs
from placement import plan, simulate
from placement.__main__ import main as placement_main
from placement.cli_args import parse_lengths
from placement.optimizer import meet_rate, optimize
from placement.simulate import parse_instance
from placement.simulator import Placement, goodput
from tests.test_analytic import LLAMA_13B, _write
from tests.test_optimizer import CHEAP, make_search

pytestmark = pytest.mark.unit


def test_workload_and_instance_specs_parse_or_say_what_is_wrong():
    assert parse_lengths("512:64") == (512, 64)
    assert parse_lengths("100-900:32-128") == ((100, 900), (32, 128))
    for bad in ("512", "512:x", "9-3:64", "0:64"):
        with pytest.raises(ValueError, match="workload"):
            parse_lengths(bad)
    assert parse_instance("2x1:3") == (2, 1, 3) and parse_instance("1x2") == (1, 2, 1)
    for bad in ("2x:1", "0x1:1", "1x1:0", "tp2"):
        with pytest.raises(ValueError, match="TPxPP:COUNT"):
            parse_instance(bad)


def test_meet_rate_takes_the_fewest_gpus_that_reach_it_else_replicates_the_best():
    search = make_search([CHEAP], gpus=8)
    candidates = optimize(search)
    best = candidates[0]
    low = meet_rate(candidates, search, best.goodput_rps / 4)
    assert low.goodput_rps >= best.goodput_rps / 4
    assert low.num_gpus == min(c.num_gpus for c in candidates if c.goodput_rps >= low.goodput_rps)
    top = max(c.goodput_rps for c in candidates)
    more = meet_rate(candidates, search, 1.2 * top)  # beyond every candidate: replicated
    assert more.goodput_rps >= 1.2 * top and more.num_gpus <= 8
    assert more.num_gpus % best.num_gpus == 0
    with pytest.raises(ValueError, match="more than 8 GPUs"):
        meet_rate(candidates, search, 100 * top)


def test_plan_from_a_device_spec_writes_a_config_and_meets_the_rate(tmp_path, capsys):
    model = _write(tmp_path, LLAMA_13B)
    out, rep = tmp_path / "serve.yaml", tmp_path / "plan.json"
    argv = [
        "plan", "--device", "A100-80GB", "--model", str(model), "--cluster", "1x4",
        "--workload", "512:64", "--ttft-slo", "400", "--tpot-slo", "60", "--num-requests", "60",
        "--rate", "12", "-o", str(out), "--report", str(rep),
    ]  # fmt: skip
    placement_main(argv)
    report = json.loads(rep.read_text())
    chosen = report["chosen_for_rate"]
    assert chosen["rate"] == 12 and "for 12.0 req/s" in capsys.readouterr().out
    args = yaml.safe_load(out.read_text())["applications"][0]["args"]
    assert args["model"] == str(tmp_path)  # the directory serve run loads
    assert args["device"] == "cuda" and args["dtype"] == "bfloat16"  # planned for A100s
    if args["mode"] == "disaggregated":
        assert args["kv_transport"] == "cuda_ipc"  # one node: same or peer GPU
    AppArgs.model_validate(args)  # serve run would accept it
    engines = {p: args[p]["engine"] for p in ("prefill", "decode", "colocated") if p in args}
    # a multi-GPU replica among them (13B in bf16 at 12 req/s: tp2), its share accepted
    units = [e["tensor_parallel_size"] * e["pipeline_parallel_size"] for e in engines.values()]
    assert max(units) > 1
    for phase, engine in engines.items():
        # the KV cache the plan counted on: what the weights leave of 0.9 of each GPU, every
        # worker of a multi-GPU replica measuring its own
        assert engine["gpu_memory_utilization"] == 0.9, phase
        assert "kv_cache_memory_mb" not in engine, phase
    replicas = sum(
        args[p]["num_replicas"] * args[p]["engine"]["tensor_parallel_size"]
        * args[p]["engine"]["pipeline_parallel_size"]
        for p in ("prefill", "decode", "colocated") if p in args
    )  # fmt: skip
    assert 1 <= replicas <= 4
    best = report["candidates"][0]
    assert best["goodput_rps"] > 0 and best["p90_ttft_ms"] <= 400 * 1.01  # 90% meet it
    assert max(c["gpus"] for c in report["candidates"]) <= 4  # nothing beyond the cluster


def test_a_gpu_plans_single_gpu_replicas_fill_the_share_it_counted_on(tmp_path):
    """The roofline counts on 0.9 of each GPU for weights and KV cache: a single-GPU replica
    of the plan sizes its KV cache to that share (gpu_memory_utilization), not to
    kv_cache_memory_mb's default."""
    out = tmp_path / "serve.yaml"
    argv = [
        "plan", "--device", "A100-80GB", "--model", "default", "--cluster", "1x2",
        "--workload", "512:64", "--ttft-slo", "400", "--tpot-slo", "60", "--num-requests", "40",
        "-o", str(out),
    ]  # fmt: skip
    placement_main(argv)
    args = yaml.safe_load(out.read_text())["applications"][0]["args"]
    engines = [args[p]["engine"] for p in ("prefill", "decode", "colocated") if p in args]
    assert engines and all(e["gpu_memory_utilization"] == 0.9 for e in engines)
    assert (
        AppArgs.model_validate(args)
        .engine_config("colocated" if "colocated" in args else "decode")
        .memory_share.share
        == 0.9
    )


def test_a_plan_for_an_fp8_kv_cache_serves_with_one(tmp_path):
    out = tmp_path / "serve.yaml"
    argv = [
        "plan", "--device", "A100-80GB", "--model", str(_write(tmp_path, LLAMA_13B)),
        "--cluster", "1x2", "--workload", "512:64", "--ttft-slo", "400", "--tpot-slo", "60",
        "--num-requests", "30", "--kv-cache-dtype", "fp8", "-o", str(out),
    ]  # fmt: skip
    placement_main(argv)
    args = yaml.safe_load(out.read_text())["applications"][0]["args"]
    assert AppArgs.model_validate(args).kv_cache_dtype == "fp8"


def test_a_model_the_workers_cannot_split_is_planned_on_one_worker_per_replica(
    tmp_path, capsys, monkeypatch
):
    """Every family the planner reads is one the workers split (OPT, Phi-3 and Mixtral here),
    and gets tp x pp candidates. A family the workers could not split (OPT until 2026-12-04;
    here OPT taken off the engine's list) gets no tp x pp candidate, and the written config
    starts."""
    from placement import hardware

    opt = {**LLAMA_13B, "model_type": "opt", "ffn_dim": 20480, "max_position_embeddings": 2048}
    phi3 = {**LLAMA_13B, "model_type": "phi3"}
    mixtral = {**LLAMA_13B, "model_type": "mixtral", "num_local_experts": 2}
    mixtral["num_experts_per_tok"] = 1  # 21.5B: one H100 holds it
    not_opt = tuple(t for t in hardware.PARALLEL_MODEL_TYPES if t != "opt")
    for cfg, split in ((opt, False), (opt, True), (phi3, True), (mixtral, True)):
        types = hardware.PARALLEL_MODEL_TYPES if split else not_opt
        monkeypatch.setattr(hardware, "PARALLEL_MODEL_TYPES", types)
        model = _write(tmp_path, cfg)
        out, rep = tmp_path / "serve.yaml", tmp_path / "plan.json"
        argv = [
            "plan", "--device", "H100-80GB", "--model", str(model), "--cluster", "1x4",
            "--workload", "512:64", "--ttft-slo", "400", "--tpot-slo", "60",
            "--num-requests", "40", "-o", str(out), "--report", str(rep),
        ]  # fmt: skip
        placement_main(argv)
        monkeypatch.undo()
        candidates = json.loads(rep.read_text())["candidates"]
        assert any("tp2" in c["placement"] or "pp2" in c["placement"] for c in candidates) == split
        one_worker = f"{cfg['model_type']} runs on one worker per replica"
        assert (one_worker in capsys.readouterr().out) != split
        AppArgs.model_validate(yaml.safe_load(out.read_text())["applications"][0]["args"])


def test_plan_refuses_a_rate_the_cluster_cannot_serve(tmp_path):
    model = _write(tmp_path, LLAMA_13B)
    argv = [
        "--device", "A100-80GB", "--model", str(model), "--cluster", "1x2", "--ttft-slo", "400",
        "--tpot-slo", "60", "--num-requests", "40", "--rate", "10000", "-o",
        str(tmp_path / "x.yaml"),
    ]  # fmt: skip
    with pytest.raises(SystemExit, match="more than 2 GPUs"):
        plan.main(argv)


def test_a_plan_from_costs_measured_in_a_serve_mode_says_how_to_start_serve(tmp_path, capsys):
    """A profile whose serving costs were measured in Serve's haproxy mode: the plan sizes its
    front end for that mode, and the written config (still YAML that the server accepts) and
    the report say to start Serve with the mode's settings; in the default mode, nothing."""
    from dataclasses import replace

    from placement.frontend import ServingCost

    model = _write(tmp_path, LLAMA_13B)
    for mode in ("haproxy", "default"):
        profile = tmp_path / f"{mode}.yaml"
        serving = ServingCost(serve_mode=mode)
        replace(make_search([CHEAP]).profile, serving=serving).save(profile)
        out, rep = tmp_path / f"{mode}-serve.yaml", tmp_path / f"{mode}.json"
        plan.main([
            "--profile", str(profile), "--model", str(model), "--cluster", "1x3",
            "--workload", "100:20", "--ttft-slo", "300", "--tpot-slo", "8",
            "--num-requests", "150", "-o", str(out), "--report", str(rep),
        ])  # fmt: skip
        text, printed = out.read_text(), capsys.readouterr().out
        AppArgs.model_validate(yaml.safe_load(text)["applications"][0]["args"])
        report = json.loads(rep.read_text())
        if mode == "default":
            assert not text.startswith("#") and "serve_env" not in report
            assert "serve run" not in printed
            continue
        start = f"RAY_SERVE_THROUGHPUT_OPTIMIZED=1 RAY_SERVE_ENABLE_HA_PROXY=1 serve run {out}"
        assert text.splitlines()[0].endswith(start) and "haproxy mode" in text.splitlines()[0]
        assert start in printed
        assert report["serve_env"] == {
            "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"
        }  # fmt: skip


def test_simulate_reports_the_same_goodput_as_the_simulator(tmp_path, capsys):
    profile = tmp_path / "p.yaml"
    make_search([CHEAP]).profile.save(profile)
    model = _write(tmp_path, LLAMA_13B)
    common = [
        "--profile", str(profile), "--model", str(model), "--cluster", "1x3",
        "--workload", "100:20", "--ttft-slo", "300", "--tpot-slo", "8", "--num-requests", "150",
    ]  # fmt: skip
    simulate.main([*common, "--prefill", "1x1:2", "--decode", "1x1:1", "--rates", "5", "50"])
    printed = capsys.readouterr().out
    search = make_search([CHEAP])
    spec = search.spec(CHEAP)
    from dataclasses import replace

    expected = goodput(
        Placement(prefill=replace(spec, count=2, max_batch_size=128), decode=spec,
                  kv_transfer_ms_per_token=search.transfer_ms_per_token(300.0)),
        search.workload, search.slo, 0.9,
    )  # fmt: skip
    assert f"goodput: {expected.rate:.3f} req/s" in printed
    assert "| 5 | 1.000 |" in printed  # far below the goodput: every request meets both SLOs
    with pytest.raises(SystemExit, match="not both"):
        simulate.main([*common, "--colocated", "1x1:1", "--prefill", "1x1:1"])
    with pytest.raises(SystemExit, match="no entry for tp=2"):
        simulate.main([*common, "--colocated", "2x1:1"])


def test_simulate_with_a_served_profile_shows_the_band_of_single_runs(tmp_path, capsys):
    """A profile with step wander: beside each rate's mean attainment, the range 90% of
    single runs of those requests reach (the simulator's attainment_band, a second path)."""
    from dataclasses import replace

    from placement.latency_model import Profile
    from placement.simulator import SLO, attainment_band
    from placement.wander import StepWander
    from placement.workload import Workload

    plain = make_search([CHEAP]).profile
    wander = StepWander(0.3, 500.0, 0.1, run_sd=0.2)
    profile = tmp_path / "p.yaml"
    Profile(plain.model, plain.device, plain.entries, 0.0, wander).save(profile)
    model = _write(tmp_path, LLAMA_13B)
    simulate.main([
        "--profile", str(profile), "--model", str(model), "--cluster", "1x1",
        "--workload", "100:20", "--ttft-slo", "300", "--tpot-slo", "8", "--num-requests", "40",
        "--colocated", "1x1:1", "--rates", "20",
    ])  # fmt: skip
    printed = capsys.readouterr().out
    assert "| rate req/s | attainment | 90% of runs |" in printed
    spec = replace(make_search([CHEAP]).spec(CHEAP), max_batch_size=128)
    placement = Placement(colocated=spec, wander=wander)
    low, high = attainment_band(placement, Workload(40, 100, 20).sample(20.0, 0), SLO(300, 8))
    assert low < high and f" | {low:.3f}-{high:.3f} | " in printed


def test_unknown_command_shows_the_commands():
    with pytest.raises(SystemExit, match="plan"):
        placement_main(["deploy"])


def test_planned_kv_transport_fits_the_device_and_the_node_count():
    picks = {(d, n): plan._kv_transport(d, n) for d in ("cpu", "cuda") for n in (1, 4)}
    assert picks == {
        ("cpu", 1): "shm",
        ("cpu", 4): "object_store",
        ("cuda", 1): "cuda_ipc",  # the same or a peer GPU
        ("cuda", 4): "nccl",  # GPU to GPU across nodes, not through host memory
    }
    for (device, _), transport in picks.items():  # each pick passes the config's own checks
        AppArgs(device=device, kv_transport=transport)
