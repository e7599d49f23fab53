"""The engine on the real default model (SmolLM2-135M-Instruct) against transformers' generate."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from engine import EngineConfig, InvalidRequestError, RequestFailedError, SamplingParams
from engine.limits import bad_words_token_ids
from engine.sampler import FixedAdjustments
from tests.conftest import drain, hf_greedy

pytestmark = pytest.mark.model

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
]
N = 12
GREEDY = SamplingParams(max_tokens=N, temperature=0.0)


@pytest.fixture(scope="module")
def reference(hf_model, tokenizer):
    return [hf_greedy(hf_model, tokenizer, p, N) for p in PROMPTS]


def test_greedy_alone_equals_transformers_generate(make_engine, reference, tokenizer):
    engine = make_engine()
    for prompt, expected in zip(PROMPTS, reference, strict=True):
        [out] = engine.generate([prompt], GREEDY)
        assert out.token_ids == expected
        assert out.text == tokenizer.decode(expected, skip_special_tokens=True)
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_greedy_batched_with_other_lengths_is_batch_invariant(make_engine, reference):
    engine = make_engine()
    fillers = ["Hi", "A much longer distractor prompt that keeps decoding " * 3]
    params = [GREEDY] * 3 + [SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)] * 2
    outs = engine.generate(PROMPTS + fillers, params)
    assert [o.token_ids for o in outs[:3]] == reference


def test_chunked_prefill_equals_whole_prefill(make_engine, reference):
    engine = make_engine(chunked_prefill=True, max_num_batched_tokens=7)
    outs = engine.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == reference


def test_each_step_records_its_chunks_and_their_offsets(make_engine, tokenizer):
    """The step record the latency model is fitted to: a prompt cut into 7-token chunks shows
    each chunk's length and offset, then batch-1 decode steps at a growing context."""
    engine = make_engine(chunked_prefill=True, max_num_batched_tokens=7)
    prompt = PROMPTS[2]
    n = len(engine.encode(prompt))
    engine.add_request("r", prompt, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    steps = []
    while engine.has_unfinished:
        engine.step()
        steps.append(engine.last_step)
    chunks = [s for s in steps if s.prefill_lens]
    assert [s.prefill_offsets for s in chunks] == [[o] for o in range(0, n, 7)]
    assert [s.prefill_lens for s in chunks] == [[min(7, n - o)] for o in range(0, n, 7)]
    decodes = steps[len(chunks) :]
    assert [s.decode_contexts for s in decodes] == [[n + 1], [n + 2]]
    assert all(not s.prefill_offsets and s.duration_ms > 0 for s in decodes)
    # the tokens each step computed (vLLM's iteration_tokens_total), the last one's in stats
    assert [s.num_tokens for s in steps] == [min(7, n - o) for o in range(0, n, 7)] + [1, 1]
    assert engine.stats.num_step_tokens == 1


def test_the_first_token_carries_its_prefill_time(make_engine):
    """vLLM's prefill interval (first scheduled -> first token): over every chunk of a chunked
    prefill, on the first token's output alone; a handed-off request's decode side has none."""
    engine = make_engine(chunked_prefill=True, max_num_batched_tokens=7)
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    engine.add_request("r", PROMPTS[2], params)
    outs, chunks_ms, started = [], [], time.monotonic()
    while not outs:  # the chunks, the last one sampling the first token
        outs += engine.step()
        chunks_ms.append(engine.last_step.duration_ms)
    first_s = time.monotonic() - started
    assert len(chunks_ms) > 2 and [o.num_output_tokens for o in outs] == [1]
    # from the first chunk's scheduling (its step's start) to the last chunk's token (after
    # its forward): more than every chunk's step but the last
    assert sum(chunks_ms[:-1]) / 1000 < outs[0].prefill_time_s <= first_s
    outs += drain(engine)["r"]
    assert [o.prefill_time_s is None for o in outs] == [False, True, True]
    prefill, decode = make_engine(), make_engine()
    prefill.add_request("h", PROMPTS[0], params, prefill_only=True)
    [handed] = drain(prefill)["h"]
    assert handed.prefill_time_s > 0
    assert decode.import_request(*prefill.export_kv("h"))
    assert all(o.prefill_time_s is None for o in drain(decode)["h"])


def test_prefill_export_import_decode_equals_one_engine(make_engine, reference, tokenizer):
    prefill, decode = make_engine(), make_engine(num_kv_blocks=64, block_size=16)
    for i, prompt in enumerate(PROMPTS):
        prefill.add_request(f"r{i}", prompt, GREEDY, prefill_only=True)
    first = {o.request_id: o for o in drain(prefill).values() for o in o}
    assert all(o.prefilled and not o.finished for o in first.values())
    for i in range(len(PROMPTS)):
        handoff, buffer = prefill.export_kv(f"r{i}")
        assert buffer.shape[2] == handoff.num_blocks == -(-len(handoff.prompt_token_ids) // 16)
        assert decode.import_request(handoff, buffer)
        assert prefill.release(f"r{i}")
    assert prefill.blocks.num_free_blocks == prefill.blocks.num_blocks
    rest = drain(decode)
    for i, expected in enumerate(reference):
        tokens = first[f"r{i}"].new_token_ids + [t for o in rest[f"r{i}"] for t in o.new_token_ids]
        text = first[f"r{i}"].new_text + "".join(o.new_text for o in rest[f"r{i}"])
        assert tokens == expected
        assert text == tokenizer.decode(expected, skip_special_tokens=True)
    assert decode.blocks.num_free_blocks == decode.blocks.num_blocks


def test_an_fp8_cache_hands_off_and_decodes_as_one_fp8_engine(make_engine):
    """kv_cache_dtype fp8 on both sides: the hand-off moves the cache's bytes (a packed fp8
    buffer) and the decode engine continues exactly as one fp8 engine would; a decode engine
    that caches float32 refuses the fp8 hand-off by its layout rather than widening it."""
    fp8 = torch.float8_e4m3fn
    want = [c.token_ids for c in make_engine(kv_dtype=fp8).generate(PROMPTS, GREEDY)]
    prefill, decode = make_engine(kv_dtype=fp8), make_engine(num_kv_blocks=64, kv_dtype=fp8)
    for i, prompt in enumerate(PROMPTS):
        prefill.add_request(f"r{i}", prompt, GREEDY, prefill_only=True)
    first = {o.request_id: o for o in drain(prefill).values() for o in o}
    for i in range(len(PROMPTS)):
        handoff, buffer = prefill.export_kv(f"r{i}")
        assert buffer.dtype == fp8 and handoff.layout.dtype == str(fp8)
        if i == 0:
            with pytest.raises(ValueError, match="KV layout"):
                make_engine(num_kv_blocks=8).import_request(handoff, buffer)
        assert decode.import_request(handoff, buffer)
        assert prefill.release(f"r{i}")
    rest = drain(decode)
    for i, expected in enumerate(want):
        tokens = first[f"r{i}"].new_token_ids + [t for o in rest[f"r{i}"] for t in o.new_token_ids]
        assert tokens == expected
    assert decode.blocks.num_free_blocks == decode.blocks.num_blocks


def test_kv_cache_dtype_reaches_every_engine_and_bad_values_name_the_field():
    from app.config import AppArgs

    args = AppArgs(kv_cache_dtype="fp8")
    phases = ("prefill", "decode", "colocated")
    assert {args.engine_config(p).kv_dtype for p in phases} == {"float8_e4m3fn"}
    assert AppArgs(dtype="bfloat16").engine_config("decode").kv_dtype == "bfloat16"  # auto
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        AppArgs(kv_cache_dtype="int4")
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        EngineConfig(kv_cache_dtype="fp4")


def test_import_waits_when_decode_side_is_full(make_engine):
    prefill, decode = make_engine(), make_engine(num_kv_blocks=2, block_size=16)
    prefill.add_request("big", "word " * 40, GREEDY, prefill_only=True)
    drain(prefill)
    handoff, buffer = prefill.export_kv("big")
    assert not decode.can_import(handoff.num_computed_tokens)
    prefill.add_request("running", "Hi", GREEDY)
    prefill.step()
    assert not prefill.release("running")  # only prefilled requests can be released
    assert prefill.abort("running")
    assert decode.import_request(handoff, buffer) is False  # refused, nothing changed
    assert decode.blocks.num_free_blocks == 2 and prefill.blocks.owns("big")


def test_preemption_under_block_pressure_keeps_outputs(make_engine, reference):
    # 10 blocks of 4 tokens cannot hold the three requests at once: decode must preempt.
    engine = make_engine(num_kv_blocks=10, block_size=4)
    outs = engine.generate(PROMPTS[:2] + ["Paris is"], GREEDY)
    assert engine.num_preemptions > 0
    assert [o.token_ids for o in outs[:2]] == reference[:2]
    engine.blocks.check_integrity()
    assert engine.blocks.num_free_blocks == 10


@pytest.mark.parametrize("when", ["queued", "mid_prefill", "decoding", "prefilled"])
def test_abort_in_every_state_frees_blocks(make_engine, when):
    engine = make_engine(chunked_prefill=True, max_num_batched_tokens=8)
    engine.add_request("x", PROMPTS[2], GREEDY, prefill_only=when == "prefilled")
    engine.add_request("other", PROMPTS[0], GREEDY)
    steps = {"queued": 0, "mid_prefill": 1, "decoding": 4, "prefilled": 4}[when]
    for _ in range(steps):
        engine.step()
    expected_state = {"mid_prefill": "waiting", "decoding": "running", "prefilled": "prefilled"}
    if when in expected_state:
        assert engine.scheduler.find("x").status.value == expected_state[when]
    assert engine.abort("x")
    assert not engine.abort("x")  # second abort: unknown
    drain(engine)
    engine.blocks.check_integrity()
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


@pytest.mark.parametrize("where", ["draw", "detokenizer"])
def test_a_request_the_engine_fails_ends_alone(make_engine, reference, where):
    """After 3 tokens one request's logits turn NaN (the model's numbers broke), or its
    detokenizer raises: that request ends with a RequestFailedError, the two others of the
    same steps finish as they do alone, and every block comes back."""
    engine = make_engine()
    for rid, prompt in zip(["a", "broken", "b"], PROMPTS, strict=True):
        engine.add_request(rid, prompt, GREEDY)
    outs = [engine.step() for _ in range(3)]  # the prefill, then two decode steps
    execute = engine.runner.execute

    def nan_for_broken(model_input):
        logits = execute(model_input).clone()  # an inference tensor is read-only
        table = engine.blocks.block_table("broken") if "broken" in engine._tracked else None
        for row, seq in enumerate(s for s in model_input.seqs if s.sample):
            if seq.block_table == table:
                logits[row] = float("nan")
        return logits

    def raises(*args):
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

    if where == "draw":
        engine.runner.execute = nan_for_broken
    else:
        engine._tracked["broken"].detokenizer.add_token = raises
    rest = drain(engine)
    broken = [o for step in outs for o in step if o.request_id == "broken"] + rest["broken"]
    assert [t for o in broken for t in o.new_token_ids] == reference[1][:3]
    last = broken[-1]  # the 4th output: no token, the error
    assert last.finish_reason == "abort" and isinstance(last.error, RequestFailedError)
    assert "at output token" in str(last.error) and len(broken) == 4
    for rid, want in (("a", reference[0]), ("b", reference[2])):
        mine = [o for step in outs for o in step if o.request_id == rid] + rest[rid]
        assert [t for o in mine for t in o.new_token_ids] == want
    engine.blocks.check_integrity()
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_offline_generate_returns_a_failed_requests_error_with_the_others(make_engine, reference):
    """generate() of a batch whose second prompt's logits are NaN at its prefill: that
    completion is empty with finish_reason "abort" and carries the RequestFailedError; the
    other two are transformers' greedy output."""
    engine = make_engine()
    broken = engine.encode(PROMPTS[1])
    execute = engine.runner.execute

    def nan_for_broken(model_input):
        logits = execute(model_input).clone()  # an inference tensor is read-only
        for row, seq in enumerate(s for s in model_input.seqs if s.sample):
            if seq.token_ids == broken:
                logits[row] = float("nan")
        return logits

    engine.runner.execute = nan_for_broken
    outs = engine.generate(PROMPTS, GREEDY)
    assert outs[1].token_ids == [] and outs[1].finish_reason == "abort"
    assert isinstance(outs[1].error, RequestFailedError)
    assert [outs[0].token_ids, outs[2].token_ids] == [reference[0], reference[2]]
    assert outs[0].error is None and outs[2].error is None
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_seeded_sampling_is_reproducible_and_batch_independent(make_engine):
    params = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, top_k=40, seed=123)
    alone = make_engine().generate([PROMPTS[0]], params)[0].token_ids
    mixed = make_engine().generate(
        [PROMPTS[0], PROMPTS[1]], [params, SamplingParams(max_tokens=10, temperature=1.0)]
    )
    assert mixed[0].token_ids == alone
    other = make_engine().generate([PROMPTS[0]], SamplingParams(max_tokens=10, seed=7))[0]
    assert other.token_ids != alone


def test_seeded_sampling_survives_the_handoff(make_engine):
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=5, ignore_eos=True)
    expected = make_engine().generate([PROMPTS[1]], params)[0].token_ids
    prefill, decode = make_engine(), make_engine()
    prefill.add_request("s", PROMPTS[1], params, prefill_only=True)
    first = drain(prefill)["s"][0].new_token_ids
    assert decode.import_request(*prefill.export_kv("s"))
    rest = [t for o in drain(decode)["s"] for t in o.new_token_ids]
    assert first + rest == expected


