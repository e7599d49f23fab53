"""Cut a loaded transformers model down to one worker's shard (engine/parallel.py's `Shard`).

Tensor parallelism follows the model's own `base_model_tp_plan` (transformers ships one per
architecture: q/k/v and MLP gate/up "colwise", o_proj and down "rowwise"); we apply it by slicing
the weights in place rather than through DTensor, so the model stays plain tensors that our
paged attention and the CPU kernel understand. Column-parallel layers keep their rows of the
output (whole heads, since tp divides the head counts); row-parallel layers keep their input
columns and all-reduce their output over the stage's tensor-parallel group. The embedding and
the LM head are split by vocabulary rows, as vLLM's are (`_shard_vocabulary`), so a decode step
reads 1/tp of the LM head, not all of it on every rank. The k and v projections keep the rows
of the rank's KV heads (engine/parallel.py): when tp is a multiple of the KV heads, the ranks
that share a KV head each keep its rows, as vLLM replicates them.

Mixtures of experts (Mixtral, Qwen2-MoE, Qwen3-MoE, gpt-oss, DeepSeek, Llama 4): their plans
leave the experts whole (Llama 4's splits them through DTensor), so every rank would hold every
expert. We split each expert's intermediate dimension instead, as vLLM's tensor-parallel MoE
does: every rank keeps its slice of every expert's gate, up and down projections, the router
stays whole (each rank routes the same tokens the same way) and the experts' output is
all-reduced, like a row-parallel layer's. Qwen2-MoE's, DeepSeek's and Llama 4's shared expert
is split as a dense MLP. gpt-oss's plan names only its embeddings: its attention is
split as every family's, and each rank keeps the attention-sink logits of its own heads.
DeepSeek V2 / V3 (latent attention): the latent projection stays whole, the projections from
it to each head's queries, keys and values are split by heads.

Phi-3 (and Phi-4, which is the same model type) fuses q, k and v into one projection and gate
and up into another; its plan gathers their outputs into whole tensors (DTensor). We keep each
rank's rows of every part of the fused output instead (its query heads, its KV heads, its slice
of gate and of up), so nothing is gathered, and its attention, which cuts the fused output by
the config's head counts, gets a copy of the config with this rank's counts.

OPT has no plan of its own: q, k, v and fc1 are split by columns, out_proj and fc2 by rows, and
its attention, which views q, k and v by its `num_heads`, gets the rank's count.

Pipeline parallelism keeps the stage's decoder layers only; the first stage keeps the embedding,
the last the final norm and the LM head. The modules are named by the Llama family's layout
(`model.embed_tokens / rotary_emb / layers / norm`, `lm_head`), or OPT's (`model.decoder.
embed_tokens / embed_positions / project_in / layers / final_layer_norm / project_out`). A
worker runs its stage's layers itself (engine/workers.py), as the Llama model's forward does,
plus what the served families add around them (Granite's embedding and logit scales, Gemma 2 /
3's logit softcap, Gemma 3's rotary embedding per layer type, OPT's learned positions and
projections): Llama, Mistral, Qwen2, Qwen3, Phi-3, Granite, Gemma 1-3, OPT and the mixtures
above. Others are rejected with a clear error at load, as are plans with styles other than
colwise, rowwise and replicated.
"""

from __future__ import annotations

import copy
from fnmatch import fnmatch

import torch
from torch import nn

from engine.parallel import PARALLEL_MODEL_TYPES, Shard

