"""Sampler against closed-form distributions; incremental detokenization against a full decode."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from engine.detokenizer import DetokenizerState, IncrementalDetokenizer
from engine.sampler import (
    TokenHistory,
    apply_penalties,
    banned_words,
    min_p,
    sample,
    token_logprobs,
    top_k_top_p,
)
from engine.sampling_params import InvalidRequestError, SamplingParams


def apply_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """One row (V,) through the batch's top-k and top-p."""
    return top_k_top_p(logits.clone().unsqueeze(0), [top_k], [top_p])[0]


def apply_min_p(logits: torch.Tensor, value: float) -> torch.Tensor:
    return min_p(logits.clone().unsqueeze(0), [value])[0]


@pytest.mark.unit
def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.isfinite(apply_top_k_top_p(logits, 2, 1.0)).tolist() == [True, True, False, False]
    # top_p 0.8: 0.5 + 0.3 reaches 0.8, so exactly two tokens survive
    assert torch.isfinite(apply_top_k_top_p(logits, 0, 0.8)).tolist() == [True, True, False, False]
    assert torch.isfinite(apply_top_k_top_p(logits, 0, 0.81)).sum() == 3
    assert torch.isfinite(apply_top_k_top_p(logits, 0, 0.1)).tolist() == [True, False, False, False]
    # a top_p too small for float32 keeps the top token (it dropped all: a NaN draw)
    assert torch.isfinite(apply_top_k_top_p(logits, 0, 1e-300)).tolist() == [True] + [False] * 3
    # ties at the nucleus' edge are all in (whichever order a sort would leave them in)
    tied = torch.log(torch.tensor([0.2, 0.4, 0.2, 0.1, 0.2]))
    assert torch.isfinite(apply_top_k_top_p(tied, 0, 0.5)).tolist() == [True] * 3 + [False, True]


@pytest.mark.unit
@pytest.mark.parametrize("scale", [0.5, 2.0, 8.0])  # nucleus of ~thousands, hundreds, a few
@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.99])
def test_top_p_over_a_vocabulary_keeps_the_full_sorts_tokens(scale, top_p):
    """top_p looks at the likeliest 256, then 4096 tokens before it sorts the row: whichever
    it needs, it keeps the tokens that sorting the whole row keeps (bench/draw_cost.py's)."""
    from bench.draw_cost import textbook_top_p

    logits = torch.randn(49152, generator=torch.Generator().manual_seed(int(scale * 10))) * scale
    want = torch.isfinite(textbook_top_p(logits, top_p))
    out = apply_top_k_top_p(logits, 0, top_p)
    kept = torch.isfinite(out)
    assert kept.sum() == want.sum() and torch.equal(kept, want)
    assert torch.equal(out[kept], logits[kept])  # their logits unchanged


@pytest.mark.unit
def test_a_batch_of_mixed_settings_keeps_for_each_row_what_the_textbook_keeps():
    """One batch, each row its own temperature, top_k, top_p and min_p (nuclei that end within
    256 tokens, within 4096 and past them, side by side): each row keeps the tokens that the
    textbook's row-by-row filters keep (a full sort for top_p), with the same scaled logits."""
    from bench.draw_cost import textbook_top_p

    settings = [  # (temperature, top_k, top_p, min_p)
        (1.0, 0, 1.0, 0.0),
        (0.7, 0, 0.9, 0.0),
        (2.5, 0, 0.95, 0.0),
        (1.0, 40, 1.0, 0.0),
        (1.3, 1000, 0.5, 0.05),
        (0.4, 0, 0.99, 0.0),
        (1.0, 7, 0.3, 0.0),
        (0.9, 0, 1.0, 0.2),
    ]
    gen = torch.Generator().manual_seed(5)
    scales = torch.tensor([[0.5], [8.0], [2.0], [1.0], [4.0], [3.0], [1.0], [2.0]])
    logits = torch.randn(len(settings), 49152, generator=gen) * scales
    rows = logits / torch.tensor([[t] for t, *_ in settings])
    out = min_p(
        top_k_top_p(rows.clone(), [k for _, k, _, _ in settings], [p for *_, p, _ in settings]),
        [m for *_, m in settings],
    )
    for j, (_, k, p, m) in enumerate(settings):
        want = rows[j].clone()
        if k:
            want[want < torch.topk(want, k).values[-1]] = float("-inf")
        want = textbook_top_p(want, p) if p < 1.0 else want
        probs = torch.softmax(want, dim=-1)
        want[probs < m * probs.max()] = float("-inf")
        kept = torch.isfinite(out[j])
        assert torch.equal(kept, torch.isfinite(want)), (j, kept.sum(), torch.isfinite(want).sum())
        assert torch.equal(out[j][kept], rows[j][kept])