class _OpenAIPenalties:
    """The reference: OpenAI's presence / frequency penalties as a transformers logits
    processor, counted token by token over what generate() has produced so far."""

    def __init__(self, prompt_len: int, presence: float, frequency: float) -> None:
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        counts: dict[int, int] = {}
        for token in input_ids[0, self.prompt_len :].tolist():
            counts[token] = counts.get(token, 0) + 1
        for token, count in counts.items():
            scores[0, token] -= self.frequency * count + self.presence
        return scores


def _hf_generate(hf_model, tokenizer, prompt: str, **kwargs) -> list[int]:
    import torch
    from transformers import LogitsProcessorList

    ids = tokenizer(prompt, return_tensors="pt").input_ids
    processors = LogitsProcessorList([kwargs.pop("processor")] if "processor" in kwargs else [])
    with torch.inference_mode():
        out = hf_model.generate(
            ids, max_new_tokens=N, do_sample=False, pad_token_id=tokenizer.eos_token_id,
            logits_processor=processors, **kwargs,
        )  # fmt: skip
    return out[0, ids.shape[1] :].tolist()


@pytest.fixture(scope="module")
def penalty_cases(hf_model, tokenizer, reference) -> list[tuple[dict, list[int]]]:
    """(our sampling fields, transformers' generate under its equivalent arguments)."""
    prompt = PROMPTS[2]
    n_prompt = len(tokenizer(prompt).input_ids)
    bias_token = tokenizer(" sea").input_ids[0]
    elara = bad_words_token_ids(tokenizer, ["Elara"])  # the greedy output names her
    assert tuple(tokenizer(" Elara").input_ids) in elara
    allowed = sorted({*reference[2], *tokenizer(" son").input_ids} - {reference[2][2]})
    cases = [  # (our sampling fields, transformers' generate arguments)
        ({"repetition_penalty": 1.3}, {"repetition_penalty": 1.3}),
        (
            {"presence_penalty": 0.8, "frequency_penalty": 1.5},
            {"processor": _OpenAIPenalties(n_prompt, 0.8, 1.5)},
        ),
        ({"logit_bias": ((bias_token, 8.0),)}, {"sequence_bias": {(bias_token,): 8.0}}),
        # vLLM's bad_words (here a two-token name: its second token is banned after its first)
        # against transformers' bad_words_ids; allowed_token_ids against a prefix constraint
        ({"bad_words_token_ids": elara}, {"bad_words_ids": [list(w) for w in elara]}),
        ({"allowed_token_ids": allowed}, {"prefix_allowed_tokens_fn": lambda *_: allowed}),
    ]
    return [(ours, _hf_generate(hf_model, tokenizer, prompt, **theirs)) for ours, theirs in cases]


