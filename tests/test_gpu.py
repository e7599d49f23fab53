"""GPU serving: the Serve resources a GPU config asks for (runs anywhere), and the engine, the
CUDA IPC KV transport (one GPU) and the NCCL KV transport (two GPUs) on real GPUs (skipped
without CUDA and CuPy; `make gpu-check` runs them on a GPU machine)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from app.builder import deployment_options
from app.config import AppArgs
from kvkernels import cuda_ipc_transport, p2p_transport
from tests.ray_session import end_ray_session

needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and cuda_ipc_transport.available()),
    reason="needs a CUDA device and CuPy (pip install -e '.[gpu]')",
)


# NCCL refuses two ranks on one GPU
needs_two_gpus = pytest.mark.skipif(
    not (torch.cuda.device_count() >= 2 and p2p_transport.nccl_available()),
    reason="needs two CUDA devices and CuPy with NCCL",
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
    with pytest.raises(ValidationError, match="nccl moves GPU caches"):
        AppArgs(kv_transport="nccl")
    with pytest.raises(ValidationError, match="gloo moves CPU caches"):
        AppArgs(kv_transport="gloo", device="cuda")
    with pytest.raises(ValidationError, match=r"device must be cpu or cuda \(cuda:N\)"):
        AppArgs(device="tpu")


@pytest.mark.unit
def test_the_gpu_serve_config_shares_one_gpu_between_the_phases():
    """serve_config_gpu.yaml (run on an H200, README) is valid for the app and asks Serve for
    half a GPU per phase replica, the KV moving over CUDA IPC."""
    from pathlib import Path

    import yaml

    [app] = yaml.safe_load((Path(__file__).parents[1] / "serve_config_gpu.yaml").read_text())[
        "applications"
    ]
    args = AppArgs.model_validate(app["args"])
    assert (args.device, args.kv_transport, args.mode) == ("cuda", "cuda_ipc", "disaggregated")
    for phase in ("prefill", "decode"):
        assert _options(args, phase)["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.5}
    assert args.engine_config("decode").device == "cuda"
    # the decode replica's steps replay CUDA graphs; the prefill replica has none to capture
    assert args.engine_config("decode").graph_batch == 256
    assert args.engine_config("prefill").graph_batch == 0


@pytest.mark.unit
def test_cuda_ipc_without_cupy_or_a_gpu_is_a_clear_error():
    from kvkernels.kv_channel import KVChannel

    if cuda_ipc_transport.available():
        pytest.skip("this machine has CuPy and a GPU")
    with pytest.raises(ValueError, match="CuPy and a CUDA device"):
        KVChannel("cuda_ipc")
    if not p2p_transport.nccl_available():
        with pytest.raises(ValueError, match="CuPy with NCCL and a CUDA device"):
            KVChannel("nccl")


@pytest.fixture(scope="module")
def gpu_cluster(tmp_path_factory, own_ray_cluster):
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        num_gpus=max(1, torch.cuda.device_count()),
        include_dashboard=False,
        _temp_dir=str(tmp_path_factory.mktemp("ray")),
    )
    yield
    end_ray_session()


SHAPE = (3, 2, 10, 4, 2, 8)  # (L, 2, blocks, bs, Hkv, D)


def _sender_class(transport: str = "cuda_ipc", num_gpus: float = 0.5):
    import ray

    from kvkernels.kv_channel import KVChannel

    @ray.remote(num_cpus=0, num_gpus=num_gpus)
    class Sender:
        def __init__(self, dtype: str) -> None:
            g = torch.Generator().manual_seed(0)
            cache = torch.randn(*SHAPE, generator=g).to(getattr(torch, dtype))
            self.cache = cache.cuda()
            self.channel = KVChannel(transport)

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

    from kvkernels.kv_blocks import unpack_blocks
    from kvkernels.kv_channel import KVChannel, TransferExpired

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


def _receiver_class():
    import ray

    from kvkernels.kv_blocks import unpack_blocks
    from kvkernels.kv_channel import KVChannel

    @ray.remote(num_cpus=0, num_gpus=1)
    class Receiver:
        def __init__(self) -> None:
            self.channel = KVChannel("nccl")

        def receive(self, transfer, dst: list[int], dtype: str) -> torch.Tensor:
            cache = torch.zeros(3, 2, 6, 4, 2, 8, dtype=getattr(torch, dtype), device="cuda")
            unpack_blocks(cache, dst, self.channel.open(transfer))
            self.channel.finish(transfer)
            assert not cache[:, :, [2, 3, 5]].any()
            return cache[:, :, dst].cpu()

        def discard(self, transfer) -> None:
            self.channel.discard(transfer)

    return Receiver


@pytest.mark.gpu
@needs_two_gpus
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_nccl_moves_blocks_bit_exactly_between_two_gpus(gpu_cluster, dtype):
    import ray

    sender = _sender_class("nccl", num_gpus=1).remote(dtype)
    receiver = _receiver_class().remote()
    src, dst = [7, 2, 5], [4, 0, 1]
    for _ in range(3):  # the pair's communicator is set up once, then reused
        transfer = ray.get(sender.send.remote(src))
        assert transfer.transport == "nccl"
        got = ray.get(receiver.receive.remote(transfer, dst, dtype))
        assert torch.equal(got, ray.get(sender.blocks.remote(src)))
    dropped = ray.get(sender.send.remote(src))
    ray.get(receiver.discard.remote(dropped))
    with pytest.raises(ray.exceptions.RayTaskError, match="reclaimed or dropped"):
        ray.get(receiver.receive.remote(dropped, dst, dtype))


@pytest.mark.gpu
@needs_cuda
def test_engine_on_cuda_generates_the_cpu_engines_greedy_tokens(tiny_llama_path):
    from engine import EngineConfig, LLMEngine, SamplingParams

    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    seeded = SamplingParams(max_tokens=12, temperature=0.8, seed=7, ignore_eos=True)
    penalized = SamplingParams(
        max_tokens=12, temperature=0.0, ignore_eos=True, frequency_penalty=1.0,
        repetition_penalty=1.2, logit_bias=((5, 2.0),), logprobs=3, prompt_logprobs=2,
    )  # fmt: skip
    prompts = ["The capital of France is", "def add(a, b):"]
    outputs = {}
    for device in ("cpu", "cuda"):
        engine = LLMEngine(
            EngineConfig(model=str(tiny_llama_path), device=device, kv_cache_memory_mb=64)
        )
        outputs[device] = engine.generate(prompts, greedy) + engine.generate(prompts, penalized)
        [sampled] = engine.generate(prompts[:1], seeded)  # runs: the generator stays on the CPU
        assert len(sampled.token_ids) == 12
    assert [o.token_ids for o in outputs["cuda"]] == [o.token_ids for o in outputs["cpu"]]
    # logprobs computed on the GPU agree with the CPU's (the penalized requests asked for 3)
    for gpu, cpu in zip(outputs["cuda"][2:], outputs["cpu"][2:], strict=True):
        assert [e.token_id for e in gpu.logprobs] == cpu.token_ids
        for g, c in zip(gpu.logprobs, cpu.logprobs, strict=True):
            assert g.logprob == pytest.approx(c.logprob, abs=1e-3)
            assert [i for i, _ in g.top] == [i for i, _ in c.top]
        # and so do the prompt's (a logits row per prompt token)
        assert gpu.prompt_logprobs[0] is None and len(gpu.prompt_logprobs) > 2
        for g, c in zip(gpu.prompt_logprobs[1:], cpu.prompt_logprobs[1:], strict=True):
            assert g.token_id == c.token_id and g.logprob == pytest.approx(c.logprob, abs=1e-3)


@pytest.mark.gpu
@needs_cuda
def test_gpu_memory_utilization_keeps_to_its_share_and_serves_the_cpu_tokens():
    """vLLM's gpu_memory_utilization: the default model's engine at 0.2 of the GPU holds at
    most that much (torch's reservations, CUDA graphs' included), most of it KV cache, and
    gives the CPU engine's greedy tokens."""
    import gc

    from engine import EngineConfig, LLMEngine, SamplingParams

    gc.collect()
    torch.cuda.empty_cache()
    total = torch.cuda.mem_get_info()[1]
    engine = LLMEngine(EngineConfig(device="cuda", gpu_memory_utilization=0.2))
    runner = engine.runner
    kv_bytes = runner.kv_cache.numel() * runner.kv_cache.element_size()
    assert kv_bytes > 0.1 * total  # a 135M model's weights and steps take little of 0.2
    assert torch.cuda.memory_reserved() <= 0.2 * total
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = ["The capital of France is", "def add(a, b):"]
    tokens = [o.token_ids for o in engine.generate(prompts, greedy)]
    del engine, runner
    cpu = LLMEngine(EngineConfig(kv_cache_memory_mb=64))
    assert tokens == [o.token_ids for o in cpu.generate(prompts, greedy)]


