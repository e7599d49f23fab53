"""CUDA graphs of decode steps (engine/cuda_graphs.py). Capture needs a GPU (tests/test_gpu.py);
here the graphs' padded static step runs eagerly (capture_graphs=False) and must compute what
the eager runner computes: the same logits, the same KV in every block the block manager owns,
the padding rows' KV only in the scratch block past them."""

from __future__ import annotations

import pytest
import torch

from engine import EngineConfig, LLMEngine, SamplingParams, SchedulerConfig
from engine.cuda_graphs import bucket, table_widths
from engine.model_runner import ModelInput, ModelRunner, SeqInput


@pytest.mark.unit
def test_buckets_and_when_a_config_uses_graphs():
    sizes = (1, 2, 4, 8)
    assert [bucket(sizes, n) for n in (1, 3, 4, 5, 8, 9)] == [1, 4, 4, 8, 8, None]
    assert table_widths(1) == (1,) and table_widths(5) == (1, 2, 4, 8)
    assert table_widths(512) == tuple(2**i for i in range(10))
    gpu = EngineConfig(device="cuda", scheduler=SchedulerConfig(max_num_seqs=48))
    assert gpu.graph_batch == 48
    assert EngineConfig(device="cuda", enforce_eager=True).graph_batch == 0
    assert EngineConfig(device="cuda", tensor_parallel_size=2).graph_batch == 0
    assert EngineConfig().graph_batch == 0  # CPUs run eagerly
    # a draft model is whole on one device, a parallel replica's first worker's: graphs there
    assert EngineConfig(device="cuda", tensor_parallel_size=2).draft_graph_batch == 64
    assert (
        EngineConfig(device="cuda", pipeline_parallel_size=2, enforce_eager=True).draft_graph_batch
        == 0
    )
    assert gpu.draft_graph_batch == 48 and EngineConfig().draft_graph_batch == 0


@pytest.fixture
def runners(paged_model):
    """(graphs, eager): two runners on the same weights, the torch attention path in both."""
    graphs = ModelRunner(paged_model, 24, 4, use_kernel=False, graph_batch=6, capture_graphs=False)
    eager = ModelRunner(paged_model, 24, 4, use_kernel=False)
    return graphs, eager


def test_a_padded_graph_step_equals_the_eager_step(runners):
    graphs, eager = runners
    assert graphs.num_kv_blocks == eager.num_kv_blocks == 24
    assert graphs.kv_cache.shape[2] == 25  # the scratch block
    g = torch.Generator().manual_seed(0)
    lengths, tables = (3, 9, 14), ([0, 8], [1, 2, 3], [4, 5, 6, 7])
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in lengths]
    prefill = ModelInput([SeqInput(p, 0, t, True) for p, t in zip(prompts, tables, strict=True)])
    for runner in runners:
        runner.execute(prefill)  # a prefill step: eager in both
    assert graphs.graphs.num_steps == 0
    steps = [[7, 8, 9], [11, 12], [13]]  # batch 3, 2, 1 of the same sequences, each padded up
    for step, tokens in enumerate(steps):
        batch = ModelInput(
            [SeqInput([tok], lengths[i] + step, tables[i], True) for i, tok in enumerate(tokens)]
        )
        got, want = graphs.execute(batch), eager.execute(batch)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert graphs.graphs.num_steps == 3
    # batches of 3 and 2 padded to 4 and 2, 4 blocks wide; the first sequence alone, 2 wide
    assert sorted(graphs.graphs._graphs) == [(1, 2), (2, 4), (4, 4)]
    torch.testing.assert_close(graphs.kv_cache[:, :, :24], eager.kv_cache, atol=1e-4, rtol=1e-4)
    assert graphs.kv_cache[:, :, 24, 0].abs().sum() > 0  # the padding rows' KV went there
    assert not graphs.kv_cache[:, :, 24, 1:].any()


def test_an_engine_on_graph_steps_generates_the_eager_engines_tokens(paged_model, tokenizer):
    """Prompts of other lengths on 4-token blocks, their tables growing past a width, batches
    shrinking as requests finish: the eager engine's greedy tokens, and its blocks all back."""
    prompts = [f"Item {i}: " + "the quick brown fox " * (i * 3) for i in range(5)]
    params = [SamplingParams(max_tokens=8 + 3 * i, temperature=0.0) for i in range(5)]
    outs = {}
    for graph_batch in (0, 8):
        runner = ModelRunner(
            paged_model, 96, 4, use_kernel=False, graph_batch=graph_batch, capture_graphs=False
        )
        engine = LLMEngine(EngineConfig(block_size=4), runner=runner, tokenizer=tokenizer)
        outs[graph_batch] = [o.token_ids for o in engine.generate(prompts, params)]
        assert engine.blocks.num_free_blocks == engine.blocks.num_blocks == 96
    assert outs[8] == outs[0]
    assert runner.graphs.num_steps >= 15  # every decode step after the prompts'
    assert len({width for _, width in runner.graphs._graphs}) >= 2  # tables outgrew one


def _decode_step(runner, eager) -> None:
    """Prefill three sequences on both runners, then one decode step: the same logits."""
    tables = ([0, 1], [2, 3, 4], [5, 6, 7])
    prefill = ModelInput(
        [SeqInput(list(range(5 + 3 * i)), 0, t, True) for i, t in enumerate(tables)]
    )
    for r in (runner, eager):
        r.execute(prefill)
    step = ModelInput([SeqInput([42 + i], 5 + 3 * i, t, True) for i, t in enumerate(tables[:2])])
    torch.testing.assert_close(runner.execute(step), eager.execute(step), atol=1e-4, rtol=1e-4)


def test_every_bucket_is_set_up_at_load_largest_first(paged_model, monkeypatch):
    """capture_decode_graphs (ModelRunner.from_pretrained calls it) sets up every batch size and
    table width before the first request, the largest first: the workspace is allocated once,
    and a step then finds its graph ready rather than setting one up."""
    runner = ModelRunner(
        paged_model, 24, 4, use_kernel=False, max_model_len=64, graph_batch=6, capture_graphs=False
    )
    graphs = runner.graphs
    assert (graphs.sizes, graphs.widths) == ((1, 2, 4, 8), (1, 2, 4, 8, 16))
    drops = []
    drop = graphs._drop_graphs
    monkeypatch.setattr(graphs, "_drop_graphs", lambda: (drops.append(1), drop()))
    assert runner.capture_decode_graphs() == 20 == len(graphs._graphs)
    assert list(graphs._graphs)[0] == (8, 16) and len(drops) == 1  # grown once, from empty
    workspace = graphs._workspace
    _decode_step(runner, ModelRunner(paged_model, 24, 4, use_kernel=False))
    assert graphs.num_steps == 1 and len(graphs._graphs) == 20 and graphs._workspace is workspace


def test_a_capture_that_fails_at_load_leaves_the_steps_eager(paged_model, monkeypatch):
    runner = ModelRunner(
        paged_model, 24, 4, use_kernel=False, max_model_len=64, graph_batch=6, capture_graphs=False
    )
    graphs = runner.graphs
    graph = graphs._graph

    def fails_at_batch_2(size, width):
        if size == 2:
            raise RuntimeError("operation not permitted when stream is capturing")
        return graph(size, width)

    monkeypatch.setattr(graphs, "_graph", fails_at_batch_2)
    assert runner.capture_decode_graphs() == 0
    assert graphs.failed and not graphs._graphs
    _decode_step(runner, ModelRunner(paged_model, 24, 4, use_kernel=False))
    assert graphs.num_steps == 0  # the step ran eagerly
