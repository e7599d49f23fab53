"""Ray Serve LLM's application configs, served by splitserve: a migration with no rewrite.

A serve_config.yaml written for Ray Serve LLM's prefill/decode application
(`import_path: ray.serve.llm:build_pd_openai_app`) or its OpenAI application
(`ray.serve.llm:build_openai_app`) runs here with only its import_path changed, to
`app.ray_serve_llm:build_pd_openai_app` (disaggregated) or `app.ray_serve_llm:build_openai_app`
(each model colocated, as vLLM serves it; several models behind one router,
app/model_router.py). Each LLMConfig is read into splitserve's AppArgs:
`model_loading_config`, the vLLM `engine_kwargs` that splitserve serves (PHASE_KWARGS,
APP_KWARGS, INERT_KWARGS), `deployment_config`, `accelerator_type`, `lora_config` and
`experimental_configs`. A field that would mean nothing here is refused where `serve run`
builds the application, named with its path, never dropped in silence. Settings that Ray
Serve LLM has no field for (kv_transport, slo, ...) go in an extra top-level `splitserve`
mapping of AppArgs' own fields.

`python -m app.ray_serve_llm serve_config.yaml` prints the config in splitserve's own schema
(`--gpus`: for a cluster with GPUs).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.config import AppArgs, MultiModelArgs, PhaseArgs
from engine.model_store import is_default_model

logger = logging.getLogger(__name__)

# vLLM engine arguments that set one deployment's engine -> the EngineArgs field
PHASE_KWARGS = {
    "tensor_parallel_size": "tensor_parallel_size",
    "pipeline_parallel_size": "pipeline_parallel_size",
    "max_num_seqs": "max_num_seqs",
    "max_num_batched_tokens": "max_num_batched_tokens",
    "enable_prefix_caching": "enable_prefix_caching",
    "enable_chunked_prefill": "chunked_prefill",
    "block_size": "block_size",
    "num_gpu_blocks_override": "num_kv_blocks",
    "enforce_eager": "enforce_eager",
    "gpu_memory_utilization": "gpu_memory_utilization",  # on GPUs (_phase)
    "speculative_config": "speculative_config",
    # splitserve's own, for what vLLM sizes by other means (VLLM_CPU_KVCACHE_SPACE, ...)
    **{name: name for name in ("kv_cache_memory_mb", "num_threads", "worker_num_cpus")},
}
# vLLM engine arguments that set the whole application (the same AppArgs field), so prefill
# and decode must agree on them: a hand-off moves KV between engines of one model and dtype
APP_KWARGS = (
    "dtype",
    "kv_cache_dtype",
    "max_model_len",
    "revision",
    "tokenizer",
    "tokenizer_revision",
    "device",
    "generation_config",
    "override_generation_config",
    "scheduling_policy",
    "tool_call_parser",
    "reasoning_parser",
    "chat_template",
    "default_chat_template_kwargs",
    "max_loras",
)
# vLLM engine arguments accepted for what they mean here (checked in _inert_kwarg)
INERT_KWARGS = {
    "kv_transfer_config": "the KV channel is splitserve's own (`splitserve: {kv_transport}`)",
    "distributed_executor_backend": "model workers are Ray actors",
    "disable_log_stats": "engine metrics always go to Ray's Prometheus endpoint",
    "enable_log_requests": "requests are not logged",
    "disable_log_requests": "requests are not logged",
    "enable_lora": "an adapter is served once lora_config names where it is",
    "max_lora_rank": "adapters of any rank are served",
    "enable_auto_tool_choice": "tool_choice auto needs tool_call_parser",
    "trust_remote_code": "splitserve runs no model code from the Hub",
    "data_parallel_size": "replicas are data parallel: set deployment_config.num_replicas",
}
# deployment_config (Serve's deployment options) -> the PhaseArgs field
DEPLOYMENT_FIELDS = (
    "num_replicas",
    "autoscaling_config",
    "max_ongoing_requests",
    "health_check_period_s",
    "health_check_timeout_s",
    "graceful_shutdown_timeout_s",
    "max_replicas_per_node",
    "placement_group_strategy",
)
ACTOR_FIELDS = ("num_cpus", "num_gpus", "accelerator_type")
INGRESS_FIELDS = (
    "num_replicas",
    "max_ongoing_requests",
    "health_check_period_s",
    "health_check_timeout_s",
    "graceful_shutdown_timeout_s",
)
_REMOTE = ("s3://", "gs://", "abfss://", "azure://")
# AppArgs fields that the LLMConfigs set, so not `splitserve`'s
_TRANSLATED = {"model", "served_model_name", "mode", "ingress", "prefill", "decode", "colocated"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelLoadingConfig(_Strict):
    model_id: str = Field(min_length=1)  # the name requests give
    model_source: str | None = None  # a Hub id or a local directory; None: model_id
    tokenizer_source: str | None = None


class LoraConfig(_Strict):
    dynamic_lora_loading_path: str | None = None
    max_num_adapters_per_replica: int = Field(16, ge=1)  # Ray Serve LLM's default
    download_timeout_s: float | None = None  # nothing is downloaded: adapters are local
    max_download_tries: int | None = None


class LLMConfig(_Strict):
    model_loading_config: ModelLoadingConfig
    llm_engine: Literal["vLLM"] = "vLLM"
    engine_kwargs: dict[str, Any] = {}
    accelerator_type: str | None = None
    deployment_config: dict[str, Any] = {}
    lora_config: LoraConfig | None = None
    experimental_configs: dict[str, Any] = {}
    log_engine_metrics: bool | None = True  # they always are
    runtime_env: dict | None = None
    placement_group_config: dict | None = None
    callback_config: dict | None = None


class ConfigError(ValueError):
    """A Ray Serve LLM field that splitserve cannot serve, named by its path."""


def build_pd_openai_app(args: dict):
    """Ray Serve LLM's `build_pd_openai_app` args (prefill_config, decode_config,
    ingress_deployment_config) -> splitserve's disaggregated application."""
    from app.builder import build_app

    return build_app(pd_app_args(args, _cluster_has_gpus()))