@pytest.mark.parametrize("handoff", [False, True])
def test_penalties_and_logit_bias_equal_transformers_generate(
    make_engine, penalty_cases, reference, handoff
):
    prompt = PROMPTS[2]
    for ours, expected in penalty_cases:
        params = SamplingParams(max_tokens=N, temperature=0.0, **ours)
        assert expected != reference[2], ours  # the field changes the greedy output
        if not handoff:
            [out] = make_engine().generate([prompt], params)
            assert out.token_ids == expected, ours
            continue
        # the decode side penalizes the prompt and the prefill's first token too
        prefill, decode = make_engine(), make_engine()
        prefill.add_request("p", prompt, params, prefill_only=True)
        first = drain(prefill)["p"][0].new_token_ids
        assert decode.import_request(*prefill.export_kv("p"))
        assert first + [t for o in drain(decode)["p"] for t in o.new_token_ids] == expected


def test_a_requests_allowed_ids_and_bias_become_tensors_once(make_engine, monkeypatch):
    """Made from the request's tuples every step, allowed ids or a bias over the whole
    vocabulary cost each step of the batch 10-15 ms: the engine makes them once per request
    and keeps them (what they do is checked against transformers above)."""
    made = []
    real = FixedAdjustments.of

    def counting(p, device, dtype):
        made.append(p)
        return real(p, device, dtype)

    monkeypatch.setattr(FixedAdjustments, "of", counting)
    ours = {"logit_bias": ((5, 1.0),), "allowed_token_ids": tuple(range(1000))}
    params = SamplingParams(max_tokens=N, temperature=0.0, **ours)
    [out] = make_engine().generate([PROMPTS[2]], params)
    assert len(out.token_ids) == N > 1 and len(made) == 1


