"""The `args` of serve_config.yaml, validated with errors that name the field.

One schema for every mode, so that benchmarks compare modes that differ only in what the mode
means: `disaggregated` uses `prefill` and `decode`; `colocated` uses `colocated` (set
`engine.chunked_prefill: true` there for the chunked-prefill baseline).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.reasoning_parsers import REASONING_PARSERS
from app.tool_parsers import PARSERS
from engine.config import DEFAULT_STEP_TIMEOUT_S, EngineConfig, check_device
from engine.model_store import (
    DEFAULT_MODEL_NAME,
    GENERATION_DEFAULTS,
    check_adapter,
    generation_sampling_defaults,
    is_default_model,
    model_config_file,
)
from engine.parallel import ParallelLayout
from engine.scheduler import SchedulerConfig
from engine.spec_decode import SpeculativeConfig

SAME_NODE_WAIT_S = 1.0  # seconds; see app/router.py
MAX_SPECULATIVE_TOKENS = 16  # drafts per request and step: the verify forward grows with them
MAX_IMBALANCE = 4  # prefix affinity: requests in flight beyond the least loaded replica
HEALTH_CHECK_TIMEOUT_S = 10.0  # seconds; see ReplicaLifeArgs


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EngineArgs(_Strict):
    block_size: int = Field(16, ge=1)
    num_kv_blocks: int | None = Field(None, ge=1)
    kv_cache_memory_mb: int = Field(512, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=1)
    max_num_seqs: int = Field(32, ge=1)
    chunked_prefill: bool = False
    # vLLM's automatic prefix caching: prompts' leading full blocks computed before are reused
    enable_prefix_caching: bool = False
    num_threads: int | None = Field(None, ge=1)
    # tp * pp > 1: the replica runs that many model workers (engine/workers.py), each in a
    # placement-group bundle of worker_num_cpus CPUs; kv_cache_memory_mb is per worker
    tensor_parallel_size: int = Field(1, ge=1)
    pipeline_parallel_size: int = Field(1, ge=1)
    worker_num_cpus: float = Field(1.0, gt=0)
    # vLLM's --speculative-config: decoding requests verify n-gram or a draft model's drafts;
    # a decode-side setting (prefill replicas decode no token past the first)
    speculative_config: SpeculativeArgs | None = None
    # vLLM's: with device cuda, decode steps replay CUDA graphs unless this is set
    enforce_eager: bool = False
    # vLLM's --gpu-memory-utilization: with device cuda, the share of the GPU's memory the
    # replica may hold, the KV cache sized to fill what the weights and the largest step
    # leave (engine/kv_memory.py), in place of kv_cache_memory_mb; a fraction of num_gpus
    # sharing a GPU takes its own share (0.45 each for prefill and decode at num_gpus 0.5)
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)

    @property
    def parallel(self) -> ParallelLayout:
        return ParallelLayout(self.tensor_parallel_size, self.pipeline_parallel_size)


class SpeculativeArgs(_Strict):
    """vLLM's --speculative-config: n-gram (prompt lookup) drafts (engine/spec_decode.py), or
    a draft model's (`model`, engine/draft_model.py); unset, the method is draft_model where a
    model is named, else ngram."""

    method: Literal["ngram", "draft_model"] | None = None
    num_speculative_tokens: int = Field(ge=1, le=MAX_SPECULATIVE_TOKENS)
    prompt_lookup_min: int | None = Field(None, ge=1)
    prompt_lookup_max: int | None = Field(None, ge=1)
    disable_by_batch_size: int | None = Field(None, ge=2)
    model: str | None = None  # the draft: a directory or a Hub id, of the target's vocabulary
    revision: str | None = None  # the draft's Hub revision
    # vLLM's: a parallel replica's draft runs whole on its first worker (engine/workers.py)
    draft_tensor_parallel_size: Literal[1] | None = None

    @model_validator(mode="after")
    def _bounds(self) -> SpeculativeArgs:
        self.config()  # raises ValueError for a min above the max
        return self

    def config(self) -> SpeculativeConfig:
        return SpeculativeConfig(**self.model_dump(exclude={"draft_tensor_parallel_size"}))


class LatencyArgs(_Strict):
    """A phase's step-time coefficients from the placement profile (ms; see
    placement/latency_model.py)."""

    a: float = Field(ge=0)
    b: float = Field(ge=0)
    c: float = Field(0.0, ge=0)


class AutoscalingArgs(_Strict):
    """splitserve's own policy for a phase (deployments/autoscaling.py): prefill needs
    `ttft_target_ms`, decode `tpot_target_ms`; `latency` is that phase's profile entry."""

    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(2, ge=1)
    initial_replicas: int | None = Field(None, ge=1)
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(30.0, ge=0)
    look_back_period_s: float = Field(5.0, gt=0)
    ttft_target_ms: float | None = Field(None, gt=0)
    tpot_target_ms: float | None = Field(None, gt=0)
    latency: LatencyArgs
    headroom: float | None = Field(None, gt=0, le=1)
    kv_target: float = Field(0.8, gt=0, le=1)

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingArgs:
        initial = self.initial_replicas or self.min_replicas
        if not self.min_replicas <= initial <= self.max_replicas:
            raise ValueError("need min_replicas <= initial_replicas <= max_replicas")
        return self

    def serve_config(self, phase: str, max_batch_tokens: int) -> dict:
        """Serve's autoscaling_config with the phase's custom policy."""
        if phase == "prefill":
            if self.ttft_target_ms is None:
                raise ValueError("prefill.autoscaling needs ttft_target_ms")
            policy = "PrefillPolicy"
            kwargs = {"ttft_target_ms": self.ttft_target_ms, "max_batch_tokens": max_batch_tokens}
        elif phase == "decode":
            if self.tpot_target_ms is None:
                raise ValueError("decode.autoscaling needs tpot_target_ms")
            policy = "DecodePolicy"
            kwargs = {"tpot_target_ms": self.tpot_target_ms, "kv_target": self.kv_target}
        else:
            raise ValueError(f"{phase}.autoscaling: only prefill and decode have a policy")
        kwargs["latency"] = self.latency.model_dump()
        if self.headroom is not None:
            kwargs["headroom"] = self.headroom
        return {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "initial_replicas": self.initial_replicas or self.min_replicas,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
            "look_back_period_s": self.look_back_period_s,
            # Serve wants a look-back longer than its (deprecated) metrics interval; the push
            # interval itself is RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S
            "metrics_interval_s": self.look_back_period_s / 2,
            "policy": {
                "policy_function": f"deployments.autoscaling:{policy}",
                "policy_kwargs": kwargs,
            },
        }


