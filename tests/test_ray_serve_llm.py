"""Ray Serve LLM's configs (`build_pd_openai_app`, `build_openai_app`) read into splitserve's
AppArgs (app/ray_serve_llm.py): what Serve and the engines get equals the native config's, each
field lands where it means the same, and a field that would mean nothing here is refused with
its path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from app.builder import deployment_options
from app.config import AppArgs, MultiModelArgs
from app.ray_serve_llm import ConfigError, main, openai_app_args, pd_app_args

ROOT = Path(__file__).resolve().parent.parent


def _app_args(config: str) -> dict:
    return yaml.safe_load((ROOT / config).read_text())["applications"][0]["args"]


def _llm(**fields) -> dict:
    return {"model_loading_config": {"model_id": "SmolLM2-135M-Instruct"}} | fields


def _pd(prefill: dict | None = None, decode: dict | None = None, **args) -> AppArgs:
    raw = {"prefill_config": prefill or _llm(), "decode_config": decode or _llm(), **args}
    return AppArgs.model_validate(pd_app_args(raw, gpus=False))


def _served(cfg: AppArgs, phases=("prefill", "decode")) -> dict:
    """What Serve and the engines are given: deployment options and engine configs."""
    out = {"name": cfg.served_name, "mode": cfg.mode, "kv": cfg.kv_transport}
    out["ingress"] = cfg.ingress
    for phase in phases:
        args = getattr(cfg, phase)
        out[phase] = deployment_options(args, phase, phase, cfg.gpus_per_worker(phase))
        out[phase + "_engine"] = cfg.engine_config(phase)
        out[phase + "_stream"] = args.stream_batching_interval_ms
    return out


def test_the_example_config_is_the_default_application():
    """serve_config_ray_llm.yaml (Ray Serve LLM's schema) serves what serve_config.yaml does."""
    translated = AppArgs.model_validate(pd_app_args(_app_args("serve_config_ray_llm.yaml"), False))
    native = AppArgs.model_validate(_app_args("serve_config.yaml"))
    assert _served(translated) == _served(native)
    assert translated.served_name == "SmolLM2-135M-Instruct"


def test_engine_kwargs_by_their_vllm_names():
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4}
    kwargs = {
        "enable_chunked_prefill": True,
        "num_gpu_blocks_override": 77,
        "block_size": 32,
        "max_num_seqs": 5,
        "max_num_batched_tokens": 999,
        "enable_prefix_caching": True,
        "enforce_eager": True,
        "speculative_config": spec,
        "dtype": "bfloat16",
        "kv_cache_dtype": "fp8",
        "max_model_len": 1024,
        "scheduling_policy": "priority",
        "tool_call_parser": "hermes",
        "enable_auto_tool_choice": True,
        "override_generation_config": {"temperature": 0.5},
    }
    cfg = _pd(_llm(engine_kwargs=kwargs), _llm(engine_kwargs=kwargs))
    engine = cfg.engine_config("decode")
    assert (engine.num_kv_blocks, engine.block_size, engine.max_model_len) == (77, 32, 1024)
    assert engine.scheduler.chunked_prefill and engine.scheduler.enable_prefix_caching
    assert (engine.scheduler.max_num_seqs, engine.scheduler.max_num_batched_tokens) == (5, 999)
    assert engine.scheduler.policy == "priority" and engine.enforce_eager
    assert engine.speculative.num_speculative_tokens == 3
    assert cfg.engine_config("prefill").speculative is None  # it decodes no token past the first
    assert (engine.dtype, engine.kv_cache_dtype) == ("bfloat16", "fp8")
    assert cfg.tool_call_parser == "hermes"
    assert cfg.override_generation_config == {"temperature": 0.5}