_LAYOUT = ("embed_tokens", "rotary_emb", "layers", "norm")
_OPT_LAYOUT = ("embed_tokens", "embed_positions", "layers", "final_layer_norm")
# what the first stage alone keeps (embeddings), and the last (the final norm, what follows it)
_FIRST_ONLY = ("embed_tokens", "embed_positions", "project_in")
_LAST_ONLY = ("norm", "final_layer_norm", "project_out")
_ATTENTION = ("q_proj", "qkv_proj", "q_a_proj")  # a module with one of these is an attention
# what every family splits the same way, whether or not its own plan says so (gpt-oss's plan
# names only its embeddings); the model's plan is read after these and wins where both match
_COMMON_PLAN = {
    "layers.*.self_attn.q_proj": "colwise",
    "layers.*.self_attn.k_proj": "colwise",
    "layers.*.self_attn.v_proj": "colwise",
    "layers.*.self_attn.o_proj": "rowwise",
    "layers.*.mlp.shared_expert.gate_proj": "colwise",  # Qwen2-MoE
    "layers.*.mlp.shared_expert.up_proj": "colwise",
    "layers.*.mlp.shared_expert.down_proj": "rowwise",
    "layers.*.mlp.experts": "experts",
}
# read after the model's own plan, where ours differs from it
_FAMILY_PLANS = {
    "phi3": {
        "layers.*.self_attn.qkv_proj": "fused_qkv",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_up_proj": "fused_gate_up",
        "layers.*.mlp.down_proj": "rowwise",
    },
    "llama4_text": {"layers.*.feed_forward.experts": "experts"},  # its plan: "moe_tp_experts"
    "opt": {  # no plan of its own; q, k, v as _COMMON_PLAN's
        "layers.*.self_attn.out_proj": "rowwise",
        "layers.*.fc1": "colwise",
        "layers.*.fc2": "rowwise",
    },
}
_KV_PROJECTIONS = (".k_proj", ".v_proj")  # split by the rank's KV heads, which ranks may share
_STYLES = ("colwise", "rowwise", "experts", "fused_qkv", "fused_gate_up")


def check_model_type(config) -> None:
    """Refuse, from its transformers config alone, a family the workers cannot run."""
    kind = getattr(config, "model_type", None)
    if kind not in PARALLEL_MODEL_TYPES:
        raise ValueError(
            f"tensor/pipeline parallelism supports the {', '.join(PARALLEL_MODEL_TYPES)} model "
            "types, "
            f"not {kind!r} (run it with one worker: tensor_parallel_size and "
            "pipeline_parallel_size 1)"
        )


def decoder(model: nn.Module) -> nn.Module:
    """The module that holds the embeddings, the layers and the final norm: `model.model`
    (Llama's layout), OPT's `model.model.decoder`, or a Gemma 3 of vision and text's
    `model.model.language_model`."""
    base = getattr(model, "model", None)
    inner = {"opt": "decoder", "gemma3": "language_model"}.get(model.config.model_type)
    return getattr(base, inner) if inner and base is not None else base


def _plan(model: nn.Module) -> dict[str, str]:
    """The model's tensor-parallel plan and ours; a vision-and-text model's is its text's."""
    own = model.config.get_text_config().base_model_tp_plan or {}
    return {**_COMMON_PLAN, **own, **_FAMILY_PLANS.get(model.config.model_type, {})}


def check_supported(model: nn.Module) -> None:
    check_model_type(model.config)
    base = decoder(model)
    layout = _OPT_LAYOUT if model.config.model_type == "opt" else _LAYOUT
    if base is None or not all(hasattr(base, name) for name in layout):
        raise ValueError(
            f"{type(model).__name__}: tensor/pipeline parallelism supports Llama-family "
            "architectures (model.embed_tokens, rotary_emb, layers, norm; lm_head) and OPT's"
        )
    text = model.config.get_text_config()
    if not (text.base_model_tp_plan or model.config.model_type in _FAMILY_PLANS):
        raise ValueError(f"{type(model).__name__} has no tensor-parallel plan in its config")