@pytest.mark.gpu
@needs_cuda
def test_lora_adapters_on_cuda_give_the_cpu_engines_tokens(lora_adapters):
    """The default model with two LoRA adapters, a batch mixing them with the base model and
    a decode batch that gathers each adapter's rows by index: the CPU engine's tokens."""
    from engine import EngineConfig, LLMEngine, SamplingParams

    prompts = [f"Item {i}: the best" for i in range(15)]
    turns = ["sql", "poet", None] * 5
    params = [
        SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, lora=lora) for lora in turns
    ]
    outputs = {}
    for device in ("cpu", "cuda"):
        config = EngineConfig(
            device=device, kv_cache_memory_mb=64, lora_modules=tuple(lora_adapters.items())
        )
        outputs[device] = [o.token_ids for o in LLMEngine(config).generate(prompts, params)]
    assert outputs["cuda"] == outputs["cpu"]


@pytest.mark.gpu
@needs_cuda
def test_cuda_graphs_give_the_eager_engines_tokens():
    """The default model on CUDA, fp32: decode steps replayed from captured graphs give the
    greedy tokens of the engine that runs them eagerly (`enforce_eager`), over batches that
    shrink as requests finish and block tables that grow. Every graph is captured at load."""
    from engine import EngineConfig, LLMEngine, SamplingParams, SchedulerConfig

    prompts = [f"Item {i}: " + "the quick brown fox " * (5 * i) for i in range(12)]
    params = [
        SamplingParams(max_tokens=20 + 4 * i, temperature=0.0, ignore_eos=True) for i in range(12)
    ]
    outputs = {}
    for eager in (True, False):
        config = EngineConfig(
            device="cuda",
            kv_cache_memory_mb=256,
            max_model_len=2048,
            enforce_eager=eager,
            scheduler=SchedulerConfig(max_num_seqs=16),
        )
        engine = LLMEngine(config)
        if not eager:  # batch sizes 1-16 by table widths 1-128 (2048 tokens)
            assert len(engine.runner.graphs._graphs) == 5 * 8
        outputs[eager] = [o.token_ids for o in engine.generate(prompts, params)]
        assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    graphs = engine.runner.graphs
    assert graphs.num_steps > 40 and not graphs.failed
    assert len(graphs._graphs) == 5 * 8  # none captured while serving
    assert all(g.graph is not None for g in graphs._graphs.values())
    assert outputs[False] == outputs[True]


