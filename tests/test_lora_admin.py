"""vLLM's runtime LoRA updating (app/lora_admin.py): adapters linked into lora_dir and
unlinked, every refusal with its status and field, and an engine that loads the new adapter
when a name's link is replaced (the serve test runs it over HTTP)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.config import AppArgs
from app.lora_admin import (
    LoadLoRAAdapterRequest,
    UnloadLoRAAdapterRequest,
    load_adapter,
    unload_adapter,
)
from app.protocol import APIError
from engine import EngineConfig, LLMEngine, SamplingParams, SchedulerConfig
from engine.config import lora_dir_adapters, lora_path


def _load(lora_dir, name, path, inplace=False, configured=frozenset()):
    req = LoadLoRAAdapterRequest(lora_name=name, lora_path=str(path), load_inplace=inplace)
    return load_adapter(str(lora_dir), set(configured), req)


def _unload(lora_dir, name, configured=frozenset()):
    return unload_adapter(str(lora_dir), set(configured), UnloadLoRAAdapterRequest(lora_name=name))


def _refused(status: int, param: str, call, *args, **kwargs) -> str:
    with pytest.raises(APIError) as e:
        call(*args, **kwargs)
    assert (e.value.status, e.value.param) == (status, param), e.value.message
    return e.value.message


@pytest.mark.model
def test_adapters_are_linked_into_lora_dir_and_unlinked(lora_adapters, tmp_path):
    sql, poet = Path(lora_adapters["sql"]), Path(lora_adapters["poet"])
    root = tmp_path / "adapters"
    root.mkdir()
    shutil.copytree(sql, root / "own")  # one of the directory's own adapters
    assert _load(root, "x", sql) == "Success: LoRA adapter 'x' added successfully."
    assert lora_path(root, "x") == root / "x" and (root / "x").resolve() == sql
    assert lora_dir_adapters(root) == ["own", "x"]
    message = _refused(400, "lora_name", _load, root, "x", poet)
    assert "already been loaded" in message and "load_inplace" in message
    _load(root, "x", poet, inplace=True)
    assert (root / "x").resolve() == poet and sorted(p.name for p in root.iterdir()) == [
        "own",
        "x",
    ]  # no spare link left behind
    for name in ("own", "base"):  # the configuration's adapters (or the base model) stay
        assert "configuration" in _refused(
            400, "lora_name", _load, root, name, sql, configured={"base"}
        )
        assert "configuration" in _refused(
            400, "lora_name", _unload, root, name, configured={"base"}
        )
    # not one folder's name: before, the file system's own error (a 500) for the last four
    for name in ("", "a/b", "..", ".hidden", "a\0b", "x" * 256, "\u00e9" * 128, "\ud800"):
        assert "must name one folder" in _refused(400, "lora_name", _load, root, name, sql)
        assert "must name one folder" in _refused(400, "lora_name", _unload, root, name)
        assert lora_path(root, name) is None  # a request's model naming it: a 404, not a 500
    longest = "x" * 255  # NAME_MAX bytes
    _load(root, longest, sql)
    assert lora_path(root, longest) == root / longest and _unload(root, longest).startswith("Succ")
    assert "adapter_config.json" in _refused(400, "lora_path", _load, root, "y", tmp_path)
    dora = tmp_path / "dora"
    shutil.copytree(sql, dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    assert "use_dora" in _refused(400, "lora_path", _load, root, "y", dora)
    assert not (root / "y").exists()
    assert _unload(root, "x") == "Success: LoRA adapter 'x' removed successfully."
    assert lora_path(root, "x") is None and poet.is_dir()  # the adapter itself stays
    assert "cannot be found" in _refused(404, "lora_name", _unload, root, "x")


@pytest.mark.unit
def test_runtime_updating_needs_lora_dir(tmp_path):
    with pytest.raises(ValidationError, match="allow_runtime_lora_updating needs lora_dir"):
        AppArgs(allow_runtime_lora_updating=True)
    args = AppArgs(allow_runtime_lora_updating=True, lora_dir=str(tmp_path))
    assert args.allow_runtime_lora_updating


@pytest.mark.model
def test_an_engine_loads_the_new_adapter_when_its_link_is_replaced(lora_adapters, tmp_path):
    """The engine loaded "x" from one adapter and cached its prompt's blocks; the link now
    points at the other: the same prompt gets the other's tokens, as an engine configured
    with that one gives (none of the old adapter's cached KV taken); unlinked, the engine
    keeps what it holds for requests already admitted."""
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompt = "Item 3: the best of all the things that we have seen"  # 13 tokens: 3 blocks
    caching = {"block_size": 4, "scheduler": SchedulerConfig(enable_prefix_caching=True)}
    configured = LLMEngine(
        EngineConfig(num_kv_blocks=64, lora_modules=tuple(lora_adapters.items()), **caching)
    )
    want = {
        name: configured.generate([prompt], dataclasses.replace(params, lora=name))[0].token_ids
        for name in ("sql", "poet")
    }
    assert want["sql"] != want["poet"]
    engine = LLMEngine(
        EngineConfig(num_kv_blocks=64, lora_dir=str(tmp_path), max_loras=2, **caching)
    )
    on_x = dataclasses.replace(params, lora="x")
    for name in ("sql", "poet"):
        _load(tmp_path, "x", lora_adapters[name], inplace=True)
        [out] = engine.generate([prompt], on_x)
        assert out.token_ids == want[name], name
    assert engine.stats.num_cached_tokens == 0  # the second prompt was not the first's
    assert engine.runner.num_lora_loads == 2 and list(engine.runner.lora_slots) == ["x"]
    _unload(tmp_path, "x")
    [out] = engine.generate([prompt], on_x)
    assert out.token_ids == want["poet"] and engine.runner.num_lora_loads == 2
    assert engine.stats.num_cached_tokens == 12  # its own blocks, cached under poet
