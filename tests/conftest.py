from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass, field

import pytest
import torch

from engine import EngineConfig, LLMEngine, SchedulerConfig
from engine.model_runner import ModelRunner
from engine.model_store import resolve_model
from kvkernels import paged_attention
from tests.ray_session import RayServe, SharedRay
from tests.split_suite import FOREGROUND_PID


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--part",
        choices=("fore", "back"),
        help="run one part of the suite (tests/split_suite.py): 'fore', the tests that need the "
        "CPU when they ask for it (Ray clusters, wall-clock bounds), or 'back', the rest",
    )


def _group(item: pytest.Item) -> int:
    names = getattr(item, "fixturenames", ())
    return 2 if "own_ray_cluster" in names else 1 if "ray_serve" in names else 0


def _foreground(item: pytest.Item) -> bool:
    return _group(item) > 0 or item.get_closest_marker("wall_clock") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests without Ray first, then those on the session's shared cluster in one run (it
    starts once and idles through nothing else), then those that start a cluster of their own;
    a stable sort keeps the order within each group. With --part, only that part's tests."""
    part = config.getoption("part")
    if part is not None:
        keep, drop = [], []
        for item in items:
            (keep if _foreground(item) == (part == "fore") else drop).append(item)
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
    items.sort(key=_group)


@pytest.fixture(scope="session")
def _shared_ray(tmp_path_factory):
    shared = SharedRay(tmp_path_factory.mktemp("ray"))
    yield shared
    shared.stop()


@pytest.fixture(scope="module")
def ray_serve(_shared_ray) -> RayServe:
    """The session's private Ray cluster with Serve (started on first use); a module deletes
    the applications it deploys."""
    return _shared_ray.get()


@pytest.fixture(scope="module")
def own_ray_cluster(_shared_ray) -> None:
    """For a module that starts a Ray cluster of its own: the shared one is stopped first
    (one driver holds one cluster)."""
    _shared_ray.stop()


def _threads() -> int:
    """An intra-op thread per core (the suite must stay quick on 2 cores, no oversubscription),
    but one in the background part of `make test` while its foreground part runs: two threads
    of one op on cores the foreground holds wait at the op's end for whichever was descheduled
    (tests/split_suite.py)."""
    foreground = os.environ.get(FOREGROUND_PID)
    if foreground is None:
        return 2
    try:
        os.kill(int(foreground), 0)  # the runner reaps it at once: no zombie answers for it
    except ProcessLookupError:
        return 2
    return 1


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(_threads())


@pytest.fixture(scope="session")
def default_model_path():
    return resolve_model(None)


@pytest.fixture(scope="session")
def tokenizer(default_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_path)


def paged(path, **config):
    """The model at `path` with our paged attention, fp32 (`config`: its config's changes)."""
    from transformers import AutoModelForCausalLM

    name = paged_attention.register()
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation=name, **config
    )
    return model.eval()


@pytest.fixture(scope="session")
def paged_model(default_model_path):
    """The default model with our paged attention, fp32; engines share its weights."""
    return paged(default_model_path)