class ReplicaLifeArgs(_Strict):
    """Serve's health check of a deployment's replicas, and the drain of one being removed.
    The check: every period, each call allowed the timeout; three failures in a row replace
    the replica (killed at once: the configs' controller_options).
    The timeout is Ray Serve LLM's (10 s, Serve's own is 30 s): a check answers in
    milliseconds, 152 ms at most under a saturating load on 2 cores (README), and a frozen
    replica's clients wait for three of them."""

    health_check_period_s: float = Field(10.0, gt=0)
    health_check_timeout_s: float = Field(HEALTH_CHECK_TIMEOUT_S, gt=0)
    # a replica being removed (scaled down, or replaced by a `serve deploy` of changed args)
    # finishes what it holds first, Serve routing nothing more to it: an engine replica its
    # requests, an HTTP entry its clients' (with Serve's default, 20 s, a longer stream was
    # cut mid-answer when the ingress was replaced)
    graceful_shutdown_timeout_s: float = Field(300.0, ge=0)

    @property
    def replica_options(self) -> dict:
        """Serve's options of the deployment's replicas' lives: health checks and the drain."""
        return {
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "graceful_shutdown_wait_loop_s": 1.0,
        }


class PhaseArgs(ReplicaLifeArgs):
    num_replicas: int = Field(1, ge=1)
    autoscaling: AutoscalingArgs | None = None  # splitserve's latency-target policy
    autoscaling_config: dict | None = None  # or Serve's own, passed through as written
    num_cpus: float = Field(1.0, ge=0)
    # GPUs per model worker (the replica itself when it runs alone); None: 1 with
    # device cuda, else 0. A fraction lets prefill and decode replicas share one GPU.
    num_gpus: float | None = Field(None, ge=0)
    max_replicas_per_node: int | None = Field(None, ge=1)  # spread replicas over nodes
    # Ray's runtime_env of the replicas (and their model workers), over the application's
    # own, e.g. {env_vars: {HF_TOKEN: ...}} (Ray Serve LLM's LLMConfig.runtime_env)
    runtime_env: dict | None = None
    # Ray's accelerator type (e.g. H100, A10G; Ray Serve LLM's `accelerator_type`): the
    # replica, or each of its model workers, runs on a node with that accelerator
    accelerator_type: str | None = Field(None, min_length=1)
    # the requests Serve sends a replica at once, the rest waiting in its callers' routers
    # (first come, first served, each polling): unset, twice the engine's max_num_seqs (64 for
    # the default 32), so that a full batch has the next ones waiting in the engine's own
    # queue, ordered by priority; a fixed 64 capped the batch of a larger max_num_seqs (a Ray
    # Serve LLM config's max_num_seqs 256, whose own default here is unbounded) at 64
    max_ongoing_requests: int = Field(64, ge=1)
    # (ReplicaLifeArgs: a dead engine thread or model worker, a stuck step, fails the check)
    # an engine loop that has spent longer in one step (or a hand-off's import) is stuck: the
    # health check fails, and so do the replica's requests (503), so Serve replaces it at once
    # (vLLM's VLLM_ENGINE_ITERATION_TIMEOUT_S); raise it for a model whose longest step on
    # this host takes near a minute; null: no limit
    step_timeout_s: float | None = Field(DEFAULT_STEP_TIMEOUT_S, gt=0)
    # multi-worker replicas: how their placement-group bundles are placed (default: STRICT_PACK
    # for tensor parallelism alone, PACK once there are pipeline stages)
    placement_group_strategy: Literal["PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"] | None = (
        None
    )
    engine: EngineArgs = EngineArgs()
    # Ray Serve LLM's stream batching: a decode or colocated replica sends each request's
    # tokens at most once per interval, joined into one stream item (each item is a Ray object,
    # an SSE event and a write of Serve's proxy); 0: as each step makes them, those already
    # waiting joined. A prefill replica sends one token: it does not apply there.
    stream_batching_interval_ms: float = Field(0.0, ge=0, le=1000)
    # prefill and colocated replicas that cache prefixes: a prompt goes to a replica that was
    # sent its prefix before, unless that one has more than prefix_affinity_max_imbalance
    # requests in flight beyond the least loaded (app/prefix_router.py)
    prefix_affinity: bool = True
    prefix_affinity_max_imbalance: int = Field(MAX_IMBALANCE, ge=0)

    @property
    def routes_by_prefix(self) -> bool:
        return self.prefix_affinity and self.engine.enable_prefix_caching

    @model_validator(mode="before")
    @classmethod
    def _ongoing_from_batch(cls, data):
        if not isinstance(data, dict) or "max_ongoing_requests" in data:
            return data
        engine = data.get("engine")
        seqs = engine.get("max_num_seqs") if isinstance(engine, dict) else None
        if isinstance(engine, EngineArgs):
            seqs = engine.max_num_seqs
        if seqs is None:
            seqs = EngineArgs.model_fields["max_num_seqs"].default
        if type(seqs) is not int or seqs < 1:  # the engine's own check names the field
            return data
        return {**data, "max_ongoing_requests": 2 * seqs}

    @model_validator(mode="after")
    def _one_scaling_rule(self) -> PhaseArgs:
        if self.autoscaling is not None and self.autoscaling_config is not None:
            raise ValueError("set autoscaling or autoscaling_config, not both")
        return self


