"""The one place that turns the deployment classes into a Serve application.

`serve run serve_config.yaml` calls `build_app(args)` with the config's `args`, validated by
app.config.AppArgs (errors name the field).
"""

from __future__ import annotations

import logging

from ray import serve
from ray.serve.config import RequestRouterConfig

from app.config import AppArgs, IngressArgs, MultiModelArgs, PhaseArgs, RouterArgs
from app.ingress import Ingress
from app.model_router import ModelRouter
from app.prefix_router import PrefixAffinityRouter
from app.response_store import ResponseStoreServer
from app.router import SameNodeRouter
from deployments.serve_env import process_env
from deployments.servers import ColocatedServer, DecodeServer, PrefillServer
from engine.model_store import check_model, check_tokenizer

logger = logging.getLogger(__name__)


def deployment_options(phase: PhaseArgs, name: str, key: str, gpus: float = 0.0) -> dict:
    """Serve options of one engine deployment; `gpus` per model worker (AppArgs.gpus_per_worker)."""
    actor = {"num_cpus": phase.num_cpus} | ({"num_gpus": gpus} if gpus else {})
    accelerator = phase.accelerator_type
    if accelerator is not None:
        actor["accelerator_type"] = accelerator
    environment = {"runtime_env": phase.runtime_env} if phase.runtime_env else {}
    actor |= environment  # model workers inherit it from their replica
    options = {
        "name": name,
        "ray_actor_options": actor,
        "max_ongoing_requests": phase.max_ongoing_requests,
        **phase.replica_options,
    }
    if phase.max_ongoing_requests < phase.engine.max_num_seqs:
        logger.warning(
            "%s: max_ongoing_requests %d is below engine.max_num_seqs %d: Serve sends a replica "
            "no more requests than that, so its batch never fills",
            name, phase.max_ongoing_requests, phase.engine.max_num_seqs,
        )  # fmt: skip
    layout = phase.engine.parallel
    if not layout.is_single:  # the replica in bundle 0, one bundle per model worker
        # the workers hold the model (and the GPUs); the replica only schedules
        worker = {"CPU": phase.engine.worker_num_cpus} | ({"GPU": gpus} if gpus else {})
        if accelerator is not None:  # Ray's own resource for an accelerator_type option
            worker[f"accelerator_type:{accelerator}"] = 0.001
        replica = {"CPU": phase.num_cpus or phase.engine.worker_num_cpus}
        options["placement_group_bundles"] = [replica] + [worker] * layout.world_size
        options["ray_actor_options"] = {"num_cpus": phase.num_cpus} | environment
        # a tensor-parallel group must share a node; pipeline stages may spread
        options["placement_group_strategy"] = phase.placement_group_strategy or (
            "STRICT_PACK" if layout.pp == 1 else "PACK"
        )
    if phase.routes_by_prefix and key != "decode":  # the deployments that take prompts
        options["request_router_config"] = RequestRouterConfig(
            request_router_class=PrefixAffinityRouter,
            request_router_kwargs={
                "block_size": phase.engine.block_size,
                "max_imbalance": phase.prefix_affinity_max_imbalance,
            },
        )
    if phase.max_replicas_per_node is not None:
        options["max_replicas_per_node"] = phase.max_replicas_per_node
    if phase.autoscaling is not None:
        budget = phase.engine.max_num_batched_tokens
        options["autoscaling_config"] = phase.autoscaling.serve_config(key, budget)
    elif phase.autoscaling_config:
        options["autoscaling_config"] = phase.autoscaling_config
    else:
        options["num_replicas"] = phase.num_replicas
    return options


def entry_options(
    entry: IngressArgs | RouterArgs, name: str, runtime_env: dict | None = None
) -> dict:
    """Serve options of a deployment that answers HTTP: an Ingress (`runtime_env`: its own,
    as it loads the tokenizer), or a multi-model application's router."""
    actor = {"num_cpus": entry.num_cpus} | ({"runtime_env": runtime_env} if runtime_env else {})
    return {
        "name": name,
        "num_replicas": entry.num_replicas,
        "ray_actor_options": actor,
        "max_ongoing_requests": entry.max_ongoing_requests,
        **entry.replica_options,
    }


def build_app(args: dict) -> serve.Application:
    cfg = AppArgs.model_validate(args or {})
    size = cfg.ingress.responses_store_size
    return _model_app(cfg, "", _store(size) if size else None)