def build_openai_app(args: dict):
    """Ray Serve LLM's `build_openai_app` args -> splitserve's application, each model served
    colocated (one deployment runs prefill and decode, as vLLM does); several models behind
    one endpoint, as Ray Serve LLM serves them (app/model_router.py)."""
    from app.builder import build_app, build_multi_model_app

    read = openai_app_args(args, _cluster_has_gpus())
    return build_multi_model_app(read) if "models" in read else build_app(read)


def pd_app_args(args: Mapping, gpus: bool) -> dict:
    """AppArgs (as a dict) of a prefill/decode application; `gpus`: the cluster has GPUs (where
    Ray Serve LLM runs its engines, unless engine_kwargs.device says otherwise)."""
    args = dict(args)
    for deprecated in ("proxy_cls_config", "proxy_deployment_config"):  # Ray ignores them too
        if args.pop(deprecated, None) is not None:
            logger.warning("%s: deprecated by Ray Serve LLM and ignored", deprecated)
    extra = _pop_extras(args)
    _no_unknown(args, ("prefill_config", "decode_config"), "")
    configs = {k: _llm_config(args.get(k), k) for k in ("prefill_config", "decode_config")}
    prefill, decode = configs["prefill_config"], configs["decode_config"]
    if prefill.model_loading_config != decode.model_loading_config:
        raise ConfigError(
            "prefill_config and decode_config: model_loading_config differs; prefill and "
            "decode serve one model"
        )
    app = _agreed_app_fields(configs, gpus)
    on_gpu = _on_gpu(app)
    phases = {k.removesuffix("_config"): _phase(c, k, on_gpu) for k, c in configs.items()}
    ingress = _ingress(extra["ingress_deployment_config"], configs.values()) | _env(decode)
    return _app_args(decode, app, "disaggregated", phases, ingress, extra["splitserve"])


