"""The default model's tokenizer is the same whichever transformers converted it, and a model's
generation config ends requests at its own end-of-sequence ids (vLLM's rule)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tokenizers import decoders, normalizers

from app.protocol import APIError
from engine import EngineConfig, LLMEngine, SamplingParams
from engine.model_store import canonical_tokenizer, generation_stop_ids

TEXT = "Héllo wörld ✓ — 漢字\n\t  x. ,y <b>"


@pytest.mark.model
def test_a_tokenizer_converted_as_transformers_5_17_did_is_set_right(default_model_path):
    """transformers 5.17 (the GPU machine's) saved the GGUF's tokenizer with <|im_start|> as
    EOS, space clean-up on and SentencePiece decoder steps: replies on that machine ran past
    <|im_end|>. After canonical_tokenizer it saves as the tokenizer transformers 5.25 built."""
    from transformers import AutoTokenizer

    want = AutoTokenizer.from_pretrained(default_model_path)
    broken = AutoTokenizer.from_pretrained(default_model_path)
    broken.eos_token = "<|im_start|>"
    broken.clean_up_tokenization_spaces = True
    backend = broken.backend_tokenizer
    backend.normalizer = normalizers.Sequence([])
    backend.decoder = decoders.Sequence(
        [
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Replace("▁", " "),
            decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True),
        ]
    )
    assert broken.eos_token_id == 1
    fixed = canonical_tokenizer(broken)
    assert (
        (fixed.eos_token_id, fixed.pad_token_id)
        == (want.eos_token_id, want.pad_token_id)
        == (
            2,
            2,
        )
    )
    assert fixed.clean_up_tokenization_spaces is False
    saved, ref = (json.loads(t.backend_tokenizer.to_str()) for t in (fixed, want))
    assert saved["decoder"] == ref["decoder"] and saved["normalizer"] is None
    ids = fixed.encode(TEXT)
    assert ids == want.encode(TEXT) and fixed.decode(ids) == TEXT


@pytest.mark.model
def test_the_generation_configs_eos_ids_end_a_request(default_model_path, tmp_path):
    """A copy of the default model whose generation config also names the third greedy token
    an end of sequence (as Llama 3 Instruct's names <|eot_id|>): the request stops there, as
    a stop token id would; ignore_eos runs on, and min_tokens holds it back."""
    model = tmp_path / "model"
    shutil.copytree(default_model_path, model)
    params = SamplingParams(max_tokens=10, temperature=0.0)
    plain = LLMEngine(EngineConfig(model=str(model), kv_cache_memory_mb=64))
    assert plain.model_stop_ids == ()  # its generation config's EOS is the tokenizer's
    [free] = plain.generate(
        ["Count: 1, 2, 3,"], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    )
    stop = free.token_ids[2]
    assert stop not in free.token_ids[:2] and 2 not in free.token_ids
    config = json.loads((model / "generation_config.json").read_text())
    config["eos_token_id"] = [2, stop]
    (model / "generation_config.json").write_text(json.dumps(config))
    assert generation_stop_ids(model, 2) == (stop,)

    engine = LLMEngine(EngineConfig(model=str(model), kv_cache_memory_mb=64))
    [out] = engine.generate(["Count: 1, 2, 3,"], params)
    assert out.token_ids == free.token_ids[:3] and out.finish_reason == "stop"
    [ignored] = engine.generate(
        ["Count: 1, 2, 3,"], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    )
    assert ignored.token_ids == free.token_ids
    held = SamplingParams(max_tokens=10, temperature=0.0, min_tokens=5)
    [late] = engine.generate(["Count: 1, 2, 3,"], held)
    assert len(late.token_ids) >= 5 and stop not in late.token_ids[:5]


HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
HUB_LORA = "someone/sql-lora"


def _cache_repo(cache: Path, repo: str, files: Path, refs: dict[str, str]) -> Path:
    """`files`' contents as the cache's snapshot of `repo` at each ref's commit -> the
    repository's snapshots folder."""
    (cache / repo / "refs").mkdir(parents=True)
    for ref, commit in refs.items():
        (cache / repo / "refs" / ref).write_text(commit)
        snapshot = cache / repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        for f in files.iterdir():
            (snapshot / f.name).symlink_to(f)
    return cache / repo / "snapshots"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, default_model_path, lora_adapters):
    """A Hugging Face Hub cache holding HUB_ID at two revisions (main, and a tag v1 of another
    commit) and the LoRA adapter "sql" as HUB_LORA, laid out as huggingface_hub writes it;
    the Hub unreachable (offline mode), so a model comes from this cache or not at all."""
    from huggingface_hub import constants

    from engine.model_store import hub_snapshot

    repo = "models--HuggingFaceTB--SmolLM2-135M-Instruct"
    snapshots = _cache_repo(tmp_path, repo, default_model_path, {"main": "a" * 40, "v1": "b" * 40})
    adapter = Path(lora_adapters["sql"])
    _cache_repo(tmp_path, "models--someone--sql-lora", adapter, {"main": "c" * 40})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub_snapshot.cache_clear()
    yield snapshots
    hub_snapshot.cache_clear()


@pytest.mark.model
def test_a_hub_repository_id_loads_from_the_hubs_cache_at_its_revision(hub_cache):
    from engine.model_store import resolve_model

    assert resolve_model(HUB_ID) == hub_cache / ("a" * 40)
    assert resolve_model(HUB_ID, "v1") == hub_cache / ("b" * 40)


@pytest.mark.model
def test_the_engine_serves_a_hub_model_as_the_same_model_by_directory(hub_cache, make_engine):
    """The same weights by their Hub id and by their directory: the same greedy tokens."""
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompt = [[1, 504, 3458, 282, 4649, 314]]
    by_id = LLMEngine(EngineConfig(model=HUB_ID, kv_cache_memory_mb=64, num_threads=1))
    assert by_id.generate(prompt, params)[0].token_ids == (
        make_engine().generate(prompt, params)[0].token_ids
    )


@pytest.mark.model
@pytest.mark.parametrize(
    ("model", "revision", "needle"),
    [
        ("someone/not-cached", None, "nor a Hugging Face Hub repository this host can fetch"),
        (HUB_ID, "v2", "nor a Hugging Face Hub repository this host can fetch"),
        ("/no/such/dir", None, "is not a directory with a config.json"),
        ("./relative/dir/", None, "is not a directory with a config.json"),
    ],
)
def test_a_model_neither_here_nor_in_the_cache_is_a_clear_error(hub_cache, model, revision, needle):
    from engine.model_store import resolve_model

    with pytest.raises(FileNotFoundError, match=needle):
        resolve_model(model, revision)


def test_the_served_name_is_the_model_as_written_unless_named():
    """vLLM's --served-model-name default: the --model argument as given."""
    from app.config import AppArgs

    assert AppArgs().served_name == "SmolLM2-135M-Instruct"
    assert AppArgs(model=HUB_ID).served_name == HUB_ID
    assert AppArgs(model="/models/qwen").served_name == "/models/qwen"
    assert AppArgs(model=HUB_ID, served_model_name="chat").served_name == "chat"


def test_several_served_names_each_name_the_model_and_the_first_answers(tmp_path):
    """vLLM's --served-model-name with several names: a request may give any of them, and
    responses give the first."""
    from pydantic import ValidationError

    from app.config import AppArgs, MultiModelArgs

    args = AppArgs(model=HUB_ID, served_model_name=["chat", "qwen", HUB_ID])
    assert (args.served_name, args.served_names) == ("chat", ("chat", "qwen", HUB_ID))
    for bad, why in (([], "none of them empty"), (["a", ""], "none of them empty"),
                     (["a", "b", "a"], "names repeat"), ("", "none of them empty")):  # fmt: skip
        with pytest.raises(ValidationError, match=why):
            AppArgs(served_model_name=bad)
    (tmp_path / "adapter_config.json").write_text("{}")  # an adapter's directory
    with pytest.raises(ValidationError, match="lora_modules: 'b' names the base model"):
        AppArgs(served_model_name=["a", "b"], lora_modules={"b": str(tmp_path)})
    with pytest.raises(ValidationError, match="'b' is models\\[0\\]'s name already"):
        MultiModelArgs(models=[{"served_model_name": ["a", "b"]}, {"served_model_name": "b"}])


@pytest.mark.model
def test_the_ingress_lists_a_hub_model_by_its_id(hub_cache):
    from app.ingress import Ingress

    ingress = Ingress({"model": HUB_ID, "revision": "v1"})
    assert [card["id"] for card in ingress._model_cards()] == [HUB_ID]
    assert ingress._model_card(HUB_ID)["id"] == HUB_ID
    named = Ingress({"model": HUB_ID, "served_model_name": "chat"})._model_card("chat")
    assert (named["id"], named["root"], named["parent"]) == ("chat", HUB_ID, None)  # vLLM's
    aliased = Ingress({"model": HUB_ID, "served_model_name": ["chat", "qwen"]})
    cards = aliased._model_cards()  # a card for each name, as vLLM lists them
    assert [(c["id"], c["root"], c["parent"]) for c in cards] == [
        ("chat", HUB_ID, None), ("qwen", HUB_ID, None)]  # fmt: skip
    assert aliased._lora("qwen") is None  # the base model
    with pytest.raises(APIError, match="this server serves 'chat', 'qwen'"):
        aliased._lora("other")


@pytest.mark.model
def test_serve_run_refuses_a_model_no_replica_would_find_before_any_starts(hub_cache):
    """build_app (what `serve run` calls) looks the model up: a cached Hub model passes, one
    neither cached nor reachable is refused with its name."""
    from app.builder import build_app
    from engine.model_store import check_model

    check_model(HUB_ID)
    check_model(HUB_ID, "v1")
    build_app({"model": HUB_ID})
    with pytest.raises(FileNotFoundError, match="'someone/not-cached' is neither"):
        build_app({"model": "someone/not-cached"})
    with pytest.raises(FileNotFoundError, match="is neither"):
        check_model(HUB_ID, "v2")
    with pytest.raises(FileNotFoundError, match="is not a directory with a config.json"):
        build_app({"model": "/no/such/dir"})


@pytest.mark.model
def test_a_model_worker_on_a_node_without_the_replicas_directory_loads_its_own_copy(
    default_model_path, tmp_path
):
    """A pipeline stage placed on another node than its replica is sent the replica's model
    directory; where that is missing (a Hub model's cache path, the embedded model's), the
    worker resolves the configured model on its own node."""
    from engine.parallel import ParallelLayout
    from engine.workers import ModelWorker

    def worker(path):
        return ModelWorker(str(path), EngineConfig(), ParallelLayout(1, 2), 1, 4, "shm")

    assert worker(default_model_path)._model_dir() == str(default_model_path)
    assert worker(tmp_path / "elsewhere")._model_dir() == str(default_model_path)


@pytest.mark.model
def test_a_lora_adapter_by_hub_id_is_the_same_adapter_as_by_its_directory(
    hub_cache, lora_adapters, paged_model
):
    """lora_modules may name an adapter's Hub repository (as vLLM's --lora-modules): each
    replica loads it from the Hub's cache; one neither cached nor reachable is refused at
    once, naming the adapter."""
    import pydantic
    import torch

    from app.config import AppArgs
    from engine.lora import LoRAError, load_adapter

    by_id = load_adapter("sql", HUB_LORA, paged_model)
    by_dir = load_adapter("sql", lora_adapters["sql"], paged_model)
    assert by_id.layers.keys() == by_dir.layers.keys() and by_id.rank == by_dir.rank
    for name, (a, b, _) in by_dir.layers.items():
        assert torch.equal(by_id.layers[name][0], a) and torch.equal(by_id.layers[name][1], b)
    assert AppArgs(lora_modules={"sql": HUB_LORA}).lora_modules == {"sql": HUB_LORA}
    with pytest.raises(pydantic.ValidationError, match="'poet': LoRA adapter 'someone/po"):
        AppArgs(lora_modules={"poet": "someone/poet-lora"})
    with pytest.raises(LoRAError, match="'someone/poet-lora' is neither a local directory"):
        load_adapter("poet", "someone/poet-lora", paged_model)


@pytest.mark.model
def test_a_plan_for_a_hub_model_reads_its_config_and_serves_it_by_id(hub_cache, tmp_path):
    """`placement plan --model <Hub id>` reads the model's config.json (alone) and writes a
    config whose replicas fetch the model by that id; an id not found is a clear exit."""
    import yaml

    from placement.__main__ import main as placement_main

    out = tmp_path / "serve.yaml"
    argv = [
        "plan", "--device", "A100-80GB", "--model", HUB_ID, "--cluster", "1x2",
        "--workload", "512:64", "--ttft-slo", "400", "--tpot-slo", "60",
        "--num-requests", "30", "-o", str(out),
    ]  # fmt: skip
    placement_main(argv)
    args = yaml.safe_load(out.read_text())["applications"][0]["args"]
    assert args["model"] == HUB_ID
    with pytest.raises(SystemExit, match="model 'someone/not-cached' is neither"):
        placement_main([*argv[:4], "someone/not-cached", *argv[5:]])


@pytest.mark.parametrize(
    ("stored", "device", "want"),
    [
        ("bfloat16", "cpu", "bfloat16"),
        ("float16", "cpu", "bfloat16"),  # a CPU has no fast float16
        ("float32", "cpu", "float32"),
        (None, "cpu", "float32"),
        ("bfloat16", "cuda", "bfloat16"),  # vLLM's: BF16 for BF16 models,
        ("float16", "cuda", "float16"),  # FP16 for FP16
        ("float32", "cuda", "float16"),  # and FP32 ones
        (None, "cuda:1", "float16"),
    ],
)
def test_vllms_auto_dtype(stored, device, want):
    from app.config import auto_dtype

    assert auto_dtype(stored, device) == want


@pytest.mark.model
def test_dtype_auto_reads_the_models_config_and_vllms_names_are_taken(hub_cache, tmp_path):
    """dtype auto is read where the config is (the embedded model and this Hub one are
    stored in bfloat16; a float32 directory stays float32 on a CPU); "half" and "float" are
    vLLM's names of float16 and float32; a model without a config is refused naming it."""
    import pydantic

    from app.config import AppArgs

    assert AppArgs(dtype="auto").dtype == "bfloat16"
    assert AppArgs(dtype="auto", model=HUB_ID).dtype == "bfloat16"
    fp32 = tmp_path / "fp32"
    fp32.mkdir()
    (fp32 / "config.json").write_text(json.dumps({"model_type": "llama", "dtype": "float32"}))
    assert AppArgs(dtype="auto", model=str(fp32)).dtype == "float32"
    assert (AppArgs(dtype="half").dtype, AppArgs(dtype="float").dtype) == ("float16", "float32")
    assert AppArgs.model_validate(AppArgs(dtype="auto").model_dump()).dtype == "bfloat16"
    with pytest.raises(pydantic.ValidationError, match="dtype auto reads the model's config"):
        AppArgs(dtype="auto", model="someone/not-cached")


def _tokenizer_dir(path: Path, default_model_path: Path, template: str) -> Path:
    """The default model's tokenizer files alone, with `template` for its chat template."""
    path.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_path / name, path / name)
    (path / "chat_template.jinja").write_text(template)
    return path