def build_multi_model_app(args: dict) -> serve.Application:
    """Several models behind one endpoint (app/model_router.py): each model's application
    under its own deployment names, a ModelRouter in front."""
    cfg = MultiModelArgs.model_validate(args or {})
    size = max(m.ingress.responses_store_size for m in cfg.models)
    store = _store(size) if size else None  # one for all: a response id names no model
    suffixes = cfg.deployment_suffixes
    ingresses = [
        _model_app(m, suffix, store) for m, suffix in zip(cfg.models, suffixes, strict=True)
    ]
    router = serve.deployment(ModelRouter, **entry_options(cfg.router, "ModelRouter"))
    models = [m.model_dump(mode="json") for m in cfg.models]
    return router.bind(models, ingresses, cfg.router.model_dump(mode="json"))


def _model_app(cfg: AppArgs, suffix: str, store) -> serve.Application:
    """One model's Ingress, bound to its engine deployments (their names + suffix)."""
    with process_env(_runtime_env_vars(cfg)):  # here, not in every replica's failed start
        check_model(cfg.model, cfg.revision)
        check_tokenizer(cfg.tokenizer, cfg.tokenizer_revision)
        for spec in cfg.draft_models():
            check_model(spec.model, spec.revision)
        _check_parallel(cfg)
    options = entry_options(cfg.ingress, f"Ingress{suffix}", cfg.ingress.runtime_env)
    ingress = serve.deployment(Ingress, **options)
    plain = cfg.model_dump(mode="json")
    store = {"store": store} if store is not None else {}  # the Responses API's stored responses
    if cfg.mode == "colocated":
        colocated = serve.deployment(
            ColocatedServer,
            **deployment_options(
                cfg.colocated,
                f"ColocatedServer{suffix}",
                "colocated",
                cfg.gpus_per_worker("colocated"),
            ),
        )
        server = colocated.bind(
            cfg.engine_config("colocated"),
            cfg.kv_transport,
            cfg.colocated.stream_batching_interval_ms,
        )
        return ingress.bind(plain, colocated=server, **store)
    prefill = serve.deployment(
        PrefillServer,
        **deployment_options(
            cfg.prefill, f"PrefillServer{suffix}", "prefill", cfg.gpus_per_worker("prefill")
        ),
    )
    decode = serve.deployment(
        DecodeServer,
        request_router_config=RequestRouterConfig(
            request_router_class=SameNodeRouter,
            request_router_kwargs={"same_node_wait_s": cfg.same_node_wait_s},
        ),
        **deployment_options(
            cfg.decode, f"DecodeServer{suffix}", "decode", cfg.gpus_per_worker("decode")
        ),
    )
    return ingress.bind(
        plain,
        **store,
        prefill=prefill.bind(
            cfg.engine_config("prefill"), cfg.kv_transport, cfg.decode.engine.parallel
        ),
        decode=decode.bind(
            cfg.engine_config("decode"), cfg.kv_transport, cfg.decode.stream_batching_interval_ms
        ),
    )


def _runtime_env_vars(cfg: AppArgs) -> dict[str, str]:
    """The env_vars the replicas' runtime_envs set (a gated Hub model's HF_TOKEN): the build
    checks the model with them, as the replicas will load it."""
    env: dict[str, str] = {}
    for part in (cfg.ingress, cfg.prefill, cfg.decode, cfg.colocated):
        env |= (part.runtime_env or {}).get("env_vars", {})
    return {name: str(value) for name, value in env.items()}


def _store(size: int) -> serve.Application:
    """The application's stored responses: one replica that every ingress replica asks (a
    lookup is a dict's), its calls many at once."""
    store = serve.deployment(
        ResponseStoreServer,
        name="ResponseStore",
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=1000,
    )
    return store.bind(size)


def _check_parallel(cfg: AppArgs) -> None:
    """Fail `serve run` at once, naming the field, when a layout cannot split the model."""
    phases = (cfg.prefill, cfg.decode, cfg.colocated)
    if all(p.engine.parallel.is_single for p in phases):
        return
    from transformers import AutoConfig

    from engine.model_runner import ModelShape
    from engine.model_store import resolve_model

    shape = ModelShape.of(AutoConfig.from_pretrained(resolve_model(cfg.model, cfg.revision)))
    cfg.check_parallel(shape.num_layers, shape.num_heads, shape.num_kv_heads)