def openai_app_args(args: Mapping, gpus: bool) -> dict:
    """The args of Ray Serve LLM's OpenAI application, each model served colocated: one
    LLMConfig's AppArgs (as a dict), or several models' MultiModelArgs (app/model_router.py;
    ingress_deployment_config then sets the router's deployment)."""
    args = dict(args)
    extra = _pop_extras(args)
    _no_unknown(args, ("llm_configs",), "")
    listed = args.get("llm_configs")
    if not isinstance(listed, list) or not listed:
        raise ConfigError("llm_configs: a list of LLMConfigs (or of their YAML files' paths)")
    configs = [_llm_config(c, f"llm_configs[{i}]") for i, c in enumerate(listed)]
    ids = [c.model_loading_config.model_id for c in configs]
    for i, model_id in enumerate(ids):
        if model_id in ids[:i]:
            raise ConfigError(
                f"llm_configs[{i}].model_loading_config.model_id: {model_id!r} is "
                f"llm_configs[{ids.index(model_id)}]'s already; each model needs its own"
            )
    ingress = _ingress(extra["ingress_deployment_config"], configs)
    models = []
    for i, config in enumerate(configs):
        where = f"llm_configs[{i}]"
        app = _agreed_app_fields({where: config}, gpus)
        phases = {"colocated": _phase(config, where, _on_gpu(app))}
        own_ingress = (ingress if len(configs) == 1 else {}) | _env(config)
        models.append(_app_args(config, app, "colocated", phases, own_ingress, extra["splitserve"]))
    if len(models) == 1:
        return models[0]
    multi = {"models": models, "router": ingress}
    try:
        MultiModelArgs.model_validate(multi)
    except ValidationError as e:
        raise ConfigError(_fields(e, "llm_configs")) from None
    return multi


def _app_args(
    config: LLMConfig, app: dict, mode: str, phases: dict, ingress: dict, own: dict
) -> dict:
    loading = config.model_loading_config
    source = loading.model_source or loading.model_id
    model = None if is_default_model(source) else source  # None: the embedded model
    out = {"model": model, "served_model_name": loading.model_id, "mode": mode, **app}
    if loading.tokenizer_source not in (None, source):
        if "tokenizer" in app:
            raise ConfigError("tokenizer_source and engine_kwargs.tokenizer: give one")
        out["tokenizer"] = loading.tokenizer_source
    out |= {"ingress": ingress, **phases}
    if clash := set(own) & _TRANSLATED:
        raise ConfigError(f"splitserve: {sorted(clash)} come from the LLMConfigs")
    out |= own
    try:
        AppArgs.model_validate(out)  # AppArgs' own errors, with the config they came from
    except ValidationError as e:
        raise ConfigError(_fields(e, "the config read into splitserve's AppArgs")) from None
    return out


def _pop_extras(args: dict) -> dict:
    ingress_cls = args.pop("ingress_cls_config", None)
    if ingress_cls:
        raise ConfigError("ingress_cls_config: splitserve's ingress is its own")
    own = args.pop("splitserve", None) or {}
    if not isinstance(own, dict):
        raise ConfigError("splitserve: a mapping of AppArgs fields")
    return {
        "ingress_deployment_config": args.pop("ingress_deployment_config", None) or {},
        "splitserve": own,
    }


def _llm_config(value: Any, where: str) -> LLMConfig:
    if value is None:
        raise ConfigError(f"{where}: missing")
    if isinstance(value, str):  # Ray Serve LLM's: a path to the LLMConfig's YAML
        path = Path(value).expanduser()
        if not path.is_file():
            raise ConfigError(f"{where}: {value!r} is not a file")
        value = yaml.safe_load(path.read_text())
    try:
        config = LLMConfig.model_validate(value)
    except ValidationError as e:
        raise ConfigError(_fields(e, where)) from None
    for field in ("placement_group_config", "callback_config"):
        if getattr(config, field):
            raise ConfigError(f"{where}.{field}: not served by splitserve ({_UNSERVED[field]})")
    if isinstance(
        config.model_loading_config.model_source, str
    ) and config.model_loading_config.model_source.startswith(_REMOTE):
        raise ConfigError(
            f"{where}.model_loading_config.model_source: cloud storage is not read; give a "
            "Hugging Face Hub id or a directory every node sees"
        )
    return config