@pytest.mark.unit
@pytest.mark.parametrize("at_once", [1, 4, 32])  # a CPU's few rows at a time; a GPU's all
def test_a_seeded_row_draws_the_same_whatever_shares_its_batch(monkeypatch, at_once):
    """A seeded request's draws come from its own generator alone: in a batch of one or among
    unseeded and other seeded rows, the same tokens, however many rows are drawn at once; and
    each draw takes one number from its generator, so a copy of the generator's state (a
    hand-off) continues the same stream."""
    from engine import sampler

    monkeypatch.setattr(sampler, "CPU_ROWS_AT_ONCE", at_once)
    logits = torch.randn(5, 49152, generator=torch.Generator().manual_seed(1))
    mine = SamplingParams(temperature=1.0, top_p=0.9, seed=42)
    alone_gen = torch.Generator().manual_seed(42)
    alone = [sample(logits[2:3], [mine], [alone_gen])[0] for _ in range(6)]
    assert len(set(alone)) > 1  # the stream moves on
    other = SamplingParams(temperature=0.8, seed=1)
    params = [other, SamplingParams(temperature=1.0), mine, SamplingParams(temperature=0), other]
    gens = [torch.Generator().manual_seed(1), None, torch.Generator().manual_seed(42), None, None]
    gens[4] = gens[0]  # a request with a draft: two rows, one generator
    batched = []
    for step in range(6):
        if step == 3:  # handed off: a new generator with the state so far
            state = gens[2].get_state()
            gens[2] = torch.Generator()
            gens[2].set_state(state)
        batched.append(sample(logits, params, gens)[2])
    assert batched == alone
    taken = torch.Generator().manual_seed(42)
    for _ in range(6):
        torch.randint(2**63 - 1, (), generator=taken)
    assert torch.equal(taken.get_state(), alone_gen.get_state())


@pytest.mark.unit
def test_draws_over_a_vocabulary_follow_the_probabilities_and_never_pick_a_banned_token():
    """Five tokens of a 49k vocabulary hold all the mass (the rest are -inf, as a mask leaves
    them): 5,000 draws fall on them as their probabilities say, within 4.5 standard errors."""
    logits = torch.full((1, 49152), float("-inf"))
    ids, p = [3, 17, 20_000, 49_000, 49_151], torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    logits[0, ids] = p.log()
    params, g = SamplingParams(temperature=1.0, seed=0), torch.Generator().manual_seed(0)
    draws = [sample(logits, [params], [g])[0] for _ in range(5000)]
    assert set(draws) <= set(ids)
    seen = torch.tensor([draws.count(t) / 5000 for t in ids])
    assert ((seen - p).abs() <= 4.5 * (p * (1 - p) / 5000).sqrt()).all(), seen


@pytest.mark.unit
def test_sampling_frequencies_follow_temperature_scaled_softmax():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    params = SamplingParams(temperature=0.5, seed=0)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(3)
    for _ in range(4000):
        counts[sample(logits, [params], [g])[0]] += 1
    expected = torch.softmax(logits[0] / 0.5, dim=-1)  # (0.36, 0.09, 0.01) normalized
    torch.testing.assert_close(counts / 4000, expected, atol=0.025, rtol=0)


@pytest.mark.unit
def test_min_p_keeps_tokens_within_its_share_of_the_top_probability():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = [torch.isfinite(apply_min_p(logits, m)).tolist() for m in (0.5, 0.11, 0.0)]
    assert kept == [[True, True, False, False], [True, True, True, False], [True] * 4]
    # drawn: the survivors keep their relative odds (0.6 : 0.3; 0.1 < 0.4 x 0.6 is dropped)
    params = SamplingParams(temperature=1.0, min_p=0.4, seed=0)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(3)
    row = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    for _ in range(3000):
        counts[sample(row, [params], [g])[0]] += 1
    torch.testing.assert_close(counts / 3000, torch.tensor([2 / 3, 1 / 3, 0.0]), atol=0.03, rtol=0)


