"""A tiny random Llama with the default model's tokenizer: an engine fast enough on a CPU to
stream as many tokens a second as a GPU does, so that what the serving front end (ingress,
proxy, client) carries is what bounds goodput, as on a GPU.

    python -m bench.tiny_model --out ~/.cache/splitserve/tiny-llama
    python -m bench.experiment --serve-model ~/.cache/splitserve/tiny-llama \\
        --configs disagg-1p1d disagg-1p1d-batched disagg-1p1d-2ingress ...

Its tokens are noise (random weights); requests set ignore_eos so that every reply has the
asked length. Deterministic: the weights come from a fixed seed.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def build(out: Path, hidden: int = 64, layers: int = 2) -> Path:
    return random_llama(
        out,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
    )


def random_llama(out: Path, **shape) -> Path:
    """A Llama of `shape` (LlamaConfig's fields; a context of 2048 and tied embeddings unless
    it says otherwise) with seeded random weights and the default model's tokenizer, saved at
    `out`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from engine.model_store import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model(None)))
    defaults = {"max_position_embeddings": 2048, "tie_word_embeddings": True}
    config = LlamaConfig(**{**defaults, **shape}, vocab_size=len(tokenizer))
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args(argv)
    print(f"wrote {build(args.out, args.hidden, args.layers)}")


if __name__ == "__main__":
    main()