def test_each_phase_gets_its_own_deployment_and_engine():
    prefill = _llm(
        engine_kwargs={"tensor_parallel_size": 2, "max_num_batched_tokens": 4096},
        deployment_config={"num_replicas": 3, "max_ongoing_requests": 7},
        accelerator_type="H100",
    )
    autoscaling = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}
    decode = _llm(
        engine_kwargs={"max_num_seqs": 128},
        deployment_config={
            "num_replicas": 2,  # Serve's rule: autoscaling_config sets the count
            "autoscaling_config": autoscaling,
            "ray_actor_options": {"num_cpus": 0.25, "accelerator_type": "A10G"},
            "health_check_period_s": 3,
        },
        accelerator_type="H100",  # ray_actor_options' own wins
        experimental_configs={"stream_batching_interval_ms": 50, "num_ingress_replicas": 2},
    )
    ingress = {"ray_actor_options": {"num_cpus": 0.2}, "graceful_shutdown_timeout_s": 40}
    cfg = _pd(prefill, decode, ingress_deployment_config=ingress)
    served = _served(cfg)
    assert served["prefill"]["num_replicas"] == 3 and served["prefill"]["max_ongoing_requests"] == 7
    assert served["prefill_engine"].tensor_parallel_size == 2
    assert served["prefill_engine"].scheduler.max_num_batched_tokens == 4096
    # the workers' bundles ask for Ray's accelerator resource; the replica schedules only
    workers = served["prefill"]["placement_group_bundles"][1:]
    assert [w["accelerator_type:H100"] for w in workers] == [0.001, 0.001]
    assert "accelerator_type" not in served["prefill"]["ray_actor_options"]
    assert "num_replicas" not in served["decode"]
    assert served["decode"]["autoscaling_config"] == autoscaling
    assert served["decode"]["ray_actor_options"] == {"num_cpus": 0.25, "accelerator_type": "A10G"}
    assert served["decode"]["health_check_period_s"] == 3
    assert served["decode_engine"].scheduler.max_num_seqs == 128
    assert served["decode_stream"] == 50 and served["prefill_stream"] == 0
    assert (cfg.ingress.num_replicas, cfg.ingress.num_cpus) == (2, 0.2)
    assert cfg.ingress.graceful_shutdown_timeout_s == 40
    # Ray Serve LLM sends an engine every request (its default is unbounded); here twice the
    # batch, unless the deployment_config says
    batch = _pd(decode=_llm(engine_kwargs={"max_num_seqs": 256}))
    assert batch.decode.max_ongoing_requests == 512


def test_one_model_config_is_served_colocated():
    config = _llm(
        engine_kwargs={"enable_chunked_prefill": True, "max_num_seqs": 9},
        deployment_config={"num_replicas": 2, "ray_actor_options": {"num_cpus": 1}},
    )
    cfg = AppArgs.model_validate(openai_app_args({"llm_configs": [config]}, gpus=False))
    assert cfg.mode == "colocated" and cfg.colocated.num_replicas == 2
    engine = cfg.engine_config("colocated")
    assert engine.scheduler.chunked_prefill and engine.scheduler.max_num_seqs == 9
    with pytest.raises(ConfigError, match="llm_configs: a list of LLMConfigs"):
        openai_app_args({"llm_configs": []}, gpus=False)


def test_several_models_are_served_behind_one_router():
    other = {"model_loading_config": {"model_id": "other", "model_source": "SmolLM2-135M-Instruct"}}
    config = _llm(deployment_config={"ray_actor_options": {"num_cpus": 0.5}})
    args = {
        "llm_configs": [config, other],
        "ingress_deployment_config": {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.2}},
    }
    multi = MultiModelArgs.model_validate(openai_app_args(args, gpus=False))
    assert [m.served_name for m in multi.models] == ["SmolLM2-135M-Instruct", "other"]
    assert all(m.mode == "colocated" and m.model is None for m in multi.models)
    assert multi.models[0].colocated.num_cpus == 0.5
    assert (multi.router.num_replicas, multi.router.num_cpus) == (2, 0.2)
    assert multi.models[1].ingress == AppArgs().ingress  # each model's Ingress: the default
    with pytest.raises(
        ConfigError,
        match=r"llm_configs\[1\].model_loading_config.model_id: .* is llm_configs\[0\]'s",
    ):
        openai_app_args({"llm_configs": [config, config]}, gpus=False)