@pytest.mark.unit
def test_greedy_rows_take_argmax_regardless_of_generator():
    logits = torch.tensor([[0.1, 2.0, 0.3], [5.0, 0.0, 0.0]])
    greedy = SamplingParams(temperature=0.0)
    top1 = SamplingParams(temperature=1.0, top_k=1)
    assert sample(logits, [greedy, top1], [None, None]) == [1, 0]


@pytest.mark.unit
def test_penalties_and_logit_bias_follow_their_formulas():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0])
    prompt, output = [0, 1], [3, 3, 2]
    p = SamplingParams(
        presence_penalty=0.5,
        frequency_penalty=0.25,
        repetition_penalty=2.0,
        logit_bias=((4, 10.0), (0, -1.0)),
    )
    row = logits.clone()
    apply_penalties(row, p, TokenHistory(prompt, output))
    # bias first: token 4 -> 8.0, token 0 -> 1.0; repetition over prompt + output {0, 1, 2, 3}:
    # positive / 2, negative * 2; then output counts {3: 2, 2: 1}: - 0.25 * count - 0.5
    expected = [1.0 / 2, -1.0 * 2, 0.5 / 2 - 0.25 - 0.5, 3.0 / 2 - 0.5 - 0.5, 8.0]
    torch.testing.assert_close(row, torch.tensor(expected))
    # no output yet: presence and frequency change nothing
    row = logits.clone()
    no_output = TokenHistory(prompt, [])
    apply_penalties(row, SamplingParams(presence_penalty=2, frequency_penalty=2), no_output)
    assert torch.equal(row, logits)


@pytest.mark.unit
def test_penalties_steer_greedy_rows_and_leave_the_callers_logits_alone():
    logits = torch.tensor([[0.0, 5.0, 4.0], [0.0, 5.0, 4.0]])
    plain = SamplingParams(temperature=0.0)
    repeat = SamplingParams(temperature=0.0, frequency_penalty=2.0)
    history = [None, TokenHistory([0], [1])]  # the second row has already produced token 1 once
    assert sample(logits, [plain, repeat], [None, None], history) == [1, 2]
    assert logits[1, 1] == 5.0


@pytest.mark.unit
def test_min_tokens_bans_eos_and_stop_tokens_until_reached():
    logits = torch.tensor([[9.0, 8.0, 7.0, 1.0]])  # EOS 0, stop token 1
    p = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=(1,))
    assert sample(logits, [p], [None], [TokenHistory([3], [2], eos_token_id=0)]) == [2]
    assert sample(logits, [p], [None], [TokenHistory([3], [2, 2], eos_token_id=0)]) == [0]
    # ignore_eos: EOS ends nothing, so it is not banned; the stop token still is
    p = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=(1,), ignore_eos=True)
    assert sample(logits, [p], [None], [TokenHistory([3], [], eos_token_id=0)]) == [0]
    logits = torch.tensor([[1.0, 8.0, 7.0, 1.0]])
    assert sample(logits, [p], [None], [TokenHistory([3], [], eos_token_id=0)]) == [2]


@pytest.mark.unit
def test_bad_words_ban_a_last_token_only_after_the_rest_of_the_word():
    words = ((3,), (1, 2), (0, 1, 2))
    assert banned_words(words, []) == [3]  # a one-token word is always banned
    assert banned_words(words, [4, 1]) == [3, 2]
    assert banned_words(words, [0, 1]) == [3, 2, 2]
    assert banned_words(words, [1, 4]) == [3]  # the rest must end the output
    logits = torch.tensor([[1.0, 2.0, 9.0, 8.0, 0.0]])
    p = SamplingParams(temperature=0.0, bad_words_token_ids=words)
    assert sample(logits, [p], [None], [TokenHistory([2, 1], [])]) == [2]  # not the prompt
    assert sample(logits, [p], [None], [TokenHistory([], [1])]) == [1]  # 2 and 3 banned


