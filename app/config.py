"""The `args` of serve_config.yaml, validated with errors that name the field.

One schema for every mode, so that benchmarks compare modes that differ only in what the mode
means: `disaggregated` uses `prefill` and `decode`; `colocated` uses `colocated` (set
`engine.chunked_prefill: true` there for the chunked-prefill baseline).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from engine.config import EngineConfig
from engine.model_store import DEFAULT_MODEL_NAME
from engine.scheduler import SchedulerConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EngineArgs(_Strict):
    block_size: int = Field(16, ge=1)
    num_kv_blocks: int | None = Field(None, ge=1)
    kv_cache_memory_mb: int = Field(512, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=1)
    max_num_seqs: int = Field(32, ge=1)
    chunked_prefill: bool = False
    num_threads: int | None = Field(None, ge=1)
    tensor_parallel_size: int = Field(1, ge=1)
    pipeline_parallel_size: int = Field(1, ge=1)

    @field_validator("tensor_parallel_size", "pipeline_parallel_size")
    @classmethod
    def _single_worker(cls, value: int) -> int:
        if value > 1:
            raise ValueError("values above 1 are not supported yet (tensor/pipeline parallelism)")
        return value


class PhaseArgs(_Strict):
    num_replicas: int = Field(1, ge=1)
    autoscaling_config: dict | None = None
    num_cpus: float = Field(1.0, ge=0)
    max_ongoing_requests: int = Field(64, ge=1)
    engine: EngineArgs = EngineArgs()


class IngressArgs(_Strict):
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.1, ge=0)
    max_ongoing_requests: int = Field(256, ge=1)
    max_queued_requests: int = Field(128, ge=1)  # in flight per ingress replica, then 503


class AppArgs(_Strict):
    model: str | None = None  # local HF directory; None = the embedded default model
    served_model_name: str = DEFAULT_MODEL_NAME
    mode: Literal["disaggregated", "colocated"] = "disaggregated"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    max_model_len: int | None = Field(None, ge=2)
    # shm: prefill and decode replicas on one node (CPU); object_store: any placement
    kv_transport: Literal["shm", "object_store"] = "shm"
    ingress: IngressArgs = IngressArgs()
    prefill: PhaseArgs = PhaseArgs()
    decode: PhaseArgs = PhaseArgs()
    colocated: PhaseArgs = PhaseArgs()

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

    def engine_config(self, phase: str) -> EngineConfig:
        e: EngineArgs = getattr(self, phase).engine
        return EngineConfig(
            model=self.model,
            dtype=self.dtype,
            device=self.device,
            block_size=e.block_size,
            num_kv_blocks=e.num_kv_blocks,
            kv_cache_memory_mb=e.kv_cache_memory_mb,
            max_model_len=self.max_model_len,
            num_threads=e.num_threads,
            scheduler=SchedulerConfig(
                max_num_batched_tokens=e.max_num_batched_tokens,
                max_num_seqs=e.max_num_seqs,
                chunked_prefill=e.chunked_prefill,
            ),
        )