def test_min_tokens_equals_transformers_min_new_tokens(make_engine, hf_model, tokenizer):
    import torch

    engine = make_engine()
    chat = engine.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    natural = engine.generate([chat], SamplingParams(max_tokens=30, temperature=0))[0]
    assert natural.token_ids[-1] == engine.eos_token_id  # it would stop by itself
    n = len(natural.token_ids) + 4
    params = SamplingParams(max_tokens=n + 8, temperature=0, min_tokens=n, stop=["Paris"])
    [out] = engine.generate([chat], params)
    with torch.inference_mode():
        ref = hf_model.generate(
            torch.tensor([chat]), do_sample=False, min_new_tokens=n, max_new_tokens=n + 8,
            eos_token_id=engine.eos_token_id, pad_token_id=engine.eos_token_id,
        )[0, len(chat) :].tolist()  # fmt: skip
    # "Paris" came before min_tokens: the stop string did not end it, EOS could not
    assert engine.eos_token_id not in out.token_ids[:n] and "Paris" in out.text
    assert out.token_ids == ref[: len(out.token_ids)] and len(out.token_ids) >= n
    # "Paris" after min_tokens: the stop string ends it as usual
    early = SamplingParams(max_tokens=n, temperature=0, min_tokens=2, stop=["Paris"])
    [cut] = engine.generate([chat], early)
    assert cut.text == "The capital of France is " and cut.finish_reason == "stop"


