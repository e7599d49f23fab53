"""LoRA adapters in PEFT's format, served beside the base model: several in one batch.

An adapter adds `scale * B @ A` to some of the decoder's linear layers. The base weights stay
as they are and each layer's output gets `scale * (x @ A^T) @ B^T` added for the tokens of the
requests that use the adapter (what vLLM's punica kernels batch on a GPU): two thin matrix
products of rank r, where merged weights would need a copy of the model per adapter and one
adapter per batch. A request names its adapter (`SamplingParams.lora`); requests of different
adapters and of the base model share one step.

A multi-worker replica splits an adapter as engine/sharding.py splits the model: a pipeline
stage keeps its own layers' part, a tensor-parallel rank B's rows of its column-parallel
layers and A's columns of its row-parallel ones, whose rank-r products are all-reduced over
the stage's group before B (the same on every rank, added after the layer's own all-reduce).

Read from a PEFT directory (`save_pretrained`'s `adapter_config.json` and
`adapter_model.safetensors` or `.bin`). Plain LoRA on the decoder's `nn.Linear` layers is
served; what would change the output if ignored is refused at load with its reason: DoRA,
trained biases, `modules_to_save`, per-module ranks or alphas (`rank_pattern`,
`alpha_pattern`), fan-in-fan-out (Conv1D) layers, adapters on the embedding, the LM head or
parameters, activated LoRA, PEFT's other variants (QA-LoRA, Arrow, ...), and layers that are
not `nn.Linear` (the fused experts of a mixture of experts).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed
from torch import nn

from engine.config import lora_path
from engine.model_store import resolve_adapter
from engine.sampling_params import InvalidRequestError

_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight")
# adapter_config.json settings that change what the adapter computes, and the value under
# which this module computes it
_PLAIN = {
    "use_dora": False,
    "fan_in_fan_out": False,
    "bias": "none",
    "lora_bias": False,
    "modules_to_save": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "layer_replication": None,
    "trainable_token_indices": None,
    "target_parameters": None,
    "alora_invocation_tokens": None,  # activated LoRA: from an invocation sequence on
    "use_qalora": False,
    "use_bdlora": None,
    "arrow_config": None,
    "monteclora_config": None,
    "velora_config": None,
    "kasa_config": None,
}
_NOT_SERVED = ("lm_head", "embed_tokens")  # their inputs are not one row per step token


class LoRAError(ValueError):
    """An adapter that cannot be loaded onto this model, and why."""


@dataclass(frozen=True)
class LoRAAdapter:
    """One adapter's weights: per linear layer's module name, A (r, in) and scale * B (out, r),
    cut to a tensor-parallel rank's slice of the layer, and for a row-parallel layer the
    group that all-reduces A's product (None: unsplit or column-parallel)."""

    name: str
    path: str
    rank: int
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, object]]


def load_adapter(name: str, path: str | Path, model: nn.Module) -> LoRAAdapter:
    """Read a PEFT LoRA directory (or Hub repository: resolve_adapter) for `model`, in its
    dtype and on its device."""
    path = Path(path)
    if not path.is_dir():
        try:
            path = resolve_adapter(path)
        except FileNotFoundError as e:
            raise LoRAError(f"LoRA adapter {name!r}: {e}") from e
    config = read_config(name, path)
    tensors = _read_weights(name, path)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.fullmatch(key)
        if match is None:
            raise LoRAError(f"LoRA adapter {name!r}: weight {key!r} is not a plain LoRA weight")
        parts.setdefault(match["module"], {})[match["part"]] = tensor
    if not parts:
        raise LoRAError(f"LoRA adapter {name!r}: {path} holds no LoRA weights")
    rank = int(config.get("r", 8))
    alpha = float(config.get("lora_alpha", 8))
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    param = next(model.parameters())
    layers = {}
    for module_name, ab in sorted(parts.items()):
        local = _stage_name(name, model, module_name)
        if local is None:  # a layer of another pipeline stage
            continue
        module = _checked_layer(name, model, module_name, local)
        a, b = _checked_pair(name, module_name, module, ab, rank)
        rows, cols = getattr(module, "lora_rows", None), getattr(module, "lora_cols", None)
        a = a if cols is None else a[:, cols]  # a row-parallel layer's input columns
        b = b if rows is None else b[rows]  # a column-parallel layer's output rows
        layers[local] = (
            a.contiguous().to(param.device, param.dtype),
            (b.float() * scale).contiguous().to(param.device, param.dtype),
            getattr(module, "lora_group", None),
        )
    return LoRAAdapter(name, str(path), rank, layers)


_LAYER = re.compile(r"(?P<head>(?:.*\.)?layers\.)(?P<index>\d+)(?P<tail>\..+)")


def _stage_name(name: str, model: nn.Module, module_name: str) -> str | None:
    """The module's name in this pipeline stage's model (engine/sharding.py keeps its layers,
    renumbered from 0), or None when it is another stage's; the name itself when unsplit."""
    stage = getattr(model, "stage_layers", None)
    match = _LAYER.fullmatch(module_name)
    if stage is None or match is None:
        return module_name
    index = int(match["index"])
    if index >= model.config.get_text_config().num_hidden_layers:
        where = f"LoRA adapter {name!r}, layer {module_name!r}"
        raise LoRAError(f"{where}: the model has no such layer")
    if index not in stage:
        return None
    return f"{match['head']}{index - stage.start}{match['tail']}"