@pytest.mark.gpu
@needs_cuda
def test_a_draft_model_on_cuda_keeps_the_targets_tokens():
    """The default model drafting for itself on CUDA (its draft steps replaying their own
    CUDA graphs), both caches sized from one gpu_memory_utilization of 0.2: the process holds
    at most that share, and the CPU engine's greedy tokens come out."""
    import gc

    from engine import EngineConfig, LLMEngine, SamplingParams
    from engine.spec_decode import SpeculativeConfig

    prompts = [f"Item {i}: the best" for i in range(6)]
    greedy = SamplingParams(max_tokens=25, temperature=0.0, ignore_eos=True)
    want = [o.token_ids for o in LLMEngine(EngineConfig()).generate(prompts, greedy)]
    gc.collect()
    torch.cuda.empty_cache()
    total = torch.cuda.mem_get_info()[1]
    spec = SpeculativeConfig(4, model="default")
    config = EngineConfig(device="cuda", gpu_memory_utilization=0.2, speculative=spec)
    engine = LLMEngine(config)
    assert engine.proposer.runner.graphs is not None
    assert engine.proposer.runner.num_kv_blocks == engine.runner.num_kv_blocks
    assert torch.cuda.memory_reserved() <= 0.2 * total
    assert [o.token_ids for o in engine.generate(prompts, greedy)] == want
    # nearly every draft kept: the draft's steps and the verify differ in batch shape alone
    assert engine.num_accepted_tokens >= 0.9 * engine.num_draft_tokens > 0