@pytest.mark.unit
def test_allowed_token_ids_keep_their_logits_and_ban_the_rest():
    logits = torch.tensor([[5.0, 1.0, 3.0, 9.0]])
    p = SamplingParams(temperature=0.0, allowed_token_ids=(1, 2))
    adjusted = logits[0].clone()
    apply_penalties(adjusted, p, TokenHistory([], []))
    assert adjusted.tolist() == [-math.inf, 1.0, 3.0, -math.inf]
    assert sample(logits, [p], [None], [TokenHistory([], [])]) == [2]
    hot = SamplingParams(temperature=5.0, allowed_token_ids=(1, 2), seed=0)
    draws = {
        sample(logits, [hot], [torch.Generator().manual_seed(i)], [TokenHistory([], [])])[0]
        for i in range(40)
    }
    assert draws == {1, 2}  # both drawn at a high temperature, nothing else


@pytest.mark.unit
def test_extreme_temperatures_and_repetition_penalties_draw_without_nan():
    """Past float32's range a factor made NaN logits and the draw failed (the whole batch's
    step with it): 1e-300 draws as greedy, 1e308 as uniform over what a mask allows."""
    logits = torch.tensor([[0.0, 5.0, 3.0, 30.0]])
    none = TokenHistory([], [])

    def draws(params: SamplingParams, history: TokenHistory, n: int) -> list[int]:
        gens = (torch.Generator().manual_seed(i) for i in range(n))
        return [sample(logits, [params], [g], [history])[0] for g in gens]

    assert draws(SamplingParams(temperature=1e-300, seed=0), none, 20) == [3] * 20
    hot = SamplingParams(temperature=1e308, allowed_token_ids=(0, 1, 2), seed=0)
    counts = [draws(hot, none, 300).count(t) for t in range(4)]
    assert counts[3] == 0 and min(counts[:3]) > 70, counts  # ~100 each
    seen = TokenHistory([0, 1, 2], [])  # token 0's logit is exactly 0: 0 x inf was NaN
    # a vanishing penalty lifts the seen positive logits over the unseen 30, in their order
    assert draws(SamplingParams(repetition_penalty=1e-300, seed=0), seen, 20) == [1] * 20
    # a huge one sinks them (to ~0 or far below): the unseen token wins
    assert draws(SamplingParams(repetition_penalty=1e308, seed=0), seen, 20) == [3] * 20


@pytest.mark.unit
def test_a_row_without_a_distribution_fails_alone():
    """NaN logits (greedy or sampled) and an infinite one (sampled: its softmax is NaN) give
    None for that row; the other rows draw what they draw in a batch of their own."""
    nan, inf = float("nan"), float("inf")
    good = torch.tensor([[0.0, 5.0, 3.0, 4.0], [1.0, 2.0, 3.0, 2.5]])
    bad = torch.tensor([[0.0, nan, 3.0, 1.0], [0.0, inf, 3.0, 1.0], [nan, 1.0, 2.0, 3.0]])
    greedy, seeded = SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=7)
    alone = sample(good, [greedy, seeded], [None, torch.Generator().manual_seed(7)])
    batch = torch.cat([bad[:1], good[:1], bad[1:], good[1:]])
    params = [greedy, greedy, seeded, seeded, seeded]
    gens = [None, None, torch.Generator(), torch.Generator(), torch.Generator().manual_seed(7)]
    assert sample(batch, params, gens) == [None, alone[0], None, None, alone[1]]


@pytest.mark.unit
def test_token_logprobs_are_the_log_of_the_softmax_probabilities():
    probs = torch.tensor([[0.5, 0.25, 0.125, 0.125], [0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]])
    logits = probs.log() + torch.tensor([[3.0], [-1.0], [0.5]])  # a row's shift cancels out
    out = token_logprobs(logits, [2, 0, 1], [2, None, 0])
    assert out[1] is None  # the row that did not ask
    first, last = out[0], out[2]
    assert first.token_id == 2 and first.logprob == pytest.approx(math.log(0.125))
    assert [i for i, _ in first.top] == [0, 1]
    assert [v for _, v in first.top] == pytest.approx([math.log(0.5), math.log(0.25)])
    assert last.token_id == 1 and last.logprob == pytest.approx(math.log(0.1)) and last.top == ()
    assert token_logprobs(logits, [0, 0, 0], [None] * 3) == [None] * 3


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
        ({"logit_bias": ((5, 101.0),)}, "logit_bias"),
        ({"logit_bias": ((-1, 1.0),)}, "logit_bias"),
        ({"allowed_token_ids": (1, -2)}, "allowed_token_ids"),
        ({"bad_words_token_ids": ((1,), ())}, "bad_words"),
        ({"bad_words_token_ids": ((1, -1),)}, "bad_words"),
    ],
)
def test_out_of_range_penalties_are_refused(params, param):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**params)
    assert e.value.param == param