_UNSERVED = {
    "placement_group_config": "model workers' bundles come from tensor_parallel_size, "
    "pipeline_parallel_size and engine_kwargs.worker_num_cpus",
    "callback_config": "no engine callbacks",
}


def _fields(error: ValidationError, where: str) -> str:
    """pydantic's errors, each `path.to.field: why`."""
    return "; ".join(
        f"{'.'.join([where, *map(str, e['loc'])])}: {e['msg']}" for e in error.errors()
    )


def _no_unknown(given: Mapping, known, where: str) -> None:
    if unknown := sorted(set(given) - set(known)):
        prefix = f"{where}." if where else ""
        raise ConfigError(f"{', '.join(prefix + k for k in unknown)}: not served by splitserve")


def _agreed_app_fields(configs: dict[str, LLMConfig], gpus: bool) -> dict:
    """The application-wide fields: engine_kwargs' APP_KWARGS and the LoRA settings, which
    every config must give alike (or leave out)."""
    fields: dict[str, tuple[str, Any]] = {}  # field -> (the config that set it, value)
    for name, config in configs.items():
        kwargs = config.engine_kwargs
        for key in APP_KWARGS:
            if key in kwargs:
                _agree(fields, key, kwargs[key], f"{name}.engine_kwargs")
        for key, value in _lora_fields(config.lora_config, f"{name}.lora_config").items():
            _agree(fields, key, value, f"{name}.lora_config")
        for key, value in kwargs.items():
            if key in INERT_KWARGS:
                _inert_kwarg(key, value, kwargs, f"{name}.engine_kwargs")
            elif key not in APP_KWARGS and key not in PHASE_KWARGS:
                raise ConfigError(
                    f"{name}.engine_kwargs.{key}: not a vLLM engine argument splitserve serves "
                    f"(README: Ray Serve LLM configs)"
                )
    app = {key: value for key, (_, value) in fields.items()}
    if app.get("device", "auto") == "auto":
        app["device"] = "cuda" if gpus else "cpu"
    if len(configs) == 2:  # prefill and decode: the KV channel of the replicas' device
        app["kv_transport"] = "cuda_ipc" if _on_gpu(app) else "shm"
    return app


def _on_gpu(app: dict) -> bool:
    return str(app["device"]).startswith("cuda")


def _agree(fields: dict, key: str, value: Any, where: str) -> None:
    if key in fields and fields[key][1] != value:
        first, seen = fields[key]
        raise ConfigError(
            f"{where}.{key}: {value!r}, but {first}.{key}: {seen!r}; one value serves the "
            "application"
        )
    fields.setdefault(key, (where, value))


def _inert_kwarg(key: str, value: Any, kwargs: Mapping, where: str) -> None:
    """Accept an INERT_KWARGS argument where its value means what splitserve does."""
    refused = {
        "enable_auto_tool_choice": bool(value) and "tool_call_parser" not in kwargs,
        "trust_remote_code": bool(value),
        "data_parallel_size": value != 1,
    }.get(key, False)
    if refused:
        raise ConfigError(f"{where}.{key}: {value!r} is not served: {INERT_KWARGS[key]}")


def _lora_fields(lora: LoraConfig | None, where: str) -> dict:
    if lora is None:
        return {}
    out = {"max_loras": lora.max_num_adapters_per_replica}
    path = lora.dynamic_lora_loading_path
    if path is not None and path.startswith(_REMOTE):
        raise ConfigError(
            f"{where}.dynamic_lora_loading_path: cloud storage is not read; give a directory "
            "every node sees (each subdirectory an adapter), synced from the bucket"
        )
    if path is not None:
        out["lora_dir"] = path
    return out