def shard_model(model: nn.Module, shard: Shard, tp_size: int, tp_group) -> nn.Module:
    """In place: keep shard's layers and its slice of every tensor-parallel weight."""
    check_supported(model)
    base = decoder(model)
    first, last = shard.layers.start == 0, shard.layers.stop == len(base.layers)
    base.layers = nn.ModuleList(base.layers[i] for i in shard.layers)
    model.stage_layers = shard.layers  # engine/lora.py: an adapter's layer i is local i - start
    for name in (() if first else _FIRST_ONLY) + (() if last else _LAST_ONLY):
        if hasattr(base, name):
            setattr(base, name, None)
    if not last:
        model.lm_head = None
    for name in ("vision_tower", "multi_modal_projector"):  # the workers serve text
        if hasattr(model.model, name):
            setattr(model.model, name, None)
    if tp_size > 1:
        plan = _plan(model)
        rank, kv = (shard.tp_rank, tp_size), _kv_part(shard, model.config.get_text_config())
        for name, module in base.named_modules():
            style = _style(plan, name, shard.layers.start)
            if style == "experts":
                _shard_experts(module, shard.tp_rank, tp_size, tp_group)
            elif style in ("fused_qkv", "fused_gate_up"):
                _shard_fused(module, _sections(style, model.config, rank, kv))
            elif style is not None:
                part = kv if name.endswith(_KV_PROJECTIONS) else rank
                _shard_linear(module, style, part, tp_group)
            if isinstance(getattr(module, "sinks", None), nn.Parameter):  # gpt-oss: per head
                heads = slice(shard.heads.start, shard.heads.stop)
                module.sinks = nn.Parameter(module.sinks.data[heads].clone(), requires_grad=False)
            if any(hasattr(module, p) for p in _ATTENTION):
                _give_rank_head_counts(module, shard)
        _shard_vocabulary(model, base, shard.tp_rank, tp_size, tp_group)
    return model