def _hf_logprobs(hf_model, prompt_ids: list[int], output_ids: list[int]):
    """transformers' log-softmax over the vocabulary at each output position: (T, V)."""
    import torch

    with torch.inference_mode():
        logits = hf_model(torch.tensor([prompt_ids + output_ids])).logits[0].float()
    return torch.log_softmax(logits[len(prompt_ids) - 1 : -1], dim=-1)


@pytest.mark.parametrize("handoff", [False, True])
def test_logprobs_equal_transformers_log_softmax(make_engine, hf_model, tokenizer, handoff):
    """The sampled token's logprob and the top-k of the model's own distribution: sampling
    with temperature, top-k and a penalty does not change them (vLLM's raw logprobs)."""
    prompt_ids = tokenizer(PROMPTS[2]).input_ids
    params = SamplingParams(
        max_tokens=N, temperature=0.9, top_k=30, seed=7, repetition_penalty=1.2, logprobs=5
    )
    if handoff:  # the first token's from the prefill side, the rest from the decode side
        prefill, decode = make_engine(), make_engine()
        prefill.add_request("p", prompt_ids, params, prefill_only=True)
        outputs = drain(prefill)["p"]
        assert decode.import_request(*prefill.export_kv("p"))
        outputs += drain(decode)["p"]
        tokens = [t for o in outputs for t in o.new_token_ids]
        logprobs = [lp for o in outputs for lp in o.logprobs]
    else:
        # batched with a request that asks for none: each row keeps its own logprobs
        plain = SamplingParams(max_tokens=N + 3, temperature=0.0)
        none, out = make_engine().generate([PROMPTS[0], prompt_ids], [plain, params])
        assert none.logprobs is None
        tokens, logprobs = out.token_ids, out.logprobs
    want = _hf_logprobs(hf_model, prompt_ids, tokens)
    assert [lp.token_id for lp in logprobs] == tokens and len(tokens) == N
    for t, (lp, row) in enumerate(zip(logprobs, want, strict=True)):
        assert lp.logprob == pytest.approx(row[tokens[t]].item(), abs=2e-4), t
        values, ids = row.topk(5)
        assert [i for i, _ in lp.top] == ids.tolist(), t
        assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=2e-4), t
        assert _within_rank(lp, row), t
    # sampled, not greedy: some token is not the most likely one, and still has its logprob
    assert any(lp.token_id != lp.top[0][0] for lp in logprobs)


def _within_rank(lp, row, tol: float = 1e-3) -> bool:
    """lp.rank is the token's place in transformers' row (1: most likely), up to near-ties."""
    value = row[lp.token_id].item()
    return (row > value + tol).sum().item() + 1 <= lp.rank <= (row > value - tol).sum().item() + 1


def test_logprobs_zero_gives_the_sampled_token_alone(make_engine):
    params = SamplingParams(max_tokens=3, temperature=0.0, logprobs=0)
    [out] = make_engine().generate([PROMPTS[0]], params)
    assert [lp.top for lp in out.logprobs] == [()] * 3
    assert all(lp.logprob <= 0.0 for lp in out.logprobs)


def _hf_prompt_logprobs(hf_model, prompt_ids: list[int]):
    """transformers' log-softmax at each prompt position but the last: row j predicts j + 1."""
    import torch

    with torch.inference_mode():
        logits = hf_model(torch.tensor([prompt_ids])).logits[0].float()
    return torch.log_softmax(logits[:-1], dim=-1)