@pytest.mark.model
@pytest.mark.parametrize(
    "text",
    [
        "héllo wörld, naïve café",
        "北京是中国的首都。",
        "emoji 🙂🚀 and ☃ mixed",
        "tabs\tand\nnewlines  ",
    ],
)
def test_incremental_detokenization_streams_multibyte_text(tokenizer, text):
    prompt = tokenizer("Say:").input_ids
    output = tokenizer(text, add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(tokenizer, (), False, DetokenizerState.for_prompt(len(prompt)))
    pieces = []
    for i in range(len(output)):
        detok.add_token(prompt + output[: i + 1])
        pieces.append(detok.take_new_text(finished=i == len(output) - 1))
    assert "".join(pieces) == tokenizer.decode(output)
    assert all("\ufffd" not in p for p in pieces)


@pytest.mark.model
def test_stop_string_spanning_tokens_is_held_back_then_cut(tokenizer):
    prompt = tokenizer("Q:").input_ids
    output = tokenizer(" alpha beta gamma delta", add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(
        tokenizer, ("ta gam",), False, DetokenizerState.for_prompt(len(prompt))
    )
    streamed = []
    for i in range(len(output)):
        hit = detok.add_token(prompt + output[: i + 1])
        streamed.append(detok.take_new_text(finished=hit))
        if hit:
            break
    assert hit and "".join(streamed) == " alpha be"


@pytest.mark.model
def test_cli_generate_prints_the_greedy_completion():
    cmd = [
        sys.executable,
        "-m",
        "engine",
        "generate",
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "3",
        "--threads",
        "2",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "Paris."
    bad = subprocess.run(cmd[:-4] + ["--max-tokens", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "max_tokens" in bad.stderr


@pytest.mark.unit
def test_cli_a_device_it_cannot_use_is_a_clear_error(capsys):
    from engine.__main__ import main

    gpu = torch.cuda.is_available()
    for device, reason in (("meta", "cpu or cuda"), ("tpu", "cpu or cuda"), ("cuda", "no CUDA")):
        if device == "cuda" and gpu:
            continue
        assert main(["generate", "--prompt", "hi", "--device", device]) == 2
        assert reason in capsys.readouterr().err
    share = ["--gpu-memory-utilization", "0.5"]
    assert main(["generate", "--prompt", "hi", *share]) == 2  # on the CPU
    assert "on a CPU it is kv_cache_memory_mb" in capsys.readouterr().err


@pytest.mark.model
def test_cli_a_request_the_engine_fails_exits_1_with_its_error(monkeypatch, capsys):
    """NaN logits (the model's numbers broke): the engine's message, exit 1 (it was exit 0 with
    no output). In process, to break the runner."""
    from engine.__main__ import main
    from engine.model_runner import ModelRunner

    execute = ModelRunner.execute

    def nan_logits(self, model_input):
        return torch.full_like(execute(self, model_input), float("nan"))

    monkeypatch.setattr(ModelRunner, "execute", nan_logits)
    assert main(["generate", "--prompt", "The capital of France is", "--max-tokens", "3"]) == 1
    err = capsys.readouterr().err
    assert "error: the engine failed request cli at output token 0" in err


@pytest.mark.model
def test_the_draw_cost_benchmark_times_each_sampling_against_the_textbook(capsys):
    from bench.draw_cost import VARIANTS, main

    main(["--rows", "2", "--rounds", "1", "--threads", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 1 |")]
    assert [row.split(" | ")[1] for row in rows] == list(VARIANTS)
    assert all(float(row.split(" | ")[-1].rstrip(" |")) > 0 for row in rows)
