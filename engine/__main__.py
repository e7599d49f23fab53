"""A quick look without Ray.

`python -m engine generate --prompt TEXT [--chat] [--max-tokens N] [--model PATH_OR_HUB_ID]`
"""

from __future__ import annotations

import argparse
import json
import sys

from engine import EngineConfig, InvalidRequestError, LLMEngine, SamplingParams
from engine.spec_decode import SpeculativeConfig


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="print the completion of one prompt")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--model", default=None, help="HF directory or Hub id (default: embedded)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[])
    gen.add_argument("--presence-penalty", type=float, default=0.0)
    gen.add_argument("--frequency-penalty", type=float, default=0.0)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--dtype", default="float32")
    gen.add_argument("--kv-cache-dtype", default="auto", help="auto, fp8 (= fp8_e4m3), fp8_e5m2")
    gen.add_argument("--threads", type=int, default=None)
    gen.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    gen.add_argument(
        "--enforce-eager", action="store_true", help="vLLM's: no CUDA graphs of decode steps"
    )
    gen.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=None,
        help="vLLM's: with --device cuda, the KV cache fills this share of the GPU (default: "
        "1024 MB of KV cache)",
    )
    gen.add_argument("--stream", action="store_true", help="print text as it is generated")
    gen.add_argument("--lora", default=None, help="a PEFT LoRA adapter's directory to run with")
    gen.add_argument(
        "--speculative-config",
        type=json.loads,
        default=None,
        help='vLLM\'s, as JSON: \'{"method": "ngram", "num_speculative_tokens": 4}\'',
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            min_p=args.min_p,
            seed=args.seed,
            stop=tuple(args.stop),
            presence_penalty=args.presence_penalty,
            frequency_penalty=args.frequency_penalty,
            repetition_penalty=args.repetition_penalty,
            lora=None if args.lora is None else "cli",
        )
        engine = LLMEngine(
            EngineConfig(
                model=args.model,
                dtype=args.dtype,
                kv_cache_dtype=args.kv_cache_dtype,
                num_threads=args.threads,
                device=args.device,
                enforce_eager=args.enforce_eager,
                gpu_memory_utilization=args.gpu_memory_utilization,
                lora_modules=() if args.lora is None else (("cli", args.lora),),
                speculative=_speculative(args.speculative_config),
            )
        )
        prompt = (
            engine.encode_chat([{"role": "user", "content": args.prompt}])
            if args.chat
            else args.prompt
        )
        engine.add_request("cli", prompt, params)
    except (InvalidRequestError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    while engine.has_unfinished:
        for out in engine.step():
            print(out.new_text, end="", flush=args.stream)
            if out.error is not None:  # the engine ended it (its log has the traceback)
                print(f"\nerror: {out.error}", file=sys.stderr)
                return 1
    print()
    if engine.proposer is not None:
        kept, drafts = engine.num_accepted_tokens, engine.num_draft_tokens
        by_position = ", ".join(map(str, engine.num_accepted_per_pos))
        print(
            f"speculative decoding: {kept} of {drafts} draft tokens kept ({by_position} at "
            f"positions 1-{len(engine.num_accepted_per_pos)}, of {engine.num_drafts} drafts)",
            file=sys.stderr,
        )
    return 0


def _speculative(config: dict | None) -> SpeculativeConfig | None:
    if config is None:
        return None
    if not isinstance(config, dict):
        raise ValueError("--speculative-config: a JSON object")
    try:
        return SpeculativeConfig(**config)
    except TypeError as e:  # a key it does not have
        raise ValueError(f"--speculative-config: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