@pytest.mark.parametrize("how", ["whole", "chunked", "prefill_only"])
def test_prompt_logprobs_equal_transformers_log_softmax(
    make_engine, hf_model, tokenizer, how, monkeypatch
):
    """Every prompt token after the first gets its logprob and top-k from the prefill that
    leads to the first output, whether whole, in chunks batched with other requests, or on the
    prefill side of a hand-off; the first prompt token has none."""
    monkeypatch.setattr("engine.engine.PROMPT_LOGPROB_ROWS", 3)  # several slices per step
    prompt_ids = tokenizer(PROMPTS[2]).input_ids
    assert len(prompt_ids) > 7
    params = SamplingParams(max_tokens=3, temperature=0.0, prompt_logprobs=4)
    if how == "prefill_only":
        engine = make_engine()
        engine.add_request("p", prompt_ids, params, prefill_only=True)
        [first] = drain(engine)["p"]
        got = first.prompt_logprobs
        assert engine.abort("p")
    else:
        chunked = {"chunked_prefill": True, "max_num_batched_tokens": 5} if how == "chunked" else {}
        plain = SamplingParams(max_tokens=6, temperature=0.0)
        engine = make_engine(**chunked)
        other, out = engine.generate([PROMPTS[0], prompt_ids], [plain, params])
        assert other.prompt_logprobs is None
        got = out.prompt_logprobs
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    want = _hf_prompt_logprobs(hf_model, prompt_ids)
    assert len(got) == len(prompt_ids) and got[0] is None
    for j, (lp, row) in enumerate(zip(got[1:], want, strict=True)):
        assert lp.token_id == prompt_ids[j + 1]
        assert lp.logprob == pytest.approx(row[prompt_ids[j + 1]].item(), abs=2e-4), j
        values, ids = row.topk(4)
        assert [i for i, _ in lp.top] == ids.tolist(), j
        assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=2e-4), j
        assert _within_rank(lp, row), j
    assert any(lp.rank > 1 for lp in got[1:])  # a prompt is not all the model's first choice


def test_stop_string_truncates_and_is_never_streamed(make_engine, reference, tokenizer):
    full = tokenizer.decode(reference[0], skip_special_tokens=True)  # " Paris.\n\nThe answer ..."
    stop = "answer"
    assert stop in full
    engine = make_engine()
    engine.add_request("s", PROMPTS[0], SamplingParams(max_tokens=N, temperature=0, stop=[stop]))
    outs = drain(engine)["s"]
    pieces = [o.new_text for o in outs]
    assert "".join(pieces) == full[: full.index(stop)]
    assert all(stop[:3] not in p for p in pieces[:-1])
    assert outs[-1].finish_reason == "stop"
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    # vLLM's include_stop_str_in_output: the text runs to the stop string's end
    kept = SamplingParams(max_tokens=N, temperature=0, stop=[stop], include_stop_str_in_output=True)
    [out] = engine.generate([PROMPTS[0]], kept)
    assert out.text == full[: full.index(stop) + len(stop)] and out.finish_reason == "stop"


def test_stop_token_ids_ignore_eos_and_length(make_engine, reference, tokenizer):
    engine = make_engine()
    stop_tok = reference[0][1]
    assert stop_tok not in reference[0][:1]
    [out] = engine.generate([PROMPTS[0]], SamplingParams(temperature=0, stop_token_ids=[stop_tok]))
    assert out.token_ids == reference[0][:2] and out.finish_reason == "stop"
    chat_ids = engine.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    [natural] = engine.generate([chat_ids], SamplingParams(max_tokens=40, temperature=0))
    assert natural.finish_reason == "stop" and natural.token_ids[-1] == engine.eos_token_id
    assert natural.text == "The capital of France is Paris."
    forced = SamplingParams(max_tokens=len(natural.token_ids) + 5, temperature=0, ignore_eos=True)
    [longer] = engine.generate([chat_ids], forced)
    assert longer.finish_reason == "length" and len(longer.token_ids) == forced.max_tokens
    # vLLM's skip_special_tokens=False: the same tokens, the end-of-turn written out
    shown = dataclasses.replace(forced, skip_special_tokens=False)
    [raw] = engine.generate([chat_ids], shown)
    assert raw.token_ids == longer.token_ids and "<|im_end|>" not in longer.text
    assert raw.text == tokenizer.decode(raw.token_ids, skip_special_tokens=False)
    assert raw.text.startswith(natural.text + "<|im_end|>")
    # the token that ends a request is not written, even as a special token (vLLM's rule),
    # unless include_stop_str_in_output
    kept = SamplingParams(max_tokens=40, temperature=0, skip_special_tokens=False)
    [plain] = engine.generate([chat_ids], kept)
    assert plain.text == natural.text and plain.token_ids == natural.token_ids
    [shown] = engine.generate(
        [chat_ids], dataclasses.replace(kept, include_stop_str_in_output=True)
    )
    assert shown.text == natural.text + "<|im_end|>"
    [cut] = engine.generate([PROMPTS[0]], SamplingParams(temperature=0, stop_token_ids=[stop_tok]))
    assert cut.text == tokenizer.decode(reference[0][:1], skip_special_tokens=True)