def test_the_model_its_served_name_and_lora(tmp_path):
    (tmp_path / "adapters").mkdir()
    loading = {"model_id": "qwen", "model_source": "Qwen/Qwen2.5-0.5B-Instruct"}
    lora = {"dynamic_lora_loading_path": str(tmp_path / "adapters")}
    config = {"model_loading_config": loading, "lora_config": lora}
    args = pd_app_args({"prefill_config": config, "decode_config": config}, gpus=False)
    assert (args["model"], args["served_model_name"]) == ("Qwen/Qwen2.5-0.5B-Instruct", "qwen")
    assert (args["lora_dir"], args["max_loras"]) == (str(tmp_path / "adapters"), 16)
    assert "tokenizer" not in args  # the model's own
    tokenized = {**loading, "tokenizer_source": "Qwen/Qwen2.5-0.5B"}
    config = {"model_loading_config": tokenized}
    args = pd_app_args({"prefill_config": config, "decode_config": config}, gpus=False)
    assert args["tokenizer"] == "Qwen/Qwen2.5-0.5B"
    both = {**config, "engine_kwargs": {"tokenizer": "other/tok"}}
    with pytest.raises(ConfigError, match="tokenizer_source and engine_kwargs.tokenizer"):
        pd_app_args({"prefill_config": both, "decode_config": both}, gpus=False)
    remote = {**config, "lora_config": {"dynamic_lora_loading_path": "s3://bucket/loras"}}
    with pytest.raises(ConfigError, match="dynamic_lora_loading_path: cloud storage"):
        pd_app_args({"prefill_config": remote, "decode_config": remote}, gpus=False)


def test_the_device_follows_the_cluster_and_splitserve_fields_apply():
    args = pd_app_args({"prefill_config": _llm(), "decode_config": _llm()}, gpus=True)
    assert (args["device"], args["kv_transport"]) == ("cuda", "cuda_ipc")
    cpu = _llm(engine_kwargs={"device": "cpu"})
    assert pd_app_args({"prefill_config": cpu, "decode_config": cpu}, gpus=True)["device"] == "cpu"
    own = {"kv_transport": "object_store", "slo": {"ttft_ms": 500, "tpot_ms": 50}}
    cfg = _pd(splitserve=own)
    assert cfg.kv_transport == "object_store" and cfg.slo.ttft_ms == 500
    with pytest.raises(ConfigError, match=r"splitserve: \['mode'\] come from the LLMConfigs"):
        _pd(splitserve={"mode": "colocated"})


def test_runtime_env_reaches_the_replicas_and_the_ingress(monkeypatch):
    """A gated model's HF_TOKEN: the engines' replicas (their model workers inherit it), the
    Ingress (it loads the tokenizer) and the build's own check of the model all see it."""
    import app.builder as builder

    token = {"env_vars": {"HF_TOKEN": "hf_secret"}}
    decode = _llm(runtime_env=token, engine_kwargs={"tensor_parallel_size": 2})
    cfg = _pd(decode=decode)
    served = _served(cfg)
    assert served["decode"]["ray_actor_options"]["runtime_env"] == token  # the replica's
    assert "runtime_env" not in served["prefill"]["ray_actor_options"]
    assert cfg.ingress.runtime_env == token
    seen = []
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(builder, "check_model", lambda *_: seen.append(os.environ["HF_TOKEN"]))
    monkeypatch.setattr(builder, "_check_parallel", lambda cfg: None)
    builder.build_app(pd_app_args({"prefill_config": _llm(), "decode_config": decode}, False))
    assert seen == ["hf_secret"] and "HF_TOKEN" not in os.environ  # set for the check alone
    colocated = openai_app_args({"llm_configs": [_llm(runtime_env=token)]}, gpus=False)
    assert AppArgs.model_validate(colocated).ingress.runtime_env == token