def read_config(name: str, path: Path) -> dict:
    file = path / "adapter_config.json"
    if not file.is_file():
        raise LoRAError(f"LoRA adapter {name!r}: no adapter_config.json in {path}")
    config = json.loads(file.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise LoRAError(f"LoRA adapter {name!r}: peft_type {config['peft_type']!r}, not LORA")
    for key, plain in _PLAIN.items():
        value = config.get(key, plain)
        if value and value != plain:  # unset, empty or the plain value: plain LoRA
            raise LoRAError(f"LoRA adapter {name!r}: {key} = {value!r} is not supported")
    return config


def _read_weights(name: str, path: Path) -> dict[str, torch.Tensor]:
    if (path / "adapter_model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(path / "adapter_model.safetensors")
    if (path / "adapter_model.bin").is_file():
        return torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    raise LoRAError(f"LoRA adapter {name!r}: no adapter_model.safetensors or .bin in {path}")


def _checked_layer(name: str, model: nn.Module, module_name: str, local: str) -> nn.Linear:
    where = f"LoRA adapter {name!r}, layer {module_name!r}"
    if any(part in _NOT_SERVED for part in module_name.split(".")):
        raise LoRAError(f"{where}: adapters on the embedding or the LM head are not supported")
    try:
        module = model.get_submodule(local)
    except AttributeError:
        raise LoRAError(f"{where}: the model has no such layer") from None
    if not isinstance(module, nn.Linear):
        raise LoRAError(f"{where}: a {type(module).__name__}, not a linear layer")
    return module


def _checked_pair(
    name: str, module_name: str, module: nn.Linear, ab: dict[str, torch.Tensor], rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A and B, which must fit the whole layer (a tensor-parallel rank holds a slice of it)."""
    where = f"LoRA adapter {name!r}, layer {module_name!r}"
    if set(ab) != {"A", "B"}:
        raise LoRAError(f"{where}: has lora_{next(iter(ab))} without its pair")
    a, b = ab["A"], ab["B"]
    out_features, in_features = getattr(
        module, "lora_full", (module.out_features, module.in_features)
    )
    want_a, want_b = (rank, in_features), (out_features, rank)
    if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
        raise LoRAError(
            f"{where}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, where r = {rank} "
            f"and the layer need {want_a} and {want_b}"
        )
    return a, b


class LoRALayers:
    """The adapters loaded onto one model, applied through forward hooks on the layers they
    adapt; adapters come and go while the model serves (between forwards).

    Slots count from 1 (0: the base model), and a slot is never reused, so a request's slot
    cannot come to mean another adapter. Around a forward, `batch` says which tokens of the
    flattened batch use which slot; the hooks do nothing when none does."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.slots: dict[str, int] = {}
        self._weights: dict[str, dict[int, tuple]] = {}  # by layer, then slot: (A, B, group)
        self._next_slot = 1
        self._groups: list[tuple[int, slice | torch.Tensor]] = []
        self._num_tokens = 0

    def add(self, adapter: LoRAAdapter, slot: int | None = None) -> int:
        """Load `adapter` (its name not loaded yet) in `slot` (None: the next) -> its slot."""
        if adapter.name in self.slots:
            raise ValueError(f"LoRA adapter {adapter.name!r} is loaded already")
        slot = self._next_slot if slot is None else slot
        self._next_slot = max(self._next_slot, slot + 1)
        for module_name, ab in adapter.layers.items():
            if module_name not in self._weights:  # the layer's first adapter: hook it
                self._weights[module_name] = {}
                hook = self._hook(self._weights[module_name])
                self.model.get_submodule(module_name).register_forward_hook(hook)
            self._weights[module_name][slot] = ab
        self.slots[adapter.name] = slot
        return slot

    def remove(self, name: str) -> None:
        """Unload adapter `name`: its weights go (a hooked layer keeps its empty hook)."""
        slot = self.slots.pop(name)
        for weights in self._weights.values():
            weights.pop(slot, None)

    @contextlib.contextmanager
    def batch(self, token_slots: list[int]) -> Iterator[None]:
        """For one forward: token_slots[i] is the adapter slot of the batch's token i."""
        device = next(self.model.parameters()).device  # index tensors moved once, not per layer
        self._groups = [
            (slot, rows if isinstance(rows, slice) else rows.to(device))
            for slot, rows in _groups(token_slots)
        ]
        self._num_tokens = len(token_slots)
        try:
            yield
        finally:
            self._groups = []

    def _hook(self, weights: dict[int, tuple]):
        def hook(_module, inputs, output: torch.Tensor) -> None:
            if not self._groups:
                return
            x = inputs[0].reshape(-1, inputs[0].shape[-1])
            out = output.view(-1, output.shape[-1])  # the Linear's own fresh output
            if x.shape[0] != self._num_tokens:  # a layer that does not see every token
                raise RuntimeError(
                    f"a LoRA layer saw {x.shape[0]} rows for {self._num_tokens} tokens"
                )
            for slot, rows in self._groups:
                ab = weights.get(slot)
                if ab is None:
                    continue
                a, b, group = ab
                low = x[rows] @ a.T  # (tokens, r)
                if group is not None:  # a row-parallel layer: each rank's part of the sum
                    torch.distributed.all_reduce(low, group=group)
                if isinstance(rows, slice):  # a run of tokens: in place, no copies
                    out[rows].addmm_(low, b.T)
                else:
                    out.index_add_(0, rows, low @ b.T)

        return hook


_MAX_RUNS = 4  # an adapter's tokens in more runs than this are gathered by index


def _groups(token_slots: list[int]) -> list[tuple[int, slice | torch.Tensor]]:
    """Per adapter slot in use, its tokens: a slice for each run of them (a request's tokens
    are one run), or one index tensor when they are scattered (a decode batch of many
    adapters)."""
    runs: dict[int, list[slice]] = {}
    start = 0
    for i in range(1, len(token_slots) + 1):
        if i == len(token_slots) or token_slots[i] != token_slots[start]:
            if token_slots[start]:
                runs.setdefault(token_slots[start], []).append(slice(start, i))
            start = i
    groups: list[tuple[int, slice | torch.Tensor]] = []
    for slot, slices in runs.items():
        if len(slices) <= _MAX_RUNS:
            groups += [(slot, s) for s in slices]
        else:
            index = [t for s in slices for t in range(s.start, s.stop)]
            groups.append((slot, torch.tensor(index)))
    return groups


class AdapterCache:
    """Which LoRA adapters an engine has loaded, and loading them when a request needs one.

    The configured ones (`lora_modules`) are loaded at start and stay. Those of `lora_dir`, a
    directory whose subdirectories are adapters named by their folder (Ray Serve LLM's dynamic
    LoRA loading), are loaded when a request first names one; at most `max_loras` of them
    stay, the least recently used unloaded first, never one a live request uses (when all
    are, one more is loaded rather than a request refused or kept waiting)."""

    def __init__(
        self,
        runner,  # ModelRunner: load_lora, unload_lora, lora_slots
        lora_modules: dict[str, str],
        lora_dir: str | None = None,
        max_loras: int = 8,
    ) -> None:
        self.runner = runner
        self.lora_dir = lora_dir
        self.max_loras = max_loras
        self._pinned = frozenset(lora_modules)
        self._recent: OrderedDict[str, None] = OrderedDict()  # from lora_dir, oldest use first
        self._dirs: dict[str, Path] = {}  # the directory each lora_dir adapter was loaded from

    def check(self, name: str) -> None:
        """Raise InvalidRequestError unless adapter `name` is loaded or can be (any thread)."""
        if name in self.runner.lora_slots or self.path(name) is not None:
            return
        known = ", ".join(map(repr, list(self.runner.lora_slots))) or "none"
        where = f" and none in {self.lora_dir}" if self.lora_dir is not None else ""
        raise InvalidRequestError(
            f"LoRA adapter {name!r} is not loaded here (loaded: {known}){where}", "model"
        )

    def path(self, name: str) -> Path | None:
        """Adapter `name`'s directory in lora_dir, if it has one."""
        return lora_path(self.lora_dir, name)

    def use(self, name: str, in_use: Callable[[], set[str]]) -> int:
        """Adapter `name`'s slot, loaded now if it is not (on the engine's thread, between
        steps); `in_use`: the adapters of the engine's live requests."""
        if name in self._recent and self._moved(name):  # a link replaced at runtime
            del self._recent[name]
            self.runner.unload_lora(name)
        if name in self._recent:
            self._recent.move_to_end(name)
        elif name not in self.runner.lora_slots:
            path = self.path(name)
            if path is None:  # gone from the directory since the request was checked
                self.check(name)
            try:
                self.runner.load_lora(name, path)
            except (LoRAError, OSError) as e:
                raise InvalidRequestError(str(getattr(e, "cause", e)), "model") from e
            self._recent[name] = None
            self._dirs[name] = path.resolve()
            self._evict(in_use() | {name})
        return self.runner.lora_slots[name]

    def key(self, name: str | None) -> str | None:
        """What adapter `name`'s prefix-cache blocks are keyed by: a lora_dir adapter's name
        and the directory it was loaded from, so an adapter replaced at runtime under the same
        name never takes the old one's blocks; else its name."""
        if name in self._dirs:
            return f"{name}\n{self._dirs[name]}"
        return name

    def _moved(self, name: str) -> bool:
        """Whether lora_dir's `name` now resolves to another directory than the one loaded
        (app/lora_admin.py's load_inplace); an unloaded one keeps serving what it holds."""
        path = self.path(name)
        return path is not None and path.resolve() != self._dirs[name]

    def _evict(self, keep: set[str]) -> None:
        for name in list(self._recent):
            if len(self._recent) <= self.max_loras:
                return
            if name not in keep:
                del self._recent[name]
                self._dirs.pop(name, None)
                self.runner.unload_lora(name)
