"""KV transfer time per request through the KV channel vs one decode step, same machine, one run.

    python -m bench.kv_transfer [--contexts 128,512,2048] [--repeats 5]
                                [--transports shm,object_store] [--device cpu]

On a GPU machine: `--device cuda --transports cuda_ipc,object_store` (both actors share the
GPU, half each; the decode step is then the engine's on that GPU); `nccl` takes one GPU per
actor (two GPUs). On CPUs `gloo` too: the receiver pulls over a gloo pair.

Two Ray actors on a private local cluster hold KV caches shaped like the default model's
(30 layers, 3 KV heads, head_dim 64, fp32, 16-token blocks). Per request: the sender packs the
request's blocks straight into the transport (KVChannel.send_blocks, as the prefill server
does); the receiver opens them and scatters them into its own cache (straight from the shared
segment for shm). Timed inside the actors (send, receive + scatter) and end to end from the
driver. The decode step is the engine's, batch 1 at
the same context, 1 thread (as in serve_config.yaml).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import ray
import torch

from kvkernels.kv_blocks import unpack_blocks
from kvkernels.kv_channel import KVChannel, KVTransfer

SHAPE = dict(layers=30, kv_heads=3, head_dim=64, block_size=16, num_blocks=600)


def _cache(device: str) -> torch.Tensor:
    s = SHAPE
    return torch.randn(
        s["layers"], 2, s["num_blocks"], s["block_size"], s["kv_heads"], s["head_dim"],
        device=device,
    )  # fmt: skip


@ray.remote(num_cpus=0)
class Replica:
    """One end of the channel with its own cache: two of them, a sender and a receiver."""

    def __init__(self, transport: str, device: str) -> None:
        torch.set_num_threads(1)
        self.device = device
        self.cache = _cache(device)
        self.channel = KVChannel(transport)

    def send(self, num_blocks: int) -> KVTransfer:
        return self.channel.send_blocks(self.cache, list(range(num_blocks)))

    def receive(self, transfer: KVTransfer) -> float:
        t0 = time.perf_counter()
        buffer = self.channel.open(transfer)
        blocks = list(range(SHAPE["num_blocks"] - buffer.shape[2], SHAPE["num_blocks"]))
        unpack_blocks(self.cache, blocks, buffer)
        self.channel.finish(transfer)  # on a GPU: waits for the scatter to finish
        return (time.perf_counter() - t0) * 1e3


def decode_step_ms(context: int, device: str) -> float:
    from bench.engine_throughput import ours_decode_step_s
    from engine import EngineConfig, LLMEngine

    torch.set_num_threads(1)
    engine = LLMEngine(EngineConfig(num_threads=1, kv_cache_memory_mb=256, device=device))
    return ours_decode_step_s(engine, 1, context, 8) * 1e3


def measure(sender, receiver, transport: str, contexts: list[int], repeats: int) -> list[dict]:
    rows = []
    for context in contexts:
        n = -(-context // SHAPE["block_size"])
        send_ms, recv_ms, e2e_ms = [], [], []
        for _ in range(repeats + 1):  # the first is a warm-up
            t0 = time.perf_counter()
            transfer = ray.get(sender.send.remote(n))
            recv_ms.append(ray.get(receiver.receive.remote(transfer)))
            e2e_ms.append((time.perf_counter() - t0) * 1e3)
            send_ms.append(transfer.send_ms)
        rows.append(
            {
                "transport": transfer.transport,
                "context": context,
                "mb": transfer.nbytes / 2**20,
                "send_ms": statistics.median(send_ms[1:]),
                "receive_ms": statistics.median(recv_ms[1:]),
                "end_to_end_ms": statistics.median(e2e_ms[1:]),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--contexts", default="128,512,2048")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--transports", default="shm,object_store")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the caches' device)")
    args = parser.parse_args(argv)
    gpus = torch.cuda.device_count() if args.device.startswith("cuda") else 0
    contexts = [int(c) for c in args.contexts.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="ray-") as tmp:
        ray.init(address="local", num_cpus=2, num_gpus=gpus, include_dashboard=False, _temp_dir=tmp)
        try:
            for transport in args.transports.split(","):
                share = 1 if transport == "nccl" else 0.5  # NCCL: one GPU per rank
                sender, receiver = (
                    Replica.options(num_gpus=share if gpus else 0).remote(transport, args.device)
                    for _ in range(2)
                )
                rows += measure(sender, receiver, transport, contexts, args.repeats)
        finally:
            ray.shutdown()
    steps = {c: decode_step_ms(c, args.device) for c in contexts}
    print(json.dumps({"rows": rows, "decode_step_ms": steps}, indent=2))
    print(
        "| transport | context | KV MB | send ms | receive + scatter ms | end to end ms "
        "| decode step ms |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['transport']} | {r['context']} | {r['mb']:.1f} | {r['send_ms']:.1f} | "
            f"{r['receive_ms']:.1f} | {r['end_to_end_ms']:.1f} | {steps[r['context']]:.1f} |"
        )


if __name__ == "__main__":
    main()