def test_an_llm_config_in_its_own_file(tmp_path):
    path = tmp_path / "decode.yaml"
    path.write_text(yaml.safe_dump(_llm(engine_kwargs={"max_num_seqs": 3})))
    assert _pd(decode=str(path)).decode.engine.max_num_seqs == 3
    with pytest.raises(ConfigError, match="decode_config: .* is not a file"):
        _pd(decode=str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize(
    ("prefill", "decode", "message"),
    [
        (
            _llm(engine_kwargs={"swap_space": 4}),
            None,
            "prefill_config.engine_kwargs.swap_space: not a vLLM engine argument",
        ),
        (
            None,
            _llm(deployment_config={"user_config": {"a": 1}}),
            "decode_config.deployment_config.user_config: not served",
        ),
        (
            None,
            _llm(deployment_config={"ray_actor_options": {"memory": 10}}),
            "decode_config.deployment_config.ray_actor_options.memory: not served",
        ),
        (
            _llm(engine_kwargs={"dtype": "bfloat16"}),
            _llm(engine_kwargs={"dtype": "float32"}),
            "decode_config.engine_kwargs.dtype: 'float32', but prefill_config.engine_kwargs",
        ),
        (
            {"model_loading_config": {"model_id": "other"}},
            None,
            "model_loading_config differs",
        ),
        (
            _llm(placement_group_config={"bundles": [{"GPU": 1}]}),
            None,
            "placement_group_config: not served",
        ),
        (
            _llm(engine_kwargs={"trust_remote_code": True}),
            None,
            "trust_remote_code: True is not served",
        ),
        (_llm(engine_kwargs={"data_parallel_size": 2}), None, "data_parallel_size: 2 is not"),
        (
            _llm(engine_kwargs={"enable_auto_tool_choice": True}),
            None,
            "enable_auto_tool_choice: True is not served: tool_choice auto needs",
        ),
        (_llm(llm_engine="SGLang"), None, "prefill_config.llm_engine: Input should be .vLLM."),
        (
            _llm(unknown_field=1),
            None,
            "prefill_config.unknown_field: Extra inputs are not permitted",
        ),
        (
            _llm(engine_kwargs={"max_num_seqs": 0}),
            None,
            "prefill_config.engine_kwargs.max_num_seqs: Input should be greater than or equal to 1",
        ),
        (
            {"model_loading_config": {"model_id": "m", "model_source": "s3://b/m"}},
            {"model_loading_config": {"model_id": "m", "model_source": "s3://b/m"}},
            "model_source: cloud storage is not read",
        ),
    ],
)
def test_what_is_not_served_is_refused_by_its_path(prefill, decode, message):
    with pytest.raises(ConfigError, match=message):
        _pd(prefill, decode)


def test_gpu_memory_utilization_sizes_a_gpus_kv_cache():
    config = _llm(engine_kwargs={"gpu_memory_utilization": 0.45})
    cpu = _pd(config, config)  # ignored on CPU, as vLLM's CPU engine ignores it
    assert cpu.device == "cpu" and cpu.decode.engine.gpu_memory_utilization is None
    raw = {"prefill_config": config, "decode_config": config}
    gpu = AppArgs.model_validate(pd_app_args(raw, gpus=True))
    assert gpu.engine_config("decode").gpu_memory_utilization == 0.45
    assert gpu.engine_config("prefill").gpu_memory_utilization == 0.45


def test_the_cli_prints_the_native_config(tmp_path, capsys):
    main([str(ROOT / "serve_config_ray_llm.yaml")])
    printed = yaml.safe_load(capsys.readouterr().out)
    app = printed["applications"][0]
    assert app["import_path"] == "app.builder:build_app"
    native = AppArgs.model_validate(_app_args("serve_config.yaml"))
    assert _served(AppArgs.model_validate(app["args"])) == _served(native)
    assert printed["http_options"] == {"host": "127.0.0.1", "port": 8000}
