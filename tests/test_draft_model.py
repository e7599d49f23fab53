"""Speculative decoding with a draft model (engine/draft_model.py): what the proposer feeds its
draft (a recording runner: the uncached tokens once, then one draft at a time; after the
target's verdict only what is new), its own block pool and prefix cache; then the engine's
tokens against the same engine without drafts, for a draft of the target's weights (every
greedy draft kept) and a draft of its first layer (most refused); the target there is the
Serve tests' tiny random model (tests/conftest.py: serve_model_path)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from engine.config import EngineConfig
from engine.draft_model import DraftModelProposer, DraftSteps, run_drafts
from engine.engine import LLMEngine
from engine.model_runner import ModelRunner, ModelShape
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.spec_decode import SpeculativeConfig
from tests.conftest import drain
from tests.test_spec_decode import PROMPTS, _params

VOCAB = 1000
DRAFT = SpeculativeConfig(3, model="draft")


class CountingRunner:
    """A draft whose next token is the input token plus one; records every step's seqs."""

    def __init__(self, num_blocks: int = 64, window: int = 4096) -> None:
        self.block_size, self.num_kv_blocks = 16, num_blocks
        self.shape = ModelShape(1, 1, 1, 1, VOCAB, window)
        self.steps: list[list[tuple[list[int], int]]] = []  # (tokens, start) per seq

    def execute(self, batch) -> torch.Tensor:
        self.steps.append([(list(s.token_ids), s.start) for s in batch.seqs])
        sampling = [seq for seq in batch.seqs if seq.sample]
        logits = torch.zeros(len(sampling), VOCAB)
        for row, seq in enumerate(sampling):
            logits[row, (seq.token_ids[-1] + 1) % VOCAB] = 1.0
        return logits


def _request(rid: str, prompt: list[int], output: list[int], salt: str | None = None) -> Request:
    return Request(rid, prompt, SamplingParams(cache_salt=salt), output_token_ids=list(output))


@pytest.mark.unit
def test_the_draft_is_fed_what_its_cache_lacks_and_then_each_draft():
    runner = CountingRunner()
    proposer = DraftModelProposer(DRAFT, runner, VOCAB, 512)
    r = _request("a", list(range(1, 21)), [21])  # 21 tokens: positions 0-20
    assert proposer.propose_all([(r, 5)]) == [[22, 23, 24]]  # num_speculative_tokens: 3
    assert runner.steps == [[(list(range(1, 22)), 0)], [([22], 21)], [([23], 22)]]
    # the target kept two drafts, then drew 99: the cache holds both (22 and 23 were inputs)
    r.output_token_ids += [22, 23, 99]
    runner.steps.clear()
    assert proposer.propose_all([(r, 2)]) == [[100, 101]]
    assert runner.steps == [[([99], 23)], [([100], 24)]]
    # every draft kept and one drawn after: the last draft was no input, it is fed with it
    r.output_token_ids += [100, 101, 7]
    runner.steps.clear()
    assert proposer.propose_all([(r, 3)]) == [[8, 9, 10]]
    assert runner.steps[0] == [([101, 7], 25)]
    # none kept: the first draft's position holds another token, fed from there
    r.output_token_ids += [50]
    runner.steps.clear()
    assert proposer.propose_all([(r, 1)]) == [[51]]
    assert runner.steps == [[([50], 27)]]
    # no room for a draft: no forward, nothing forgotten
    runner.steps.clear()
    assert proposer.propose_all([(r, 0)]) == [[]] and runner.steps == []
    assert proposer.blocks.owns("a")


@pytest.mark.unit
def test_requests_draft_in_one_forward_per_draft():
    runner = CountingRunner()
    proposer = DraftModelProposer(DRAFT, runner, VOCAB, 512)
    a, b, c = _request("a", [1, 2], [3]), _request("b", [40], [41]), _request("c", [7], [8])
    assert proposer.propose_all([(a, 3), (b, 1), (c, 2)]) == [[4, 5, 6], [42], [9, 10]]
    assert [len(step) for step in runner.steps] == [3, 2, 1]
    assert runner.steps[0] == [([1, 2, 3], 0), ([40, 41], 0), ([7, 8], 0)]


