"""What serving LoRA adapters adds to a decode step and a prefill step, side by side.

    python -m bench.lora_cost [--threads 2] [--context 512] [--batches 1,8,32] [--rounds 3]
                              [--rank 16]

Two random adapters of the default model, written by PEFT, on all seven linear layers of
every decoder layer (q, k, v, o, gate, up, down; rank `--rank`, vLLM's default largest).
Each round times a greedy decode step of `batch` requests of `--context`-token contexts: on an
engine without adapters ("none"), then on one with both loaded, its requests on the base model
("base": what idle adapters cost), all on one adapter ("one") and alternating between the two
("two": each layer's delta in two groups); then the prefill step of one `--context` prompt
on the base model and on an adapter. Medians over rounds, and their ratios to "none".
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import torch

from bench.engine_throughput import ours_decode_step_s, ours_prefill_s
from engine import EngineConfig, LLMEngine
from engine.model_store import resolve_model

LAYERS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = {  # (engine with adapters?, the requests' adapters in turn)
    "none": (False, (None,)),
    "base": (True, (None,)),
    "one": (True, ("a",)),
    "two": (True, ("a", "b")),
}


def write_adapters(rank: int, where: str) -> dict[str, str]:
    """Two random PEFT adapters of the default model -> name -> directory."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dirs = {}
    for seed, name in enumerate(("a", "b")):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(resolve_model(None))
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=LAYERS, init_lora_weights=False)
        dirs[name] = f"{where}/{name}"
        get_peft_model(base, config).save_pretrained(dirs[name])
    return dirs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.lora_cost")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as where:
        loras = tuple(write_adapters(args.rank, where).items())
        engines = {
            with_loras: LLMEngine(
                EngineConfig(
                    num_threads=args.threads,
                    kv_cache_memory_mb=1024,
                    lora_modules=loras if with_loras else (),
                )
            )
            for with_loras in (False, True)
        }
    times: dict[tuple[int | str, str], list[float]] = {}
    for _ in range(args.rounds):
        for batch in batches:
            for name, (with_loras, turns) in VARIANTS.items():
                step = ours_decode_step_s(
                    engines[with_loras], batch, args.context, args.steps, cycle={"lora": turns}
                )
                times.setdefault((batch, name), []).append(step)
        for name, lora in (("none", None), ("one", "a")):
            step = ours_prefill_s(engines[lora is not None], args.context, lora=lora)
            times.setdefault(("prefill", name), []).append(step)
    print(
        f"decode step, {args.context}-token contexts, rank {args.rank} on 7 layers x 30, "
        f"{args.threads} threads, medians of {args.rounds} rounds x {args.steps} steps"
    )
    others = [n for n in VARIANTS if n != "none"]
    print("| batch | none ms | " + " | ".join(f"{n} ms | ratio" for n in others) + " |")
    print("|---" * (2 + 2 * len(others)) + "|")
    for batch in [*batches, "prefill"]:
        names = others if batch != "prefill" else ["one"]
        plain = statistics.median(times[batch, "none"]) * 1e3
        cells = [f"{batch}", f"{plain:.1f}"]
        for name in names:
            ms = statistics.median(times[batch, name]) * 1e3
            cells += [f"{ms:.1f}", f"{ms / plain:.3f}"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