@pytest.mark.parametrize(
    ("prompt", "params", "match"),
    [
        ("", {}, "prompt is empty"),
        ([], {}, "prompt is empty"),
        ("hi " * 300, {"max_tokens": 4}, "context window"),
        ("hi", {"max_tokens": 0}, "max_tokens"),
        ("hi", {"top_p": 0.0}, "top_p"),
        ("hi", {"top_p": 1.5}, "top_p"),
        ("hi", {"temperature": -0.5}, "temperature"),
        ("hi", {"temperature": float("nan")}, "temperature must be finite"),
        ("hi", {"temperature": float("inf")}, "temperature must be finite"),
        ("hi", {"top_k": -3}, "top_k"),
        ([1, 10**9], {}, "token ids"),
        ("hi", {"max_tokens": 300}, "exceeds the context window"),
        ("hi", {"logit_bias": ((10**6, 1.0),)}, "logit_bias keys must be token ids in"),
        ("hi", {"logprobs": 21}, r"logprobs must be an integer in \[0, 20\]"),
        ("hi", {"logprobs": -1}, "logprobs"),
        ("hi", {"seed": 2**64}, "seed must be an integer in"),
        ("hi", {"seed": -(2**63) - 1}, "seed"),
    ],
)
def test_bad_input_raises_precise_error(make_engine, prompt, params, match):
    engine = make_engine()
    engine.max_model_len = 256  # a small window keeps the long-prompt case cheap
    with pytest.raises(InvalidRequestError, match=match):
        engine.add_request("bad", prompt, SamplingParams(**params))
    assert not engine.has_unfinished and engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_duplicate_request_id_and_kv_capacity_errors(make_engine):
    engine = make_engine(num_kv_blocks=4, block_size=4)
    engine.add_request("a", "hi", SamplingParams(max_tokens=2))
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request("a", "hi", SamplingParams(max_tokens=2))
    with pytest.raises(InvalidRequestError, match="KV cache"):
        engine.add_request("b", "hi", SamplingParams(max_tokens=30))


def test_prefix_caching_reuses_a_prompts_blocks_and_keeps_the_output(
    make_engine, reference, tokenizer
):
    """vLLM's automatic prefix caching: a prompt computed once is taken from the cache the next
    time (only its last partial block and last token are computed), by itself or as the start
    of a longer prompt, with the same greedy output; blocks come back free."""
    engine = make_engine(block_size=4, enable_prefix_caching=True)
    prompt = tokenizer(PROMPTS[2]).input_ids  # 19 tokens: 4 full blocks and 3 tokens
    [first] = engine.generate([prompt], GREEDY)
    assert first.token_ids == reference[2] and engine.stats.num_cached_tokens == 0
    [again] = engine.generate([prompt], GREEDY)
    assert again.token_ids == reference[2]
    assert engine.stats.num_cached_tokens == 16  # the full blocks before its last token
    # a longer prompt that starts the same: the first request's output blocks count too
    longer = prompt + first.token_ids[:6]
    engine.add_request("longer", longer, GREEDY)
    outs = engine.step()
    cached = (len(longer) - 1) // 4 * 4  # every full block before the last token
    step = engine.last_step  # its prefill computed the rest
    assert (step.prefill_lens, step.prefill_offsets) == ([len(longer) - cached], [cached])
    assert outs[0].num_cached_tokens == cached  # reported with the first output
    outs += drain(engine)["longer"]
    want = _greedy_without_cache(engine, longer)
    assert [t for o in outs for t in o.new_token_ids] == want
    engine.blocks.check_integrity()
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def _greedy_without_cache(engine, ids: list[int]) -> list[int]:
    """The greedy output of `ids` from a fresh engine without caching (the reference path)."""
    from engine import EngineConfig, LLMEngine
    from engine.model_runner import ModelRunner

    runner = ModelRunner(engine.runner.model, num_kv_blocks=64, block_size=16)
    fresh = LLMEngine(EngineConfig(), runner=runner, tokenizer=engine.tokenizer)
    [out] = fresh.generate([ids], GREEDY)
    return out.token_ids