class RemoteRunner(CountingRunner):
    """A draft run elsewhere (a parallel replica's first worker, engine/workers.py): the
    proposer sends it each step's DraftSteps; it runs them as a local draft would."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[DraftSteps] = []

    def draft(self, steps: DraftSteps) -> list[list[int]]:
        self.calls.append(steps)
        return run_drafts(self, steps)


@pytest.mark.unit
def test_a_draft_run_elsewhere_gets_one_call_a_step_and_drafts_the_same():
    """A catch-up row (limit 0) beside a drafting one: one call with both rows' first inputs,
    and the same forwards and drafts as the draft in this process."""
    local, remote = CountingRunner(), RemoteRunner()
    budget = 21 + 4  # the first request's 21 tokens and 4 of the second's 30
    for runner in (local, remote):
        proposer = DraftModelProposer(DRAFT, runner, VOCAB, budget)
        a, b = _request("a", list(range(1, 21)), [21]), _request("b", list(range(100, 130)), [1])
        assert proposer.propose_all([(a, 3), (b, 3)]) == [[22, 23, 24], []]
    assert remote.steps == local.steps
    [call] = remote.calls
    assert [(s.token_ids, s.start, s.sample) for s in call.first] == [
        (list(range(1, 22)), 0, True),
        ([100, 101, 102, 103], 0, False),
    ]
    assert call.limits == [3, 0] and call.vocab_size == VOCAB


@pytest.mark.unit
def test_a_long_catch_up_takes_several_steps_within_the_token_budget():
    runner = CountingRunner()
    proposer = DraftModelProposer(DRAFT, runner, VOCAB, 16)
    old, new = _request("a", [1, 2], [3]), _request("b", list(range(100, 130)), [7])
    assert proposer.propose_all([(old, 3), (new, 3)]) == [[4, 5, 6], []]
    # a's 3 tokens, then 13 of b's 31 without a logits row; a's next drafts alone
    assert runner.steps[0] == [([1, 2, 3], 0), (list(range(100, 113)), 0)]
    assert runner.steps[1:] == [[([4], 3)], [([5], 4)]]
    runner.steps.clear()
    old.output_token_ids += [4, 5, 6, 8]  # every draft kept: two tokens to feed
    assert proposer.propose_all([(old, 3), (new, 3)]) == [[9, 10, 11], []]
    assert runner.steps[0] == [([6, 8], 5), (list(range(113, 127)), 13)]
    runner.steps.clear()
    assert proposer.propose_all([(new, 3)]) == [[8, 9, 10]]  # the rest, and its drafts
    assert runner.steps[0] == [([127, 128, 129, 7], 27)]
    # only catching up: a forward without a logits row
    runner.steps.clear()
    late = _request("c", list(range(200, 240)), [1])
    assert proposer.propose_all([(late, 3)]) == [[]]
    assert runner.steps == [[(list(range(200, 216)), 0)]]


@pytest.mark.unit
def test_the_drafts_prefix_cache_serves_later_requests_of_the_same_salt():
    runner = CountingRunner()
    proposer = DraftModelProposer(DRAFT, runner, VOCAB, 512)
    prompt = list(range(100, 140))  # 40 tokens: two full blocks
    first = _request("a", prompt, [1])
    proposer.propose_all([(first, 3)])
    first.output_token_ids += [2]
    proposer.propose_all([(first, 3)])  # publishes what its cache held from the first step
    runner.steps.clear()
    same, salted = _request("b", prompt, [5]), _request("c", prompt, [5], salt="tenant")
    proposer.propose_all([(first, 3), (same, 3), (salted, 3)])
    starts = [start for _, start in runner.steps[0]]
    assert starts[1:] == [32, 0]  # b's two full blocks come from a's; c's salt shares none
    assert runner.steps[0][1][0] == [*prompt[32:], 5]
    proposer.blocks.check_integrity()


@pytest.mark.unit
def test_a_full_pool_drafts_nothing_and_a_request_that_left_gives_its_blocks_back():
    runner = CountingRunner(num_blocks=4)
    proposer = DraftModelProposer(DRAFT, runner, VOCAB, 512)
    a, b = _request("a", list(range(40)), [1]), _request("b", list(range(20)), [2])
    assert proposer.propose_all([(a, 3), (b, 3)]) == [[2, 3, 4], []]  # b needs 2 of 1 free
    assert not proposer.blocks.owns("b")
    assert proposer.propose_all([(b, 3)]) == [[3, 4, 5]]  # a left the batch: forgotten
    assert not proposer.blocks.owns("a") and proposer.blocks.num_free_blocks == 2
    proposer.forget("b")
    assert proposer.blocks.num_free_blocks == 4
    proposer.blocks.check_integrity()


@pytest.mark.unit
def test_drafts_stop_at_the_drafts_window():
    runner = CountingRunner(window=24)
    proposer = DraftModelProposer(DRAFT, runner, VOCAB, 512)
    r = _request("a", list(range(21)), [21])  # 22 tokens; the inputs of 3 drafts fit in 24
    assert proposer.propose_all([(r, 5)]) == [[22, 23, 24]]
    r.output_token_ids += [22, 23]
    assert proposer.propose_all([(r, 5)]) == [[24]]
    r.output_token_ids += [24]
    assert proposer.propose_all([(r, 5)]) == [[]]


@pytest.mark.unit
def test_vllms_speculative_config_with_a_model():
    from pydantic import ValidationError

    from app.config import AppArgs

    assert SpeculativeConfig(3, model="m").method == "draft_model"
    assert SpeculativeConfig(3).method == "ngram"
    assert SpeculativeConfig(3, model="m").prompt_lookup_min is None
    for bad in ({"method": "draft_model"}, {"method": "ngram", "model": "m"}):
        with pytest.raises(ValueError, match="draft_model needs one, ngram takes none"):
            SpeculativeConfig(3, **bad)
    draft = {"model": "/some/draft", "num_speculative_tokens": 4}
    args = AppArgs(decode={"engine": {"speculative_config": draft}})
    assert args.engine_config("decode").speculative == SpeculativeConfig(4, model="/some/draft")
    assert [s.model for s in args.draft_models()] == ["/some/draft"]
    colocated = AppArgs(mode="colocated", decode={"engine": {"speculative_config": draft}})
    assert colocated.draft_models() == []  # no decode deployment in that mode
    # a prefill replica decodes no token past the first: no draft loaded or checked there
    both = {"engine": {"speculative_config": {**draft, "model": "/prefill/draft"}}}
    same = AppArgs(prefill=both, decode={"engine": {"speculative_config": draft}})
    assert same.engine_config("prefill").speculative is None
    assert [s.model for s in same.draft_models()] == ["/some/draft"]
    gpu = {"device": "cuda", "kv_transport": "cuda_ipc"}
    # tensor- and pipeline-parallel replicas too: the draft on their first worker
    engine = {"speculative_config": draft, "tensor_parallel_size": 2}
    parallel = AppArgs(**gpu, decode={"engine": engine}).engine_config("decode")
    assert parallel.speculative.model == "/some/draft" and parallel.parallel.tp == 2
    one = {**draft, "draft_tensor_parallel_size": 1}  # vLLM's name for where it runs
    kept = AppArgs(**gpu, decode={"engine": {**engine, "speculative_config": one}})
    assert kept.engine_config("decode") == parallel
    split = {**draft, "draft_tensor_parallel_size": 2}
    with pytest.raises(ValidationError, match="draft_tensor_parallel_size\n  Input should be 1"):
        AppArgs(**gpu, decode={"engine": {**engine, "speculative_config": split}})
    with pytest.raises(ValidationError, match="num_speculative_tokens"):
        AppArgs(decode={"engine": {"speculative_config": {"model": "/some/draft"}}})
    shared = AppArgs(
        **gpu, decode={"engine": {"speculative_config": draft, "gpu_memory_utilization": 0.9}}
    )  # the draft's cache from the same share
    assert shared.engine_config("decode").memory_share.share == 0.9


@pytest.mark.unit
def test_serve_run_fails_at_build_for_a_draft_model_it_cannot_find(tmp_path):
    from app.builder import build_app

    missing = str(tmp_path / "no-draft")
    draft = {"model": missing, "num_speculative_tokens": 2}
    with pytest.raises(FileNotFoundError, match="no-draft"):
        build_app({"decode": {"engine": {"speculative_config": draft}}})


# ---- the engine ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def first_layer(serve_model_path):
    """The first of the tiny target's two layers and its head: a draft that agrees with it on
    a few tokens in ten."""
    from tests.conftest import paged

    return paged(serve_model_path, num_hidden_layers=1)


def _with_draft(tokenizer, target, draft, blocks: int = 256, draft_blocks=None, **scheduler):
    from engine.scheduler import SchedulerConfig

    config = EngineConfig(speculative=DRAFT, scheduler=SchedulerConfig(**scheduler))
    return LLMEngine(
        config,
        runner=ModelRunner(target, blocks, 16),
        tokenizer=tokenizer,
        draft_runner=ModelRunner(draft, draft_blocks or blocks, 16),
    )


@pytest.mark.model
def test_a_draft_of_the_targets_weights_has_every_greedy_draft_kept(
    make_tiny_engine, tiny_paged_model, tokenizer
):
    params = SamplingParams(max_tokens=33, temperature=0, ignore_eos=True)
    want = make_tiny_engine().generate(PROMPTS[:3], params)
    spec = _with_draft(tokenizer, tiny_paged_model, tiny_paged_model)
    got = spec.generate(PROMPTS[:3], params)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    # 32 tokens after the first, 4 a step: 8 steps of 3 drafts, each kept
    assert spec.num_draft_tokens == spec.num_accepted_tokens == 3 * 8 * 3
    assert spec.num_drafts == 3 * 8 and spec.num_accepted_per_pos == [3 * 8] * 3
    assert spec.proposer.blocks.num_free_blocks == spec.proposer.blocks.num_blocks


@pytest.mark.model
def test_a_draft_that_is_mostly_wrong_changes_no_token(make_tiny_engine, first_layer, tokenizer):
    """Penalties, logprobs, a stop string, min_tokens and a structured output beside plain
    requests, with prefix caching: the tokens, text and logprobs of the engine without
    drafts (whatever the draft proposes, the target decides)."""
    from tests.test_spec_decode import _assert_same

    prompts, params = PROMPTS + PROMPTS[1:2], _params()
    plain = make_tiny_engine(enable_prefix_caching=True)
    spec = _with_draft(tokenizer, plain.runner.model, first_layer, enable_prefix_caching=True)
    _assert_same(plain.generate(prompts, params), spec.generate(prompts, params))
    assert 0 < spec.num_accepted_tokens < spec.num_draft_tokens / 2
    for blocks in (spec.blocks, spec.proposer.blocks):
        blocks.check_integrity()
        assert blocks.num_free_blocks == blocks.num_blocks


@pytest.mark.model
def test_a_draft_under_block_pressure_and_after_a_handoff(
    make_tiny_engine, tiny_paged_model, tokenizer
):
    """Target and draft caches too small for every request (preemptions, drafts dropped) give
    the same tokens; a request prefilled elsewhere is caught up by the draft over its first
    decode steps and decodes with every draft kept."""
    params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
    want = make_tiny_engine().generate(PROMPTS, params)
    tight = _with_draft(tokenizer, tiny_paged_model, tiny_paged_model, blocks=20, draft_blocks=12)
    got = tight.generate(PROMPTS, params)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert tight.num_accepted_tokens > 0
    assert tight.proposer.blocks.num_free_blocks == 12
    # a token budget of 8: the draft catches the prompt up 8 tokens a step, then drafts
    budget = {"max_num_batched_tokens": 8}
    prefill, decode = (
        make_tiny_engine(),
        _with_draft(tokenizer, tiny_paged_model, tiny_paged_model, **budget),
    )
    prefill.add_request("h", PROMPTS[1], params, prefill_only=True)
    drain(prefill)
    assert decode.import_request(*prefill.export_kv("h"))
    prefill.release("h")
    tokens = [t for outs in drain(decode).values() for out in outs for t in out.new_token_ids]
    assert tokens == want[1].token_ids[1:]
    assert decode.num_draft_tokens == decode.num_accepted_tokens > 30


@pytest.mark.model
def test_an_aborted_request_gives_the_drafts_blocks_back_and_stats_show_the_pool(
    tiny_paged_model, tokenizer
):
    """The engine's stats carry the draft's own pool (the replicas' idle checks read it): in
    use while requests draft, all free again once they are aborted mid-decode."""
    spec = _with_draft(tokenizer, tiny_paged_model, tiny_paged_model, blocks=64)
    params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS[:2]):
        spec.add_request(f"r{i}", prompt, params)
    while spec.num_draft_tokens < 12:  # both decoding, each step's drafts verified
        spec.step()
    stats = spec.stats
    assert stats.num_draft_kv_blocks == 64 and stats.num_draft_free_blocks < 64
    assert stats.num_free_blocks < stats.num_kv_blocks
    assert spec.abort("r0") and spec.abort("r1")
    stats = spec.stats
    assert stats.num_draft_free_blocks == 64 and stats.num_free_blocks == stats.num_kv_blocks
    spec.proposer.blocks.check_integrity()
    plain = LLMEngine(EngineConfig(), runner=ModelRunner(tiny_paged_model, 16, 16),
                      tokenizer=tokenizer)  # fmt: skip
    assert (plain.stats.num_draft_kv_blocks, plain.stats.num_draft_free_blocks) == (0, 0)


@pytest.mark.model
def test_a_draft_of_another_vocabulary_is_refused(paged_model, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=1000,
    )  # fmt: skip
    other = ModelRunner(LlamaForCausalLM(config).eval(), 16, 16)
    with pytest.raises(ValueError, match="its vocabulary has 1000 tokens, the target's 49152"):
        LLMEngine(
            EngineConfig(speculative=DRAFT),
            runner=ModelRunner(paged_model, 16, 16),
            tokenizer=tokenizer,
            draft_runner=other,
        )


@pytest.mark.model
def test_the_engine_cli_loads_a_draft_model_and_speculates_to_the_same_text(
    capsys, default_model_path
):
    from engine.__main__ import main

    cmd = ["generate", "--prompt", PROMPTS[3], "--max-tokens", "12", "--threads", "2"]
    assert main(cmd) == 0
    plain = capsys.readouterr().out
    config = json.dumps({"model": str(default_model_path), "num_speculative_tokens": 3})
    assert main([*cmd, "--speculative-config", config]) == 0
    out, err = capsys.readouterr()
    assert out == plain and len(out) > 10
    kept, drafts = map(int, re.search(r"(\d+) of (\d+) draft tokens kept", err).groups())
    assert kept == drafts > 0  # the target's own weights: every greedy draft kept