class HTTPEntryArgs(ReplicaLifeArgs):
    """A deployment that answers HTTP (the ingress, a multi-model application's router): its
    health checks, and which browser pages may call it (app/cors.py: vLLM's CORS settings and
    defaults, any origin, method and header, no credentials)."""

    allowed_origins: list[str] = ["*"]
    allowed_methods: list[str] = ["*"]
    allowed_headers: list[str] = ["*"]
    allow_credentials: bool = False
    # the largest request body taken, in MiB (app/request_body.py); a larger one is a 413
    # before it is read whole (a context window's text, or a batch of 128 prompts of 8k
    # token ids, is a few MB; a body of hundreds of MB took the replica's memory)
    max_request_body_mb: float = Field(32.0, gt=0)


class IngressArgs(HTTPEntryArgs):
    """(ReplicaLifeArgs: a frozen ingress replica is killed once it fails them, and the engine
    replicas then end its calls)"""

    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.1, ge=0)
    max_ongoing_requests: int = Field(256, ge=1)
    max_queued_requests: int = Field(128, ge=1)  # in flight per ingress replica, then 503
    # Ray's runtime_env of the ingress replicas, over the application's own: they load the
    # tokenizer (a gated Hub model's needs env_vars HF_TOKEN, as the engines do)
    runtime_env: dict | None = None
    # the name of an environment variable (of the ingress replicas' processes) holding an API
    # key: requests then need "Authorization: Bearer <key>" (vLLM's --api-key), all but
    # /health, /ping, /version and /metrics; None: no key
    api_key_env: str | None = Field(None, min_length=1)
    # the Responses API's stored responses (previous_response_id, GET / DELETE
    # /v1/responses/{id}; vLLM's VLLM_ENABLE_RESPONSES_API_STORE, bounded): the most the
    # application keeps in memory (one store deployment that every ingress replica asks),
    # least recently used out first; 0: none (stateless)
    responses_store_size: int = Field(0, ge=0)


