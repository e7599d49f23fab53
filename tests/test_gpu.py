"""GPU serving: the Serve resources a GPU config asks for (runs anywhere), and the engine and
the CUDA IPC KV transport on a real GPU (skipped without CUDA and CuPy; `make gpu-check` runs
them on a GPU machine)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from app.builder import deployment_options
from app.config import AppArgs
from kernels import cuda_ipc_transport

needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and cuda_ipc_transport.available()),
    reason="needs a CUDA device and CuPy (pip install -e '.[gpu]')",
)


def _options(args: AppArgs, phase: str) -> dict:
    return deployment_options(getattr(args, phase), phase, phase, args.gpus_per_worker(phase))


@pytest.mark.unit
def test_gpu_configs_reserve_gpus_for_whoever_holds_the_model():
    args = AppArgs.model_validate(
        {"device": "cuda", "kv_transport": "cuda_ipc", "decode": {"num_gpus": 0.5}}
    )
    assert _options(args, "prefill")["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1.0}
    # a fraction: prefill and decode replicas may share one GPU
    assert _options(args, "decode")["ray_actor_options"]["num_gpus"] == 0.5
    # tensor parallel: the workers hold the model, one GPU each; the replica schedules only
    tp = AppArgs.model_validate(
        {"device": "cuda", "prefill": {"engine": {"tensor_parallel_size": 2}}}
    )
    opts = _options(tp, "prefill")
    worker = {"CPU": tp.prefill.engine.worker_num_cpus, "GPU": 1.0}
    assert opts["placement_group_bundles"] == [{"CPU": 1.0}, worker, worker]
    assert opts["ray_actor_options"] == {"num_cpus": 1.0}
    assert tp.engine_config("prefill").worker_num_gpus == 1.0
    # on CPU nothing asks for a GPU
    cpu = _options(AppArgs(), "prefill")
    assert "num_gpus" not in cpu["ray_actor_options"]
    with pytest.raises(ValidationError, match="cuda_ipc"):
        AppArgs(kv_transport="cuda_ipc")  # device cpu


@pytest.mark.unit
def test_cuda_ipc_without_cupy_or_a_gpu_is_a_clear_error():
    from kernels.kv_channel import KVChannel

    if cuda_ipc_transport.available():
        pytest.skip("this machine has CuPy and a GPU")
    with pytest.raises(ValueError, match="CuPy and a CUDA device"):
        KVChannel("cuda_ipc")


@pytest.fixture(scope="module")
def gpu_cluster(tmp_path_factory):
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        num_gpus=1,
        include_dashboard=False,
        _temp_dir=str(tmp_path_factory.mktemp("ray")),
    )
    yield
    ray.shutdown()


SHAPE = (3, 2, 10, 4, 2, 8)  # (L, 2, blocks, bs, Hkv, D)


def _sender_class():
    import ray

    from kernels.kv_channel import KVChannel

    @ray.remote(num_cpus=0, num_gpus=0.5)
    class Sender:
        def __init__(self, dtype: str) -> None:
            g = torch.Generator().manual_seed(0)
            cache = torch.randn(*SHAPE, generator=g).to(getattr(torch, dtype))
            self.cache = cache.cuda()
            self.channel = KVChannel("cuda_ipc")

        def send(self, blocks: list[int]):
            return self.channel.send_blocks(self.cache, blocks)

        def blocks(self, blocks: list[int]) -> torch.Tensor:
            return self.cache[:, :, blocks].cpu()

    return Sender


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_ipc_moves_blocks_bit_exactly_between_processes(gpu_cluster, dtype):
    import ray

    from kernels.kv_blocks import unpack_blocks
    from kernels.kv_channel import KVChannel, TransferExpired

    sender = _sender_class().remote(dtype)
    receiver = KVChannel("cuda_ipc")
    src, dst = [7, 2, 5], [4, 0, 1]
    first = None
    for _ in range(3):  # device buffers are reused after release
        transfer = ray.get(sender.send.remote(src))
        assert transfer.transport == "cuda_ipc"
        cache = torch.zeros(3, 2, 6, 4, 2, 8, dtype=getattr(torch, dtype), device="cuda")
        unpack_blocks(cache, dst, receiver.open(transfer))
        receiver.finish(transfer)
        assert torch.equal(cache[:, :, dst].cpu(), ray.get(sender.blocks.remote(src)))
        assert not cache[:, :, [2, 3, 5]].any()
        first = first or transfer
    with pytest.raises(TransferExpired):  # the first transfer's buffer was reused
        receiver.open(first)
    receiver.close()


@pytest.mark.gpu
@needs_cuda
def test_engine_on_cuda_generates_the_cpu_engines_greedy_tokens(tiny_llama_path):
    from engine import EngineConfig, LLMEngine, SamplingParams

    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    seeded = SamplingParams(max_tokens=12, temperature=0.8, seed=7, ignore_eos=True)
    prompts = ["The capital of France is", "def add(a, b):"]
    outputs = {}
    for device in ("cpu", "cuda"):
        engine = LLMEngine(
            EngineConfig(model=str(tiny_llama_path), device=device, kv_cache_memory_mb=64)
        )
        outputs[device] = engine.generate(prompts, greedy)
        [sampled] = engine.generate(prompts[:1], seeded)  # runs: the generator stays on the CPU
        assert len(sampled.token_ids) == 12
    assert [o.token_ids for o in outputs["cuda"]] == [o.token_ids for o in outputs["cpu"]]
