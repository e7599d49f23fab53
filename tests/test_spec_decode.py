"""Speculative decoding (engine/spec_decode.py): the n-gram drafts against a plain search, the
scheduler's drafts and blocks, and the engine's output against the same engine without drafts
(greedy: the same tokens, on the default model's first two layers, a repetitive writer whose
drafts are often kept; sampled: the model's own distribution, on a model whose distributions
are known)."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import re

import numpy as np
import pytest
import torch

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.model_runner import ModelShape
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams, StructuredOutput
from engine.scheduler import Scheduler, SchedulerConfig
from engine.spec_decode import NgramProposer, SpeculativeConfig, ngram_drafts
from tests.conftest import drain

SPEC = SpeculativeConfig(4, prompt_lookup_min=1, prompt_lookup_max=3)


# ---- drafts -------------------------------------------------------------------------------------


def _plain_drafts(tokens: list[int], k: int, n_min: int, n_max: int) -> list[int]:
    """The rule spelled out: longest n first, its latest earlier occurrence."""
    for n in range(n_max, n_min - 1, -1):
        if n >= len(tokens):
            continue
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == suffix:
                return tokens[start + n : start + n + k]
    return []


@pytest.mark.unit
def test_drafts_follow_the_latest_occurrence_of_the_longest_suffix():
    t = np.array
    # "3 4" occurs twice before the end: the latest one (followed by 9) wins
    assert ngram_drafts(t([1, 3, 4, 5, 6, 3, 4, 9, 8, 3, 4]), 3, 1, 2) == [9, 8, 3]
    # the 3-gram "2 3 4" beats the later 2-gram "3 4"
    assert ngram_drafts(t([2, 3, 4, 7, 3, 4, 8, 2, 3, 4]), 2, 1, 3) == [7, 3]
    assert ngram_drafts(t([1, 2, 3, 1, 2]), 8, 1, 2) == [3, 1, 2]  # as many as there are
    assert ngram_drafts(t([1, 2, 3, 4]), 4, 1, 3) == []  # nothing repeats
    assert ngram_drafts(t([5, 5]), 3, 2, 2) == []  # the suffix itself does not count
    assert ngram_drafts(t([7]), 3, 1, 1) == []
    rng = random.Random(0)
    for _ in range(300):
        tokens = [rng.randrange(4) for _ in range(rng.randrange(1, 40))]
        k, low = rng.randrange(1, 6), rng.randrange(1, 4)
        high = low + rng.randrange(3)
        want = _plain_drafts(tokens, k, low, high)
        assert ngram_drafts(np.array(tokens), k, low, high) == want, (tokens, k, low, high)


@pytest.mark.unit
def test_the_proposer_keeps_up_with_a_growing_request_and_a_reused_id():
    proposer = NgramProposer(SpeculativeConfig(3, prompt_lookup_min=1, prompt_lookup_max=2))
    rng = random.Random(1)
    prompt = [rng.randrange(5) for _ in range(7)]
    output: list[int] = []
    for step in range(60):  # the buffer grows several times
        want = _plain_drafts(prompt + output, 3, 1, 2)[: max(0, 50 - step)]
        assert proposer.propose("a", prompt, output, 50 - step) == want
        output += [rng.randrange(5) for _ in range(rng.randrange(1, 4))]
    assert proposer.propose("a", [1, 2], [1], 3) == [2, 1]  # the same id, another request
    proposer.forget("a")
    assert proposer.propose("a", [1, 2, 1], [], 0) == []


@pytest.mark.unit
def test_speculative_config_takes_vllms_defaults_and_refuses_bad_bounds():
    assert (SpeculativeConfig(2).prompt_lookup_min, SpeculativeConfig(2).prompt_lookup_max) == (
        5,
        5,
    )
    only_max = SpeculativeConfig(2, prompt_lookup_max=3)
    assert (only_max.prompt_lookup_min, only_max.prompt_lookup_max) == (3, 3)
    only_min = SpeculativeConfig(2, prompt_lookup_min=2)
    assert (only_min.prompt_lookup_min, only_min.prompt_lookup_max) == (2, 2)
    for bad in (
        dict(num_speculative_tokens=0),
        dict(num_speculative_tokens=2, prompt_lookup_min=4, prompt_lookup_max=2),
        dict(num_speculative_tokens=2, method="eagle"),
        dict(num_speculative_tokens=2, disable_by_batch_size=1),
    ):
        with pytest.raises(ValueError):
            SpeculativeConfig(**bad)


# ---- the scheduler ------------------------------------------------------------------------------


def _decoding(scheduler: Scheduler, rid: str, prompt: int, max_tokens: int = 50) -> Request:
    """A request through its prefill, now decoding with one output token (7)."""
    request = Request(rid, list(range(1, prompt + 1)), SamplingParams(max_tokens=max_tokens), 0)
    scheduler.add(request)
    out = scheduler.schedule()
    scheduler.postprocess(out, {i.request.request_id: [7] for i in out.scheduled if i.samples})
    assert request.status is RequestStatus.RUNNING
    return request


@pytest.mark.unit
def test_drafts_are_scheduled_verified_and_their_refused_blocks_freed():
    blocks = BlockManager(16, 4, enable_caching=True)
    s = Scheduler(SchedulerConfig(), blocks)
    a = _decoding(s, "a", 6)  # 7 tokens: two blocks
    a.spec_token_ids = [20, 21, 22, 23, 24]
    out = s.schedule()
    (item,) = out.scheduled
    assert (item.start, item.num_tokens, item.draft, item.samples) == (
        6,
        6,
        (20, 21, 22, 23, 24),
        True,
    )
    assert len(blocks.block_table("a")) == 3  # room for 12 positions
    # two drafts kept, then 30 drawn: 10 tokens, the KV of 9 computed
    (result,) = s.postprocess(out, {"a": [20, 21, 30]})
    assert result == (a, [20, 21, 30])
    assert a.output_token_ids == [7, 20, 21, 30] and a.num_computed_tokens == 9
    assert len(blocks.block_table("a")) == 3  # 10 tokens fill three blocks
    a.spec_token_ids = [1, 2, 3, 4, 5]
    out = s.schedule()
    assert len(blocks.block_table("a")) == 4
    s.postprocess(out, {"a": [9]})  # the first draft refused
    assert a.num_computed_tokens == 10 and len(blocks.block_table("a")) == 3
    blocks.check_integrity()
    # published: the full blocks of the 8 tokens whose KV is computed, not the draft positions
    assert len(blocks._chains["a"]) == 2


@pytest.mark.unit
def test_every_running_request_decodes_before_any_draft():
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=4, max_num_seqs=3), BlockManager(16, 4))
    a, b, c = (_decoding(s, rid, 3) for rid in "abc")
    for r in (a, b, c):
        r.spec_token_ids = [9, 9, 9]
    out = s.schedule()
    # a budget of 4: one draft for the first, one token for each of the others
    assert [(i.request.request_id, i.num_tokens) for i in out.scheduled] == [
        ("a", 2), ("b", 1), ("c", 1)
    ]  # fmt: skip


@pytest.mark.unit
def test_drafts_never_take_the_blocks_the_others_need():
    s = Scheduler(SchedulerConfig(), BlockManager(4, 4))
    a, b = (_decoding(s, rid, 3) for rid in "ab")  # 4 tokens each: a block each
    a.spec_token_ids = [9]
    out = s.schedule()
    s.postprocess(out, {"a": [5], "b": [5]})  # a holds two blocks now, b one; one is free
    assert s.blocks.num_free_blocks == 1
    # a's next token fits in its blocks, its 4 drafts need the free block, b's next token too
    a.spec_token_ids = [9, 9, 9, 9]
    out = s.schedule()
    assert [i.num_tokens for i in out.scheduled] == [1, 1] and not out.preempted
    assert s.blocks.num_free_blocks == 0


@pytest.mark.unit
def test_a_stop_among_kept_drafts_ends_the_request_there():
    s = Scheduler(SchedulerConfig(), BlockManager(16, 4))
    a = _decoding(s, "a", 5, max_tokens=4)
    a.spec_token_ids = [11, 12]
    out = s.schedule()
    (result,) = s.postprocess(out, {"a": [11, 12, 13]})
    assert result == (a, [11, 12, 13]) and a.status is RequestStatus.FINISHED_LENGTH
    b = _decoding(s, "b", 5)
    b.eos_token_id = 12
    b.spec_token_ids = [11, 12, 13]
    out = s.schedule()
    (result,) = s.postprocess(out, {"b": [11, 12, 13, 14]})
    assert result == (b, [11, 12]) and b.status is RequestStatus.FINISHED_STOPPED
    assert s.blocks.num_free_blocks == 16


# ---- the engine ---------------------------------------------------------------------------------

PROMPTS = [
    "1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2,",
    "Repeat after me: the quick brown fox jumps over the lazy dog. The quick brown fox",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):",
    "Once upon a time",
    "1, 2, 3, 4, 5, 6, 7, 8,",
]


def _params(stop: str = " (") -> list[SamplingParams]:
    greedy = SamplingParams(max_tokens=40, temperature=0)
    return [
        # a draft's row must count the drafts before it (without: other tokens here)
        SamplingParams(max_tokens=40, temperature=0, frequency_penalty=1.0),
        SamplingParams(max_tokens=40, temperature=0, logprobs=2),
        SamplingParams(max_tokens=40, temperature=0, repetition_penalty=1.3, min_tokens=30),
        greedy,
        SamplingParams(max_tokens=48, temperature=0, stop=(stop,)),  # met by token 40
        SamplingParams(
            max_tokens=12,
            temperature=0,
            structured_output=StructuredOutput("choice", '["yes", "no"]'),
        ),
    ]


@pytest.mark.model
def test_greedy_with_drafts_equals_greedy_without(make_shallow_engine):
    """The same tokens, text, logprobs and finish as the engine without drafts, for penalties,
    min_tokens, a stop string, logprobs and a structured output beside plain requests; then
    the same prompts with their outputs again (prefix caching over kept drafts' blocks)."""
    prompts = PROMPTS + PROMPTS[1:2]
    # a stop string taken from the end of the model's own 40 tokens (a fixed one could be
    # missed on a host whose arithmetic tips a near tie): many kept drafts come before it
    greedy = SamplingParams(max_tokens=40, temperature=0)
    [free] = make_shallow_engine().generate([PROMPTS[4]], [greedy])
    stop = free.text[-6:]
    params = _params(stop)
    plain = make_shallow_engine(enable_prefix_caching=True)
    spec = make_shallow_engine(enable_prefix_caching=True, speculative=SPEC)
    want = plain.generate(prompts, params)
    got = spec.generate(prompts, params)
    assert spec.num_accepted_tokens > 20 and spec.num_draft_tokens > spec.num_accepted_tokens
    again = [w.prompt_token_ids + w.token_ids[:-3] for w in want]
    want += plain.generate(again, params)
    got += spec.generate(again, params)
    assert spec.scheduler.prefill.num_cached_tokens == plain.scheduler.prefill.num_cached_tokens
    _assert_same(want, got)
    assert got[4].text == free.text[: free.text.index(stop)] and got[4].finish_reason == "stop"
    spec.blocks.check_integrity()
    assert spec.blocks.num_free_blocks == spec.blocks.num_blocks


def _assert_same(want: list, got: list) -> None:
    """The same tokens, text, finish and logprobs (to 1e-3, the same top tokens)."""
    for w, g in zip(want, got, strict=True):
        assert (g.token_ids, g.text, g.finish_reason) == (w.token_ids, w.text, w.finish_reason)
        for lw, lg in zip(w.logprobs or (), g.logprobs or (), strict=True):
            assert lg.token_id == lw.token_id and abs(lg.logprob - lw.logprob) < 1e-3
            assert [t for t, _ in lg.top] == [t for t, _ in lw.top]


@pytest.mark.model
def test_drafts_under_block_pressure_and_after_a_handoff(make_shallow_engine):
    """A cache too small for every draft: drafts are dropped, not requests, and the tokens
    stay the plain engine's; a request prefilled elsewhere decodes with drafts to the same
    tokens as one engine."""
    params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
    want = make_shallow_engine(num_kv_blocks=64).generate(PROMPTS, params)
    tight = make_shallow_engine(num_kv_blocks=20, speculative=SPEC)
    got = tight.generate(PROMPTS, params)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert tight.num_accepted_tokens > 0
    assert tight.blocks.num_free_blocks == tight.blocks.num_blocks
    # vLLM's disable_by_batch_size: 5 requests decoding together draft nothing above 4
    for limit, drafts in ((4, False), (5, True)):
        spec = dataclasses.replace(SPEC, disable_by_batch_size=limit)
        big = make_shallow_engine(speculative=spec)
        assert [g.token_ids for g in big.generate(PROMPTS, params)] == [w.token_ids for w in want]
        assert (big.num_draft_tokens > 0) is drafts
    prefill, decode = make_shallow_engine(), make_shallow_engine(speculative=SPEC)
    prefill.add_request("h", PROMPTS[1], params, prefill_only=True)
    drain(prefill)
    assert decode.import_request(*prefill.export_kv("h"))
    prefill.release("h")
    tokens, steps = [], []
    while decode.has_unfinished:
        tokens += [t for out in decode.step() for t in out.new_token_ids]
        steps.append(decode.last_step)
    # a step that verified drafts is traced as decodes with its draft count (the latency
    # model's fit leaves such steps out)
    drafted = [step for step in steps if step.draft_tokens]
    assert drafted and all(s.decode_contexts and not s.prefill_lens for s in drafted)
    assert tokens == want[1].token_ids[1:]  # the first came from the prefill
    assert decode.num_accepted_tokens > 0


class MarkovRunner:
    """A model whose next-token distribution depends on the current token alone: P[token]
    over a few tokens (the rest -inf), so every continuation's probability is known."""

    def __init__(self, probs: dict[int, dict[int, float]], vocab: int) -> None:
        self.probs, self.vocab = probs, vocab
        self.block_size, self.num_kv_blocks = 16, 4096
        self.shape = ModelShape(1, 1, 1, 1, vocab, 4096)
        self.lora_slots: dict[str, int] = {}
        self.num_lora_loads = 0

    def execute(self, batch) -> torch.Tensor:
        rows = []
        for seq in batch.seqs:
            tokens = seq.token_ids if seq.all_logits else seq.token_ids[-1:] if seq.sample else []
            rows += [self._row(t) for t in tokens]
        return torch.stack(rows)

    def _row(self, token: int) -> torch.Tensor:
        row = torch.full((self.vocab,), float("-inf"))
        for t, p in self.probs[token].items():
            row[t] = math.log(p)
        return row


@pytest.mark.model
def test_sampled_tokens_with_drafts_follow_the_models_distribution(tokenizer):
    """Each draft is kept with the probability the model gives it: over 1,500 seeded requests,
    whose second step verifies three drafts, tokens 2-4 fall as the model's probabilities say
    (within 4.5 standard errors each)."""
    a, b, c = (tokenizer.convert_tokens_to_ids(t) for t in ("a", "b", "c"))
    probs = {
        a: {a: 0.2, b: 0.5, c: 0.3},
        b: {a: 0.1, b: 0.3, c: 0.6},
        c: {a: 0.7, b: 0.2, c: 0.1},
    }
    spec = SpeculativeConfig(3, prompt_lookup_min=1, prompt_lookup_max=2)
    engine = LLMEngine(
        EngineConfig(speculative=spec),
        runner=MarkovRunner(probs, tokenizer.vocab_size),
        tokenizer=tokenizer,
    )
    n = 1500
    params = [SamplingParams(max_tokens=5, temperature=1.0, seed=i) for i in range(n)]
    done = engine.generate([[a, b, c, a, b, c, a]] * n, params)
    assert engine.num_draft_tokens >= 3 * n
    assert 0.2 < engine.num_accepted_tokens / engine.num_draft_tokens < 0.8
    counts: dict[tuple[int, ...], int] = {}
    for d in done:
        assert len(d.token_ids) == 5
        key = tuple(d.token_ids[1:4])
        counts[key] = counts.get(key, 0) + 1
    for x, y, z in itertools.product((a, b, c), repeat=3):
        p = sum(probs[a][w] * probs[w][x] for w in (a, b, c)) * probs[x][y] * probs[y][z]
        seen = counts.get((x, y, z), 0) / n
        assert abs(seen - p) <= 4.5 * math.sqrt(p * (1 - p) / n), ((x, y, z), seen, p)


@pytest.mark.unit
def test_the_app_config_passes_vllms_speculative_config_to_the_engine():
    from pydantic import ValidationError

    from app.config import AppArgs

    ngram = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}
    args = AppArgs(decode={"engine": {"speculative_config": ngram}})
    assert args.engine_config("decode").speculative == SpeculativeConfig(4, "ngram", 3, 3)
    assert args.engine_config("prefill").speculative is None
    limited = AppArgs(
        decode={"engine": {"speculative_config": {**ngram, "disable_by_batch_size": 8}}}
    )
    assert limited.engine_config("decode").speculative.disable_by_batch_size == 8
    for bad, field in (
        ({**ngram, "prompt_lookup_min": 4}, "prompt_lookup_min"),
        ({**ngram, "method": "eagle"}, "method"),
        ({**ngram, "num_speculative_tokens": 17}, "num_speculative_tokens"),
        ({**ngram, "draft_model": "x"}, "draft_model"),
        ({**ngram, "disable_by_batch_size": 1}, "disable_by_batch_size"),
    ):
        with pytest.raises(ValidationError, match=field):
            AppArgs(decode={"engine": {"speculative_config": bad}})


@pytest.mark.model
def test_the_engine_cli_speculates_to_the_same_text(capsys):
    from engine.__main__ import main

    cmd = ["generate", "--prompt", PROMPTS[0], "--max-tokens", "16", "--threads", "2"]
    assert main(cmd) == 0
    plain = capsys.readouterr().out
    config = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2}'
    assert main([*cmd, "--speculative-config", config]) == 0
    out, err = capsys.readouterr()
    assert out == plain and len(out) > 10
    kept, drafts = map(int, re.search(r"(\d+) of (\d+) draft tokens kept", err).groups())
    assert 0 < kept <= drafts
    assert main([*cmd, "--speculative-config", '{"num_speculative_tokens": 0}']) == 2
    assert "num_speculative_tokens must be >= 1" in capsys.readouterr().err