class SLOArgs(_Strict):
    """The application's latency targets (what goodput is measured against): the ingress
    counts the requests that meet them, so attainment shows live in the dashboard."""

    ttft_ms: float = Field(gt=0)
    tpot_ms: float = Field(gt=0)


def auto_dtype(model_dtype: str | None, device: str) -> str:
    """vLLM's dtype "auto" for a model stored in `model_dtype`: on a GPU, bfloat16 for a
    bfloat16 model and float16 for the rest; on a CPU, which has no fast float16, bfloat16
    for a 16-bit model and float32 for the rest."""
    if device.startswith("cuda"):
        return "bfloat16" if model_dtype == "bfloat16" else "float16"
    return "bfloat16" if model_dtype in ("bfloat16", "float16") else "float32"


def _stored_dtype(model: str | None, revision: str | None) -> str | None:
    """The dtype a model's config.json says its weights are in (None: it says none)."""
    try:
        config = json.loads(model_config_file(model, revision).read_text())
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"dtype auto reads the model's config.json: {e}") from e
    return config.get("torch_dtype") or config.get("dtype")


class AppArgs(_Strict):
    # a local HF directory, or a Hugging Face Hub repository id (`org/name`, fetched once
    # into the Hub's cache on each node that loads it, as vLLM's --model); None = the
    # embedded default model
    model: str | None = None
    revision: str | None = None  # vLLM's --revision: a Hub model's branch, tag or commit
    # vLLM's --tokenizer / --tokenizer-revision: a directory with a tokenizer_config.json, or
    # a Hub id of which the tokenizer's files alone are fetched; None: the model's own
    tokenizer: str | None = None
    tokenizer_revision: str | None = None
    # the name requests give as `model` (vLLM's --served-model-name), or several names, any
    # of which a request may give, the first the one responses and model cards lead with;
    # None: `model` as written, as vLLM names it (the embedded model: SmolLM2-135M-Instruct)
    served_model_name: str | list[str] | None = None
    # vLLM's --generation-config: "auto" takes the sampling defaults (temperature, top_p,
    # top_k, min_p, repetition_penalty, max_new_tokens) that the model's
    # generation_config.json sets for the requests that leave them out; "vllm": OpenAI's
    # defaults alone; or a directory holding a generation_config.json
    generation_config: str = Field("auto", min_length=1)
    # vLLM's --override-generation-config: defaults that replace or add to those, e.g.
    # {temperature: 0.5}
    override_generation_config: dict[str, float] = {}
    mode: Literal["disaggregated", "colocated"] = "disaggregated"
    # vLLM's --dtype: "auto" is the model's own (_auto_dtype), "half" float16, "float" float32
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # vLLM's --kv-cache-dtype: "auto" caches keys and values in `dtype`; fp8 (e4m3, as vLLM's
    # "fp8") or fp8_e5m2 in a byte each, unscaled, read back in `dtype`: 2x the cached tokens
    # of bf16 in the same memory (4x float32's). Every replica's, so a hand-off fits.
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2"] = "auto"
    device: str = "cpu"
    max_model_len: int | None = Field(None, ge=2)
    # shm: prefill and decode replicas on one node (CPU); object_store: any placement;
    # cuda_ipc: GPU replicas on one node (CUDA IPC through CuPy); gloo (CPU) and nccl (GPU,
    # two GPUs): the decode replica pulls the KV from the prefill replica, any placement
    kv_transport: Literal["shm", "object_store", "cuda_ipc", "gloo", "nccl"] = "shm"
    # disaggregated: how long a prefilled request waits for a decode replica on its prefill
    # replica's node before one on another node may take it (app/router.py)
    same_node_wait_s: float = Field(SAME_NODE_WAIT_S, ge=0)
    # vLLM's --scheduling-policy: "priority" serves requests' `priority` (lower first) in every
    # replica's queues; "fcfs" refuses a priority other than 0
    scheduling_policy: Literal["fcfs", "priority"] = "fcfs"
    # vLLM's --enable-auto-tool-choice --tool-call-parser: tool_choice "auto" finds the calls
    # a model writes in its own format (app/tool_parsers.py); unset, "auto" is refused
    tool_call_parser: str | None = None
    # vLLM's --reasoning-parser: a reasoning model's thinking goes to the reply's `reasoning`
    # (app/reasoning_parsers.py), apart from its answer
    reasoning_parser: str | None = None
    # vLLM's --chat-template: a Jinja chat template (a file's path, read where the config is
    # loaded, or the template's text) in place of the model's, e.g. one that shows tools
    chat_template: str | None = None
    # vLLM's --default-chat-template-kwargs: template variables every chat request gets
    # (e.g. {"enable_thinking": false}); a request's chat_template_kwargs override them
    default_chat_template_kwargs: dict | None = None
    # vLLM's --lora-modules: LoRA adapters (PEFT directories, read by every prefill, decode
    # and colocated replica) by the name a request gives as its `model` (engine/lora.py)
    lora_modules: dict[str, str] = {}
    # Ray Serve LLM's dynamic LoRA loading, from a local (or shared) directory: each
    # subdirectory holding a PEFT adapter is an adapter named by the folder, loaded by a
    # replica when a request first names it; each replica keeps at most max_loras of them
    lora_dir: str | None = None
    max_loras: int = Field(8, ge=1)
    # vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING: POST /v1/load_lora_adapter and
    # /v1/unload_lora_adapter add and remove adapters of lora_dir (app/lora_admin.py)
    allow_runtime_lora_updating: bool = False
    # the latency targets: finished requests are counted by which of them they met
    # (splitserve_slo_requests); None: not counted
    slo: SLOArgs | None = None
    ingress: IngressArgs = IngressArgs()
    prefill: PhaseArgs = PhaseArgs()
    decode: PhaseArgs = PhaseArgs()
    colocated: PhaseArgs = PhaseArgs()

    @model_validator(mode="before")
    @classmethod
    def _vllm_dtype(cls, data):
        """vLLM's dtype names, read here (where `serve run` reads the config) into the one
        the replicas run: "auto" from the model's config.json (a Hub model's fetched alone)."""
        if not isinstance(data, dict) or data.get("dtype") not in ("auto", "half", "float"):
            return data
        dtype = data["dtype"]
        if dtype == "auto":
            stored = _stored_dtype(data.get("model"), data.get("revision"))
            dtype = auto_dtype(stored, str(data.get("device", "cpu")))
        return {**data, "dtype": {"half": "float16", "float": "float32"}.get(dtype, dtype)}

    @field_validator("chat_template")
    @classmethod
    def _template_text(cls, value):
        """A path is read here (the driver resolves it against the directory `serve run`
        runs in), so replicas get the template's text."""
        if value is None or "{{" in value or "{%" in value:
            return value
        path = Path(value).expanduser()
        if not path.is_file():
            raise ValueError(f"{value!r} is neither a file nor a Jinja template")
        return path.read_text()

    @field_validator("device")
    @classmethod
    def _a_device(cls, value: str) -> str:
        return check_device(value)

    @field_validator("lora_modules")
    @classmethod
    def _adapter_dirs(cls, value: dict[str, str]) -> dict[str, str]:
        """Absolute paths (resolved where `serve run` runs), each a PEFT adapter's directory,
        or Hugging Face Hub ids of adapters (each replica fetches them, as vLLM's)."""
        dirs = {}
        for name, where in value.items():
            path = Path(where).expanduser().absolute()
            if not name:
                raise ValueError(f"{where!r}: an adapter needs a name")
            try:
                check_adapter(where)
            except FileNotFoundError as e:
                raise ValueError(f"{name!r}: {e}") from e
            dirs[name] = str(path) if path.is_dir() else where  # a directory, or a Hub id
        return dirs

    @field_validator("served_model_name")
    @classmethod
    def _names(cls, value: str | list[str] | None) -> str | list[str] | None:
        names = [value] if isinstance(value, str) else value or []
        if value is not None and (not names or not all(names)):
            raise ValueError("a name, or a list of names, none of them empty")
        if len(set(names)) != len(names):
            raise ValueError(f"names repeat: {names}")
        return value

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer_path(cls, value: str | None) -> str | None:
        """A directory resolved where `serve run` runs, as lora_modules' are; a Hub id as is."""
        if value is None:
            return None
        path = Path(value).expanduser().absolute()
        return str(path) if path.is_dir() else value

    @field_validator("lora_dir")
    @classmethod
    def _a_directory(cls, value: str | None) -> str | None:
        if value is None:
            return None
        path = Path(value).expanduser().absolute()
        if not path.is_dir():
            raise ValueError(f"{value!r} is not a directory")
        return str(path)

    @field_validator("tool_call_parser", "reasoning_parser")
    @classmethod
    def _known_parser(cls, value, info):
        known = PARSERS if info.field_name == "tool_call_parser" else REASONING_PARSERS
        if value is not None and value not in known:
            raise ValueError(f"unknown parser {value!r}; one of {', '.join(known)}")
        return value

    @model_validator(mode="after")
    def _policies_complete(self) -> AppArgs:
        for phase in ("prefill", "decode", "colocated"):
            args: PhaseArgs = getattr(self, phase)
            if args.autoscaling is not None:  # raises with the missing field named
                args.autoscaling.serve_config(phase, args.engine.max_num_batched_tokens)
        return self

    @model_validator(mode="after")
    def _transport_fits_device(self) -> AppArgs:
        on_gpu = self.device.startswith("cuda")
        if self.kv_transport in ("cuda_ipc", "nccl") and not on_gpu:
            raise ValueError(f"kv_transport {self.kv_transport} moves GPU caches: set device: cuda")
        if self.kv_transport == "gloo" and on_gpu:
            raise ValueError(
                "kv_transport gloo moves CPU caches; with device cuda use cuda_ipc (one node), "
                "nccl (two GPUs, any nodes) or object_store"
            )
        return self

    @model_validator(mode="after")
    def _memory_share_on_gpu(self) -> AppArgs:
        for phase in ("prefill", "decode", "colocated"):
            engine: EngineArgs = getattr(self, phase).engine
            if engine.gpu_memory_utilization is None:
                continue
            if not self.device.startswith("cuda"):
                raise ValueError(
                    f"{phase}.engine.gpu_memory_utilization sizes a GPU's KV cache: set device: "
                    "cuda (on a CPU, kv_cache_memory_mb)"
                )
        return self

    @model_validator(mode="after")
    def _same_kv_layout(self) -> AppArgs:
        if self.mode == "disaggregated" and (
            self.prefill.engine.block_size != self.decode.engine.block_size
        ):
            raise ValueError(
                "prefill.engine.block_size and decode.engine.block_size must be equal: "
                "KV blocks move between them as they are"
            )
        return self

    @model_validator(mode="after")
    def _adapters_servable(self) -> AppArgs:
        for name in self.served_names:
            if name in self.lora_modules:
                raise ValueError(f"lora_modules: {name!r} names the base model")
        if self.allow_runtime_lora_updating and self.lora_dir is None:
            raise ValueError(
                "allow_runtime_lora_updating needs lora_dir: adapters loaded at runtime are "
                "linked into it, where every replica finds them"
            )
        return self

    @field_validator("generation_config")
    @classmethod
    def _generation_source(cls, value: str) -> str:
        if value not in ("auto", "vllm") and not Path(value, "generation_config.json").is_file():
            raise ValueError(f"{value!r}: not auto, vllm or a directory with its JSON")
        return value

    @field_validator("override_generation_config")
    @classmethod
    def _generation_fields(cls, value: dict[str, float]) -> dict[str, float]:
        if unknown := set(value) - set(GENERATION_DEFAULTS):
            raise ValueError(f"{sorted(unknown)}: not among {list(GENERATION_DEFAULTS)}")
        return value

    def sampling_defaults(self, model_dir: Path) -> dict[str, float]:
        """What requests that leave a sampling field out get (by request field name):
        `generation_config`'s, then `override_generation_config`'s."""
        given = {}
        if self.generation_config != "vllm":
            source = self.generation_config
            given = generation_sampling_defaults(model_dir if source == "auto" else Path(source))
        overrides = {GENERATION_DEFAULTS[k]: v for k, v in self.override_generation_config.items()}
        return given | overrides

    @property
    def served_names(self) -> tuple[str, ...]:
        """Every name a request may give the base model: served_model_name's, else `model` as
        written."""
        given = self.served_model_name
        if given is None:
            return (DEFAULT_MODEL_NAME if is_default_model(self.model) else self.model,)
        return (given,) if isinstance(given, str) else tuple(given)

    @property
    def served_name(self) -> str:
        """The base model's name in responses and first in /v1/models (vLLM's: the first)."""
        return self.served_names[0]

    def gpus_per_worker(self, phase: str) -> float:
        chosen = getattr(self, phase).num_gpus
        if chosen is not None:
            return chosen
        return 1.0 if self.device.startswith("cuda") else 0.0

    def engine_config(self, phase: str) -> EngineConfig:
        e: EngineArgs = getattr(self, phase).engine
        return EngineConfig(
            model=self.model,
            revision=self.revision,
            served_model_name=self.served_name,
            tokenizer=self.tokenizer,
            tokenizer_revision=self.tokenizer_revision,
            dtype=self.dtype,
            kv_cache_dtype=self.kv_cache_dtype,
            device=self.device,
            block_size=e.block_size,
            num_kv_blocks=e.num_kv_blocks,
            kv_cache_memory_mb=e.kv_cache_memory_mb,
            gpu_memory_utilization=e.gpu_memory_utilization,
            max_model_len=self.max_model_len,
            num_threads=e.num_threads,
            tensor_parallel_size=e.tensor_parallel_size,
            pipeline_parallel_size=e.pipeline_parallel_size,
            worker_num_cpus=e.worker_num_cpus,
            worker_num_gpus=self.gpus_per_worker(phase),
            scheduler=SchedulerConfig(
                max_num_batched_tokens=e.max_num_batched_tokens,
                max_num_seqs=e.max_num_seqs,
                chunked_prefill=e.chunked_prefill,
                enable_prefix_caching=e.enable_prefix_caching,
                policy=self.scheduling_policy,
            ),
            lora_modules=tuple(self.lora_modules.items()),
            lora_dir=self.lora_dir,
            max_loras=self.max_loras,
            speculative=self._speculative(phase),
            # a prefill replica runs no decode step: it captures no decode graph
            enforce_eager=e.enforce_eager or phase == "prefill",
            step_timeout_s=getattr(self, phase).step_timeout_s,
        )

    def _speculative(self, phase: str) -> SpeculativeConfig | None:
        """The phase's speculative config; none for prefill, whose replicas decode no token
        past the first: a config giving both phases the same engine settings (as Ray Serve
        LLM's often do) loads no draft model there, nor sizes a cache for one."""
        spec = getattr(self, phase).engine.speculative_config
        return None if spec is None or phase == "prefill" else spec.config()

    def draft_models(self) -> list[SpeculativeConfig]:
        """The speculative configs with a draft model of the phases this mode serves."""
        phases = ("colocated",) if self.mode == "colocated" else ("decode",)
        specs = [self._speculative(p) for p in phases]
        return [s for s in specs if s is not None and s.model is not None]

    def check_parallel(self, num_layers: int, num_heads: int, num_kv_heads: int) -> None:
        """Raise ValueError, naming the field, for a layout the model cannot be split into."""
        for phase in ("prefill", "decode", "colocated"):
            layout = getattr(self, phase).engine.parallel
            try:
                layout.check(num_layers, num_heads, num_kv_heads)
            except ValueError as e:
                raise ValueError(f"{phase}.engine: {e}") from None


