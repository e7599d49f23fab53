"""Step time of tensor- and pipeline-parallel replicas vs one worker, and the bytes each rank
sends in a re-sharding KV hand-off.

    python -m bench.parallel [--layouts 1x1 2x1 1x2] [--repeats 7]

The embedded model has 9 attention heads and 3 KV heads, which two ranks cannot split, so the
timing runs a random-weight model of the same size and depth (hidden 576, 30 layers, MLP 1536,
vocabulary 49152) with 8 heads and 2 KV heads (head_dim 72): step time depends on the shapes,
not on the weights. Every layout runs in the same process tree, one after another, on the same
private Ray cluster; each worker gets `--threads` torch threads, and the single-worker baseline
is measured at both 1 thread and `tp * pp` threads, so the comparison uses the same cores.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from bench.host import median_time
from bench.tiny_model import random_llama
from engine.model_runner import ModelInput, SeqInput


def make_model(path: Path) -> str:
    """SmolLM2-135M's shape with random weights."""
    shape = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30}
    shape |= {"num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 72}
    return str(random_llama(path, **shape))


def prefill_batch(prompt_len: int, block_size: int) -> ModelInput:
    blocks = list(range(-(-prompt_len // block_size)))
    return ModelInput([SeqInput([7] * prompt_len, 0, blocks, True)])


def decode_batch(batch: int, context: int, block_size: int) -> ModelInput:
    per = -(-context // block_size)
    return ModelInput(
        [
            SeqInput([7], context - 1, list(range(i * per, (i + 1) * per)), True)
            for i in range(batch)
        ]
    )


def median_ms(runner, batch: ModelInput, repeats: int) -> float:
    runner.execute(batch)  # warm-up: allocations, the kernel's first call
    return 1e3 * median_time(lambda: runner.execute(batch), repeats)


def make_engine(path: str, tp: int, pp: int, threads: int, num_blocks: int):
    from engine import EngineConfig, LLMEngine

    config = EngineConfig(
        model=path,
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        num_threads=threads,
        num_kv_blocks=num_blocks,
        worker_num_cpus=0.5,
    )
    return LLMEngine(config)


def measure(path: str, tp: int, pp: int, threads: int, args) -> dict:
    num_blocks = args.decode_batch * -(-args.context // 16) + 64
    engine = make_engine(path, tp, pp, threads, num_blocks)  # sets this process's threads
    try:
        row = {"layout": f"tp{tp}xpp{pp}", "threads_per_worker": threads}
        row["prefill_ms"] = median_ms(
            engine.runner, prefill_batch(args.prompt_len, 16), args.repeats
        )
        row["decode_ms"] = median_ms(
            engine.runner, decode_batch(args.decode_batch, args.context, 16), args.repeats
        )
        return row
    finally:
        shutdown = getattr(engine.runner, "shutdown", None)
        if shutdown is not None:
            shutdown()


def handoff_bytes(path: str, prompt_len: int) -> dict:
    """Prefill TP=2 -> decode TP=1 x PP=2 of one prompt: bytes per sending rank vs the whole."""
    import ray

    from engine import SamplingParams
    from engine.kv_handoff import total_bytes
    from engine.parallel import ParallelLayout
    from kvkernels.kv_channel import KVChannel

    prefill = make_engine(path, 2, 1, 1, 64)
    try:
        rid = prefill.add_request(
            None, [7] * prompt_len, SamplingParams(max_tokens=2), prefill_only=True
        )
        while not any(o.prefilled for o in prefill.step()):
            pass
        handoff = prefill.kv_handoff(rid)
        channel = KVChannel("shm", ray.get_runtime_context().get_node_id())
        pieces = prefill.runner.send_kv(list(handoff.block_ids), ParallelLayout(1, 2), channel)
        whole = handoff.num_blocks * 16 * prefill.runner.shape.kv_bytes_per_token(torch.float32)
        return {
            "prompt_tokens": prompt_len,
            "whole_cache_bytes": whole,
            "bytes_per_prefill_rank": total_bytes(pieces),
            "bytes_per_decode_rank": {
                d: sum(p.nbytes for p in pieces if p.spec.dst_rank == d) for d in (0, 1)
            },
            "pieces": len(pieces),
        }
    finally:
        prefill.runner.shutdown()


def main(argv: list[str] | None = None) -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", nargs="+", default=["1x1", "2x1", "1x2"])
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--decode-batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=None, help="write the results as JSON")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        ray.init(address="local", num_cpus=8, include_dashboard=False, _temp_dir=f"{tmp}/ray")
        try:
            path = make_model(Path(tmp) / "model")
            rows = []
            for layout in args.layouts:
                tp, pp = (int(x) for x in layout.split("x"))
                if tp * pp == 1:  # the baseline on one core and on as many as the others use
                    rows.append(measure(path, 1, 1, 1, args))
                    rows.append(measure(path, 1, 1, 2, args))
                else:
                    rows.append(measure(path, tp, pp, 1, args))
            result = {"steps": rows, "handoff": handoff_bytes(path, args.prompt_len)}
        finally:
            ray.shutdown()
    base = next(r for r in rows if r["layout"] == "tp1xpp1" and r["threads_per_worker"] == 1)
    print(f"{'layout':<10} {'threads':>7} {'prefill ms':>10} {'x':>5} {'decode ms':>9} {'x':>5}")
    for r in rows:
        print(
            f"{r['layout']:<10} {r['threads_per_worker']:>7} {r['prefill_ms']:>10.1f} "
            f"{base['prefill_ms'] / r['prefill_ms']:>5.2f} {r['decode_ms']:>9.1f} "
            f"{base['decode_ms'] / r['decode_ms']:>5.2f}"
        )
    print(json.dumps(result["handoff"], indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