@pytest.mark.gpu
@needs_two_gpus
def test_a_draft_model_on_a_tp2_replica_of_two_gpus_keeps_the_targets_tokens(
    gpu_cluster, tiny_llama_path
):
    """A tensor-parallel replica over two GPUs (NCCL between its workers), its draft (the
    target's own weights) whole on the first worker's GPU replaying its own CUDA graphs: the
    CPU engine's greedy tokens, nearly every draft kept."""
    from engine import EngineConfig, LLMEngine, SamplingParams
    from engine.spec_decode import SpeculativeConfig

    prompts = ["The capital of France is", "def add(a, b):", "Once upon a time"]
    greedy = SamplingParams(max_tokens=25, temperature=0.0, ignore_eos=True)
    model = str(tiny_llama_path)
    want = [o.token_ids for o in LLMEngine(EngineConfig(model=model)).generate(prompts, greedy)]
    spec = SpeculativeConfig(3, model=model)
    config = EngineConfig(
        model=model, device="cuda", tensor_parallel_size=2, worker_num_cpus=0.5,
        kv_cache_memory_mb=64, speculative=spec,
    )  # fmt: skip
    engine = LLMEngine(config)
    try:
        assert [o.token_ids for o in engine.generate(prompts, greedy)] == want
        assert engine.num_accepted_tokens >= 0.9 * engine.num_draft_tokens > 0
    finally:
        engine.runner.shutdown()


@pytest.mark.gpu
@needs_cuda
def test_draws_on_cuda_follow_the_probabilities_and_a_seed_repeats_its_stream():
    """A batch's draws run on the GPU, all rows at once: 5,000 draws over a 49k vocabulary fall
    on its five likely tokens as their probabilities say; a seeded request draws the same
    tokens again from the same seed, in whatever batch, and after a hand-off of its
    generator's state; a row with an infinite logit fails alone."""
    from engine.sampler import sample
    from engine.sampling_params import SamplingParams

    logits = torch.full((1, 49152), float("-inf"), device="cuda")
    ids, p = [3, 17, 20_000, 49_000, 49_151], torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    logits[0, ids] = p.log().cuda()
    wide = logits.expand(50, -1).contiguous()
    free = SamplingParams(temperature=1.0)
    draws = [t for _ in range(100) for t in sample(wide, [free] * 50, [None] * 50)]
    assert set(draws) <= set(ids)
    seen = torch.tensor([draws.count(t) / 5000 for t in ids])
    assert ((seen - p).abs() <= 4.5 * (p * (1 - p) / 5000).sqrt()).all(), seen

    noisy = torch.randn(3, 49152, device="cuda")
    noisy[1, 5] = float("inf")
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=3)
    alone_gen = torch.Generator().manual_seed(3)
    alone = [sample(noisy[:1], [seeded], [alone_gen])[0] for _ in range(6)]
    gens = [torch.Generator().manual_seed(3), None, None]
    batched = []
    for step in range(6):
        if step == 3:  # handed off
            state, gens[0] = gens[0].get_state(), torch.Generator()
            gens[0].set_state(state)
        tokens = sample(noisy, [seeded, free, free], gens)
        assert tokens[1] is None and tokens[2] is not None
        batched.append(tokens[0])
    assert batched == alone and len(set(alone)) > 1
