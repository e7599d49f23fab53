"""The model runtime: paged KV cache, schedulers, model runner, sampler, detokenizer."""

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.outputs import Completion, EngineStats, KVHandoff, RequestOutput
from engine.sampling_params import InvalidRequestError, SamplingParams
from engine.scheduler import SchedulerConfig

__all__ = [
    "Completion",
    "EngineConfig",
    "EngineStats",
    "InvalidRequestError",
    "KVHandoff",
    "LLMEngine",
    "RequestOutput",
    "SamplingParams",
    "SchedulerConfig",
]