def _vocab_slice(vocab_size: int, rank: int, size: int) -> range:
    """The vocabulary rows a rank holds of the embedding and the LM head: equal slices of
    ceil(V / size) rows, the last padded with zero rows past V so the logits gather evenly."""
    part = -(-vocab_size // size)
    return range(rank * part, (rank + 1) * part)


def _shard_vocabulary(model: nn.Module, base: nn.Module, rank: int, size: int, group) -> None:
    """Embedding and LM head split by vocabulary rows, as vLLM's: the LM head's logits are
    gathered on the stage's first rank (engine/workers.py), an embedding lookup outside a
    rank's rows gives zeros there and the ranks' lookups are all-reduced. Tied embeddings stay
    tied where one stage holds both."""
    head, embedding = model.lm_head, base.embed_tokens
    if head is None and embedding is None:  # a middle pipeline stage
        return
    tied = head is not None and embedding is not None and head.weight is embedding.weight
    vocab = (head if head is not None else embedding).weight.shape[0]
    if vocab != model.config.get_text_config().vocab_size:  # the logits are cut there
        raise ValueError(f"{vocab} vocabulary rows, but the config's vocab_size is not that")
    rows = _vocab_slice(vocab, rank, size)
    if embedding is not None:
        embedding.weight = nn.Parameter(_rows(embedding.weight.data, rows), requires_grad=False)
        embedding.num_embeddings, embedding.padding_idx = len(rows), None  # an index of V
        base.embed_tokens = VocabParallelEmbedding(embedding, rows.start, group)
    if head is not None:
        if not isinstance(head, nn.Linear) or head.bias is not None:
            raise ValueError(f"the LM head {head} is not a Linear without bias")
        weight = embedding.weight if tied else _rows(head.weight.data, rows)
        head.weight = weight if tied else nn.Parameter(weight, requires_grad=False)
        head.out_features = len(rows)


def _rows(weight: torch.Tensor, rows: range) -> torch.Tensor:
    """weight[rows], zero rows past its end."""
    mine = weight[rows.start : rows.stop]
    pad = len(rows) - mine.shape[0]
    return torch.cat([mine, mine.new_zeros(pad, *mine.shape[1:])]) if pad else mine.clone()


class VocabParallelEmbedding(nn.Module):
    """One rank's rows of an embedding (any embedding module, Gemma's scaled one too): ids
    outside them look up zeros, and the all-reduce adds up the one rank's row that each id
    has."""

    def __init__(self, embedding: nn.Module, start: int, group) -> None:
        super().__init__()
        self.embedding, self.start, self.group = embedding, start, group

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        local = input_ids - self.start
        mine = (local >= 0) & (local < self.embedding.num_embeddings)
        out = self.embedding(torch.where(mine, local, 0)) * mine.unsqueeze(-1)
        dist.all_reduce(out, group=self.group)
        return out


def _style(plan: dict[str, str], name: str, layer_offset: int) -> str | None:
    """The plan entry for a module name; layer indices in the plan are the model's own."""
    parts = name.split(".")
    if len(parts) > 1 and parts[0] == "layers":  # our ModuleList restarts at 0
        parts[1] = str(int(parts[1]) + layer_offset)
    full = ".".join(parts)
    for pattern, style in plan.items():
        if fnmatch(full, pattern):
            # Qwen3's q/k norms; embeddings, which every family keeps whole on every rank;
            # DeepSeek's latent projection, which every head reads
            if style.startswith(("replicated", "embedding")) or style == "mla_kv_a_proj":
                return None
            if style not in _STYLES:
                raise ValueError(f"tensor-parallel style {style!r} ({pattern}) is not supported")
            return style
    return None


def _kv_part(shard: Shard, text_config) -> tuple[int, int]:
    """(index, count): the k and v projections keep the index-th of `count` equal row slices,
    this rank's KV heads; when tp exceeds the KV heads, consecutive ranks keep the same one."""
    total = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
    held = len(shard.kv_heads)
    return shard.kv_heads.start // held, total // held


def _shard_linear(module: nn.Module, style: str, slot: tuple[int, int], group) -> None:
    """Keep the `slot` = (index, count) slice of the output rows (colwise) or input columns."""
    if not isinstance(module, nn.Linear):
        raise ValueError(f"tensor-parallel plan names a {type(module).__name__}, not a Linear")
    index, count = slot
    dim = 0 if style == "colwise" else 1
    full = module.weight.shape[dim]
    if full % count:
        raise ValueError(f"cannot split a dimension of {full} over {count} ranks")
    part = full // count
    keep = slice(index * part, (index + 1) * part)
    _keep_for_lora(module, rows=keep if dim == 0 else None, cols=keep if dim == 1 else None)
    weight = module.weight.data[keep] if dim == 0 else module.weight.data[:, keep]
    module.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    if dim == 0:
        module.out_features = part
        if module.bias is not None:
            module.bias = nn.Parameter(module.bias.data[keep].contiguous(), requires_grad=False)
        return
    module.in_features = part
    module.lora_group = group  # a LoRA delta's rank-r product is all-reduced too
    if module.bias is not None and index != 0:  # the all-reduce would add the bias size times
        module.bias = nn.Parameter(torch.zeros_like(module.bias), requires_grad=False)
    module.register_forward_hook(_all_reduce_hook(group))


def _keep_for_lora(module: nn.Linear, rows=None, cols=None) -> None:
    """What a LoRA adapter's A and B must be cut to (engine/lora.py): the whole layer's
    (out, in), and the output rows or input columns this rank keeps of it."""
    module.lora_full = (module.out_features, module.in_features)
    module.lora_rows, module.lora_cols = rows, cols


def _sections(
    style: str, config, rank: tuple[int, int], kv: tuple[int, int]
) -> list[tuple[int, int, int]]:
    """The parts of a fused projection's output, in order: (rows, index, count), the rank
    keeping the index-th of `count` slices of each (kv: its KV heads', as `_kv_part`)."""
    if style == "fused_gate_up":
        return [(config.intermediate_size, *rank)] * 2
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_rows = config.num_key_value_heads * head_dim
    return [(config.num_attention_heads * head_dim, *rank), (kv_rows, *kv), (kv_rows, *kv)]


def _shard_fused(module: nn.Module, sections: list[tuple[int, int, int]]) -> None:
    """Column-parallel over a fused output: this rank's rows of each section, in order."""
    if not isinstance(module, nn.Linear) or sum(n for n, _, _ in sections) != module.out_features:
        raise ValueError(f"a fused projection of {sections} rows does not fit {module}")
    if any(n % count for n, _, count in sections):
        raise ValueError(f"cannot split the fused sections {sections} (rows, index, count)")
    rows, offset = [], 0
    for n, index, count in sections:
        part = n // count
        rows.append(torch.arange(offset + index * part, offset + (index + 1) * part))
        offset += n
    keep = torch.cat(rows)
    _keep_for_lora(module, rows=keep)
    module.weight = nn.Parameter(module.weight.data[keep].contiguous(), requires_grad=False)
    if module.bias is not None:
        module.bias = nn.Parameter(module.bias.data[keep].contiguous(), requires_grad=False)
    module.out_features = len(keep)


def _give_rank_head_counts(attention: nn.Module, shard: Shard) -> None:
    """An attention module's head counts become its rank's: OPT's views its projections by
    `num_heads`, Phi-3's cuts its fused one by its config's counts (a copy: the model's, and
    its other modules', stay whole)."""
    heads, kv_heads = len(shard.heads), len(shard.kv_heads)
    counts = {"num_heads": heads, "num_key_value_heads": kv_heads}
    counts["num_key_value_groups"] = heads // kv_heads  # smaller where KV heads are replicated
    for name, count in counts.items():
        if isinstance(getattr(attention, name, None), int):
            setattr(attention, name, count)
    if hasattr(attention, "qkv_proj"):
        attention.config = copy.copy(attention.config)
        attention.config.num_attention_heads, attention.config.num_key_value_heads = heads, kv_heads


def _shard_experts(module: nn.Module, rank: int, size: int, group) -> None:
    """Keep this rank's slice of every expert's intermediate dimension. gate_up_proj holds, per
    expert, gate then up (Mixtral, Qwen) or the two interleaved (gpt-oss), along the
    intermediate axis; transposed (gpt-oss) it is (experts, hidden, 2 x intermediate), else
    (experts, 2 x intermediate, hidden); down_proj is the transpose of one half."""
    transposed, concatenated, biased = _expert_layout(module)
    down_axis, gate_up_axis = (1, 2) if transposed else (2, 1)
    full = module.down_proj.shape[down_axis]
    if full % size:
        raise ValueError(f"cannot split the experts' {full} intermediate rows over {size} ranks")
    part = full // size
    mine = torch.arange(rank * part, (rank + 1) * part)
    if concatenated:
        keep = torch.cat([mine, full + mine])
    else:  # gate and up alternate: this rank's pairs are contiguous
        keep = torch.arange(2 * rank * part, 2 * (rank + 1) * part)
    _set(module, "gate_up_proj", module.gate_up_proj.data.index_select(gate_up_axis, keep))
    _set(module, "down_proj", module.down_proj.data.narrow(down_axis, rank * part, part))
    if biased:  # gate_up's per intermediate row; down's added once over the ranks
        _set(module, "gate_up_proj_bias", module.gate_up_proj_bias.data.index_select(1, keep))
        if rank != 0:
            _set(module, "down_proj_bias", torch.zeros_like(module.down_proj_bias.data))
    for attribute in ("intermediate_dim", "intermediate_size", "expert_dim"):  # as named
        if hasattr(module, attribute):
            setattr(module, attribute, part)
    module.register_forward_hook(_all_reduce_hook(group))


def _expert_layout(module: nn.Module) -> tuple[bool, bool, bool]:
    """(transposed, gate and up in halves, biased), as transformers' experts say; Llama 4's
    own experts say none of it: transposed halves, without biases."""
    if type(module).__name__ == "Llama4TextExperts":
        return True, True, False
    if not getattr(module, "has_gate", False):
        raise ValueError(f"{type(module).__name__}: tensor parallelism splits gated experts only")
    return module.is_transposed, module.is_concatenated, module.has_bias


def _set(module: nn.Module, name: str, value: torch.Tensor) -> None:
    setattr(module, name, nn.Parameter(value.contiguous(), requires_grad=False))


def _all_reduce_hook(group):
    import torch.distributed as dist

    def hook(_module, _inputs, output: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(output, group=group)
        return output

    return hook
