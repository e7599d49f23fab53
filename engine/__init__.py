"""The model runtime: paged KV cache, schedulers, model runner, sampler, detokenizer.

Names are imported lazily so that the pure-Python parts (scheduler, block manager) load
without torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Completion": "engine.outputs",
    "EngineConfig": "engine.config",
    "EngineStats": "engine.outputs",
    "InvalidRequestError": "engine.sampling_params",
    "KVHandoff": "engine.outputs",
    "LLMEngine": "engine.engine",
    "RequestFailedError": "engine.outputs",
    "RequestOutput": "engine.outputs",
    "SamplingParams": "engine.sampling_params",
    "SchedulerConfig": "engine.scheduler",
    "StepFailed": "engine.engine",
    "StructuredOutput": "engine.sampling_params",
    "TokenLogprob": "engine.outputs",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