def test_prefix_caching_under_preemption_handoff_and_prompt_logprobs(make_engine, reference):
    # preemption: a recomputed request takes back what is still cached; outputs unchanged
    engine = make_engine(num_kv_blocks=10, block_size=4, enable_prefix_caching=True)
    outs = engine.generate(PROMPTS[:2] + ["Paris is"], GREEDY)
    assert engine.num_preemptions > 0 and engine.stats.num_cached_tokens > 0
    assert [o.token_ids for o in outs[:2]] == reference[:2]
    engine.blocks.check_integrity()
    assert engine.blocks.num_free_blocks == 10
    # the prefill side of a hand-off: a cached prefix is exported like a computed one
    prefill, decode = make_engine(enable_prefix_caching=True), make_engine()
    prefill.generate([PROMPTS[2]], SamplingParams(max_tokens=1, temperature=0))
    prefill.add_request("p", PROMPTS[2], GREEDY, prefill_only=True)
    first = drain(prefill)["p"][0].new_token_ids
    assert prefill.stats.num_cached_tokens == 16
    assert decode.import_request(*prefill.export_kv("p"))
    assert first + [t for o in drain(decode)["p"] for t in o.new_token_ids] == reference[2]
    # prompt logprobs need every prompt token's logits: such a request takes nothing cached
    scored = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    before = prefill.stats.num_cached_tokens
    [out] = prefill.generate([PROMPTS[2]], scored)
    assert prefill.stats.num_cached_tokens == before
    assert len(out.prompt_logprobs) == len(prefill.encode(PROMPTS[2]))


def test_choices_of_one_prompt_compute_it_once(make_engine, reference):
    """Three copies of a prompt added together (n choices): the first computes it, the others
    start one step later past its cached blocks; seeded samples and greedy outputs equal an
    engine without caching, which computes it three times."""
    params = [GREEDY, SamplingParams(max_tokens=N, seed=1), SamplingParams(max_tokens=N, seed=2)]
    outs = {}
    for caching in (False, True):
        engine = make_engine(block_size=4, enable_prefix_caching=caching)
        ids = [engine.add_request(None, PROMPTS[2], p) for p in params]
        first = {o.request_id: o.new_token_ids for o in engine.step()}
        prefilled = engine.last_step.prefill_lens
        rest = drain(engine)
        outs[caching] = [
            first.get(i, []) + [t for o in rest[i] for t in o.new_token_ids] for i in ids
        ]
        engine.blocks.check_integrity()
        assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    assert prefilled == [19]  # the last engine's first step: the first copy alone
    assert engine.stats.num_cached_tokens == 2 * 16  # four full blocks each, for the others
    assert outs[True] == outs[False] and outs[True][0] == reference[2]


@pytest.mark.parametrize("family", ["gemma2", "gpt_oss", "deepseek_v3"])
def test_other_families_through_the_engine_equal_transformers_generate(family, tmp_path, tokenizer):
    """A tiny random Gemma 2 (tight score softcapping), gpt-oss (attention sinks) or DeepSeek
    V3 (latent attention: one latent cached per token, its one slot both keys and values)
    saved with the default tokenizer and loaded by path, as `model:` in serve_config.yaml
    loads one: greedy output of three batched prompts equals transformers' generate, and so
    does the first prompt's prefilled on one engine and decoded on another."""
    import torch
    from transformers import AutoModelForCausalLM

    from engine import EngineConfig, LLMEngine
    from tests.test_model_runner import FAMILIES

    config_cls, model_cls, extra = FAMILIES[family]
    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    config = config_cls(vocab_size=len(tokenizer), **common, **extra, eos_token_id=None)
    torch.manual_seed(0)
    model_cls(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    engine = LLMEngine(EngineConfig(model=str(tmp_path), num_kv_blocks=64, block_size=4))
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    outs = engine.generate(PROMPTS, params)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    for prompt, out in zip(PROMPTS, outs, strict=True):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            want = hf.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)
        assert out.token_ids == want[0, ids.shape[1] :].tolist()
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    decode = LLMEngine(EngineConfig(model=str(tmp_path), num_kv_blocks=64, block_size=4))
    engine.add_request("p", PROMPTS[0], params, prefill_only=True)
    first = drain(engine)["p"][0].new_token_ids
    handoff, buffer = engine.export_kv("p")
    assert buffer.shape[1] == (1 if family == "deepseek_v3" else 2)  # the cache's slots
    assert decode.import_request(handoff, buffer)
    assert first + [t for o in drain(decode)["p"] for t in o.new_token_ids] == outs[0].token_ids