class RouterArgs(HTTPEntryArgs):
    """The HTTP ingress of a multi-model application (app/model_router.py): it forwards each
    request to its model's Ingress, whose own limits (max_queued_requests) then apply."""

    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.1, ge=0)
    max_ongoing_requests: int = Field(1024, ge=1)


class MultiModelArgs(_Strict):
    """The `args` of app.builder:build_multi_model_app: several models behind one endpoint,
    each its own AppArgs (its mode, deployments, LoRA adapters, ...), requests sent by their
    `model` (Ray Serve LLM's build_openai_app with several llm_configs)."""

    models: list[AppArgs] = Field(min_length=1)
    router: RouterArgs = RouterArgs()

    @model_validator(mode="after")
    def _names_apart(self) -> MultiModelArgs:
        """Each name a request may give (a served name, a configured adapter's) names one
        model; one model at most loads adapters at runtime (vLLM's routes name no model)."""
        seen: dict[str, int] = {}
        for i, model in enumerate(self.models):
            for name in (*model.served_names, *model.lora_modules):
                if name in seen:
                    raise ValueError(
                        f"models[{i}]: {name!r} is models[{seen[name]}]'s name already"
                    )
                seen[name] = i
        parts = self.deployment_suffixes
        if len(set(parts)) != len(parts):
            raise ValueError(f"served names {parts} must differ in letters, digits, '.-_'")
        if sum(m.allow_runtime_lora_updating for m in self.models) > 1:
            raise ValueError("allow_runtime_lora_updating: on one model at most")
        return self

    @property
    def deployment_suffixes(self) -> list[str]:
        """Each model's suffix of its deployments' names (":" and its served name)."""
        return [":" + re.sub(r"[^A-Za-z0-9._-]", "--", m.served_name) for m in self.models]
