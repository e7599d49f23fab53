"""One set of rotary frequencies for a server's life, where transformers picks one per call.

Phi-3's LongRoPE (Phi-3-mini-128k, Phi-3.5, Phi-4-mini) rotates with short or long factors,
and transformers picks per forward call: long when the call's largest position passes
`original_max_position_embeddings`. A call of ours is a flattened batch of many requests whose
keys earlier calls cached, so that choice mixes the two: one long request turns every other
request's queries to long factors against keys cached with short ones, and a prompt that
crosses the limit caches keys of both. vLLM picks one set when it starts: long when the
server's max_model_len passes the limit, else short. So do we: the chosen set is written into
the rotary embedding's `inv_freq`, and transformers' per-call switch is turned off.
"""

from __future__ import annotations

from torch import nn

_FIXED = "longrope (fixed for the server)"  # a rope_type transformers' per-call update skips


def fix_longrope(model: nn.Module, max_model_len: int) -> None:
    """In place, for every LongRoPE rotary embedding of `model`."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for module in model.modules():
        if getattr(module, "rope_type", None) != "longrope":
            continue
        original = module.config.rope_parameters["original_max_position_embeddings"]
        frequencies = module.original_inv_freq  # built short
        if max_model_len > original:  # as transformers builds the long set
            frequencies, _ = ROPE_INIT_FUNCTIONS["longrope"](
                module.config, module.inv_freq.device, seq_len=original + 1
            )
        module.inv_freq.copy_(frequencies)
        module.rope_type = _FIXED