SHOUT = "{% for m in messages %}<|im_start|>{{ m['content'] | upper }}<|im_end|>{% endfor %}"


@pytest.mark.model
def test_a_tokenizer_of_its_own_directory_or_hub_id(tmp_path, default_model_path, monkeypatch):
    """vLLM's --tokenizer: the engine tokenizes with the given one (here the model's own
    files with another chat template), by directory or by Hub id, of which only the
    tokenizer's files are fetched; the model's tokens are the same."""
    from huggingface_hub import constants

    from engine.model_store import check_tokenizer, hub_snapshot, resolve_tokenizer

    tokenizer = _tokenizer_dir(tmp_path / "tok", default_model_path, SHOUT)
    assert resolve_tokenizer(None, None, default_model_path) == default_model_path
    assert resolve_tokenizer(str(tokenizer), None, default_model_path) == tokenizer
    snapshots = _cache_repo(tmp_path / "hub", "models--someone--tok", tokenizer, {"main": "d" * 40})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub_snapshot.cache_clear()
    try:
        assert resolve_tokenizer("someone/tok", None, default_model_path) == snapshots / ("d" * 40)
        check_tokenizer("someone/tok")
        with pytest.raises(FileNotFoundError, match="tokenizer 'someone/missing' is neither"):
            check_tokenizer("someone/missing")
        engines = [LLMEngine(EngineConfig(num_kv_blocks=64, tokenizer=t)) for t in
                   (None, str(tokenizer), "someone/tok")]  # fmt: skip
    finally:
        hub_snapshot.cache_clear()
    chat = [{"role": "user", "content": "hi"}]
    rendered = [e.tokenizer.apply_chat_template(chat, tokenize=False) for e in engines]
    assert rendered[1] == rendered[2] == "<|im_start|>HI<|im_end|>" != rendered[0]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    outs = [
        [o.token_ids for o in e.generate(["The capital of France is"], params)] for e in engines
    ]
    assert outs[0] == outs[1] == outs[2]


def test_a_tokenizer_that_is_nowhere_fails_the_build(tmp_path):
    from app.builder import build_app

    with pytest.raises(FileNotFoundError, match="tokenizer .* is not a directory with a tokenizer"):
        build_app({"tokenizer": str(tmp_path)})  # a directory, but no tokenizer in it