def _phase(config: LLMConfig, where: str, on_gpu: bool) -> dict:
    """PhaseArgs (as a dict) of one deployment."""
    engine = {PHASE_KWARGS[k]: v for k, v in config.engine_kwargs.items() if k in PHASE_KWARGS}
    if not on_gpu and engine.pop("gpu_memory_utilization", None) is not None:
        logger.warning(
            "%s.engine_kwargs.gpu_memory_utilization: ignored on CPU, as vLLM's CPU engine "
            "ignores it (kv_cache_memory_mb sizes the KV cache)",
            where,
        )
    deployment = dict(config.deployment_config)
    actor = deployment.pop("ray_actor_options", None) or {}
    _no_unknown(deployment, DEPLOYMENT_FIELDS, f"{where}.deployment_config")
    _no_unknown(actor, ACTOR_FIELDS, f"{where}.deployment_config.ray_actor_options")
    experimental = dict(config.experimental_configs)
    experimental.pop("num_ingress_replicas", None)  # the ingress's (_ingress)
    _no_unknown(experimental, ("stream_batching_interval_ms",), f"{where}.experimental_configs")
    phase = {**deployment, **actor, **experimental, "engine": engine}
    if config.runtime_env:
        phase["runtime_env"] = config.runtime_env
    if config.accelerator_type is not None:  # ray_actor_options' own wins, as in Ray
        phase.setdefault("accelerator_type", config.accelerator_type)
    if "autoscaling_config" in phase:
        phase.pop("num_replicas", None)  # Serve's rule: autoscaling sets the count
    try:
        PhaseArgs.model_validate(phase)
    except ValidationError as e:  # (the engine's fields are engine_kwargs')
        where = f"{where}.deployment_config"
        raise ConfigError(
            _fields(e, where).replace(".deployment_config.engine.", ".engine_kwargs.")
        ) from None
    return phase


def _ingress(deployment: Mapping, configs) -> dict:
    deployment = dict(deployment)
    actor = deployment.pop("ray_actor_options", None) or {}
    _no_unknown(deployment, INGRESS_FIELDS, "ingress_deployment_config")
    _no_unknown(actor, ("num_cpus",), "ingress_deployment_config.ray_actor_options")
    ingress = {**deployment, **actor}
    # Ray Serve LLM's experimental num_ingress_replicas: the most any config asks
    asked = [c.experimental_configs.get("num_ingress_replicas") for c in configs]
    if asked := [n for n in asked if n is not None]:
        ingress.setdefault("num_replicas", max(asked))
    return ingress


def _env(config: LLMConfig) -> dict:
    """The model's runtime_env for its Ingress too, which loads the model's tokenizer (Ray
    Serve LLM's ingress loads nothing)."""
    return {"runtime_env": config.runtime_env} if config.runtime_env else {}


def _cluster_has_gpus() -> bool:
    """Where `serve run` builds the application (a task in the cluster), whether any node
    has a GPU: Ray Serve LLM's engines run on GPUs, splitserve's on either."""
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def main(argv: list[str] | None = None) -> None:
    """Print a Ray Serve LLM serve_config.yaml in splitserve's own schema."""
    parser = argparse.ArgumentParser(prog="python -m app.ray_serve_llm", description=main.__doc__)
    parser.add_argument("config", type=Path, help="a serve_config.yaml for ray.serve.llm")
    parser.add_argument("--gpus", action="store_true", help="the cluster has GPUs (device auto)")
    args = parser.parse_args(argv)
    config = yaml.safe_load(args.config.read_text())
    readers = {"build_pd_openai_app": pd_app_args, "build_openai_app": openai_app_args}
    for app in config.get("applications", []):
        read = readers.get(app.get("import_path", "").rpartition(":")[2])
        if read is None:
            continue
        try:
            app["args"] = read(app.get("args") or {}, gpus=args.gpus)
        except ConfigError as e:
            sys.exit(f"{app.get('name', 'application')}: {e}")
        builder = "build_multi_model_app" if "models" in app["args"] else "build_app"
        app["import_path"] = f"app.builder:{builder}"
    print(yaml.safe_dump(config, sort_keys=False), end="")


if __name__ == "__main__":
    main()