def eager(path):
    """The model at `path` through transformers' own attention, fp32: the reference."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


@pytest.fixture(scope="session")
def hf_model(default_model_path):
    return eager(default_model_path)


@pytest.fixture
def make_engine(paged_model, tokenizer):
    """Factory: an engine on the shared default-model weights with its own KV cache."""
    return _engines(paged_model, tokenizer)


@pytest.fixture(scope="session")
def make_shallow_engine(default_model_path, tokenizer):
    """Factory of engines on the default model cut to its first two layers (its embeddings,
    final norm and head kept; loaded once): real weights at about a third of the step time,
    and a repetitive writer, whose n-gram drafts are often kept (the speculative-decoding
    tests' point)."""
    return _engines(paged(default_model_path, num_hidden_layers=2), tokenizer)


def _engines(model, tokenizer):
    """Factory of engines on `model`'s weights (loaded once, shared), each with its own KV
    cache."""

    def make(
        num_kv_blocks: int = 256, block_size: int = 16, kv_dtype=None, speculative=None, **scheduler
    ) -> LLMEngine:
        config = EngineConfig(
            block_size=block_size, scheduler=SchedulerConfig(**scheduler), speculative=speculative
        )
        runner = ModelRunner(
            model, num_kv_blocks=num_kv_blocks, block_size=block_size, kv_dtype=kv_dtype
        )
        return LLMEngine(config, runner=runner, tokenizer=tokenizer)

    return make


def hf_greedy(hf_model, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = hf_model.generate(
            ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id
        )
    return out[0, ids.shape[1] :].tolist()


def drain(engine: LLMEngine, max_steps: int = 10_000) -> dict[str, list]:
    """Run until idle; -> request id -> list of RequestOutput."""
    outs: dict[str, list] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished:
            return outs
        for out in engine.step():
            outs.setdefault(out.request_id, []).append(out)
    raise AssertionError("engine did not finish")


# random Llamas whose heads split in two (4 attention heads, 2 KV heads); a wide init makes the
# logits peaked, so greedy tokens are stable under re-ordered sums (an all-reduce's, another
# batch's or chunk's)
WIDE_LLAMA = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "initializer_range": 0.2,
}


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory, tokenizer):
    """A random Llama small enough for multi-worker tests: WIDE_LLAMA of 4 layers, the default
    model's tokenizer."""
    from bench.tiny_model import random_llama

    path = tmp_path_factory.mktemp("tiny-llama")
    random_llama(
        path,
        **WIDE_LLAMA,
        num_hidden_layers=4,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return str(path)


# Two LoRA adapters of the default model, as PEFT writes them: "sql" on attention and MLP
# layers (r 4), "poet" on others with rank-stabilized scaling (r 8). Random B (PEFT's
# init_lora_weights=False), so that each changes the greedy output.
LORAS = {
    "sql": {
        "r": 4,
        "lora_alpha": 16,
        "target_modules": ["q_proj", "v_proj", "o_proj", "down_proj"],
    },
    "poet": {"r": 8, "lora_alpha": 4, "use_rslora": True, "target_modules": ["k_proj", "up_proj"]},
}


class Loras:
    """LORAS written by PEFT on one base model, each part made at first use: their
    directories, a directory of them for dynamic loading, PEFT's model with them."""

    def __init__(self, base_path, tmp_path_factory) -> None:
        self.base_path, self.tmp = base_path, tmp_path_factory

    @functools.cached_property
    def adapters(self) -> dict:
        """name -> the PEFT directory of each of LORAS."""
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        dirs = {}
        for i, (name, settings) in enumerate(LORAS.items()):
            torch.manual_seed(i)
            base = AutoModelForCausalLM.from_pretrained(self.base_path, dtype=torch.float32)
            model = get_peft_model(base, LoraConfig(init_lora_weights=False, **settings))
            dirs[name] = self.tmp.mktemp(f"lora-{name}")
            model.save_pretrained(dirs[name])
        return {name: str(path) for name, path in dirs.items()}

    @functools.cached_property
    def dir(self) -> str:
        """A directory of adapters for dynamic loading: both of LORAS, each in a folder of its
        name, and "dora", an adapter this server refuses (its config asks for DoRA)."""
        import json
        import shutil

        root = self.tmp.mktemp("lora-dir")
        for name, path in self.adapters.items():
            shutil.copytree(path, root / name)
        shutil.copytree(self.adapters["sql"], root / "dora")
        config = json.loads((root / "dora" / "adapter_config.json").read_text())
        (root / "dora" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
        return str(root)

    @functools.cached_property
    def peft(self):
        """The base model with the adapters through PEFT's own layers: the reference."""
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(self.base_path, dtype=torch.float32)
        (first, path), *rest = self.adapters.items()
        model = PeftModel.from_pretrained(base, path, adapter_name=first)
        for name, other in rest:
            model.load_adapter(other, adapter_name=name)
        return model.eval()


@pytest.fixture(scope="session")
def default_loras(tmp_path_factory, default_model_path) -> Loras:
    return Loras(default_model_path, tmp_path_factory)


@pytest.fixture(scope="session")
def lora_adapters(default_loras) -> dict:
    return default_loras.adapters


@pytest.fixture(scope="session")
def lora_dir(default_loras) -> str:
    return default_loras.dir


@pytest.fixture(scope="session")
def peft_model(default_loras):
    return default_loras.peft


@pytest.fixture(scope="session")
def serve_model_path(tmp_path_factory, default_model_path) -> str:
    """The tiny model: what the Serve tests' applications serve, and the in-process tests whose
    point is not the text (function calling, structured outputs, draft models; the text is the
    engine tests' point): WIDE_LLAMA of 2 layers (a decode step ~2 ms on one thread, the
    default model's ~80), with the default model's tokenizer, chat template, generation config
    and context window."""
    import shutil

    from bench.tiny_model import random_llama

    path = tmp_path_factory.mktemp("serve-model")
    random_llama(path, **WIDE_LLAMA, num_hidden_layers=2, max_position_embeddings=8192)
    shutil.copy(default_model_path / "generation_config.json", path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_paged_model(serve_model_path):
    return paged(serve_model_path)


@pytest.fixture
def make_tiny_engine(tiny_paged_model, tokenizer):
    """Factory: an engine on the shared weights of serve_model_path with its own KV cache."""
    return _engines(tiny_paged_model, tokenizer)


@pytest.fixture(scope="session")
def tiny_hf_model(serve_model_path):
    return eager(serve_model_path)


@pytest.fixture(scope="session")
def serve_loras(tmp_path_factory, serve_model_path) -> Loras:
    return Loras(serve_model_path, tmp_path_factory)


def peft_greedy(peft_model, token_ids: list[int], lora: str | None, max_new_tokens: int):
    """PEFT's greedy continuation of token_ids with adapter `lora` (None: the base model)."""
    ids = torch.tensor([token_ids])
    with torch.inference_mode(), contextlib.ExitStack() as stack:
        if lora is None:
            stack.enter_context(peft_model.disable_adapter())
        else:
            peft_model.set_adapter(lora)
        out = peft_model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(token_ids) :].tolist()


@dataclass
class FakeProbe:
    """What gpu_memory_utilization reads of a device (engine/kv_memory.py's MemoryProbe): a
    device of `total` bytes, `free` of them free; peak() says `peak` (the CUDA reads themselves
    run in tests/test_gpu.py on a GPU)."""

    total_bytes: int
    free_bytes: int
    peak_bytes: int
    calls: list[str] = field(default_factory=list)

    def total(self) -> int:
        return self.total_bytes

    def free(self) -> int:
        return self.free_bytes

    def reset_peak(self) -> None:
        self.calls.append("reset")

    def peak(self) -> int:
        self.calls.append("peak")
        return self.peak_bytes
