"""Structured outputs (engine/grammar.py): constrained greedy output against transformers'
generate under the same constraint (its prefix_allowed_tokens_fn, with a fresh llguidance
matcher replaying the tokens at every step: a second code path), the form of sampled outputs,
the hand-off, the end of a complete form, refused constraints; and the request fields
(app/structured.py). The engines and transformers run the Serve tests' tiny random model
(tests/conftest.py: serve_model_path): the constraint is what is checked, not the text."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from engine import InvalidRequestError, SamplingParams, grammar
from engine.grammar import Grammars, grammar_text
from engine.limits import chat_token_ids
from engine.sampler import TokenHistory, TokenMasks, sample, unpack_masks
from engine.sampling_params import StructuredOutput
from tests.conftest import drain

pytestmark = pytest.mark.model

# bounded: the tiny random model (tests/conftest.py: serve_model_path) writes its strings,
# numbers and keys past any max_tokens
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
CONSTRAINTS = {
    "regex": StructuredOutput("regex", r"[0-9]{3}-[a-z]{2}"),
    "json": StructuredOutput("json", json.dumps(PERSON), any_whitespace=False),
    "json_object": StructuredOutput("json_object"),
    "choice": StructuredOutput("choice", json.dumps(["Paris", "London", "Rome"])),
    "yes_no": StructuredOutput("choice", json.dumps(["yes", "no"])),  # one token each
    "grammar": StructuredOutput("grammar", 'root ::= "The answer is " [0-9] [0-9]? "."'),
}


TAG_FIELDS = {  # vLLM's structural_tag fields
    "structures": [{"begin": "<f=a>", "schema": {"type": "object"}, "end": "</f>"}],
    "triggers": ["<f="],
}


@pytest.fixture(scope="module")
def chat_prompt(tokenizer) -> list[int]:
    messages = [{"role": "user", "content": "Describe a person as JSON. Which city is best?"}]
    return chat_token_ids(tokenizer, messages)


def _hf_constrained(hf_model, tokenizer, prompt: list[int], structure, max_new: int):
    """transformers' greedy generate, allowed at each step only what a new matcher that has
    consumed the tokens so far allows."""
    grammars = Grammars(tokenizer, hf_model.config.vocab_size)

    def allowed(_batch, ids: torch.Tensor) -> list[int]:
        matcher = grammars.matcher(structure, ids[len(prompt) :].tolist())
        # the matcher's own one-row mask read by numpy, not the engine's batched torch one: a
        # second path (bit t of the mask is bit t % 8 of its little-endian byte t // 8)
        bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), np.uint8), bitorder="little")
        return np.flatnonzero(bits).tolist()

    with torch.inference_mode():
        out = hf_model.generate(
            torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False,
            pad_token_id=tokenizer.eos_token_id, prefix_allowed_tokens_fn=allowed,
        )  # fmt: skip
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("kind", list(CONSTRAINTS))
def test_constrained_greedy_equals_transformers_under_the_same_constraint(
    make_tiny_engine, tiny_hf_model, tokenizer, chat_prompt, kind
):
    structure = CONSTRAINTS[kind]
    params = SamplingParams(max_tokens=40, temperature=0, structured_output=structure)
    [out] = make_tiny_engine().generate([chat_prompt], params)
    [free] = make_tiny_engine().generate(
        [chat_prompt], SamplingParams(max_tokens=40, temperature=0)
    )
    assert out.token_ids != free.token_ids[: len(out.token_ids)]  # the constraint changes it
    expected = _hf_constrained(tiny_hf_model, tokenizer, chat_prompt, structure, 41)
    assert expected[: len(out.token_ids)] == out.token_ids
    if kind == "json_object":  # any keys and values: the random model's run on to max_tokens
        assert out.finish_reason == "length" and out.text.startswith("{")
        return
    # the request ends where the form is complete; transformers' next token is EOS, the only
    # one the constraint allows there
    assert out.finish_reason == "stop"
    assert expected[len(out.token_ids)] == tokenizer.eos_token_id
    _assert_form(kind, out.text)


def _assert_form(kind: str, text: str) -> None:
    if kind == "regex":
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", text), text
    elif kind in ("json", "json_object"):
        value = json.loads(text)
        assert isinstance(value, dict), text
        if kind == "json":
            assert isinstance(value["name"], str) and isinstance(value["age"], int), text
    elif kind in ("choice", "yes_no"):
        assert text in ("Paris", "London", "Rome", "yes", "no"), text
    else:
        assert re.fullmatch(r"The answer is [0-9]{1,2}\.", text), text


def test_sampled_outputs_keep_their_form_beside_unconstrained_rows(make_tiny_engine, chat_prompt):
    """Seeded sampling under each constraint, all in one batch with a free request, which
    must sample as it does alone (masks stay on their rows)."""
    engine = make_tiny_engine()
    free = SamplingParams(max_tokens=12, temperature=1.0, seed=7)
    [alone] = engine.generate([chat_prompt], free)
    kinds = [k for k in CONSTRAINTS for _ in range(2)]
    params = [
        SamplingParams(max_tokens=60, temperature=1.0, seed=i, structured_output=CONSTRAINTS[k])
        for i, k in enumerate(kinds)
    ]
    outs = engine.generate([chat_prompt] * (len(kinds) + 1), [*params, free])
    assert outs[-1].token_ids == alone.token_ids
    for kind, out in zip(kinds, outs, strict=False):
        if out.finish_reason == "stop":
            _assert_form(kind, out.text)
        else:  # cut by max_tokens: a prefix of the form (sampling may write a long string)
            assert kind in ("json", "json_object") and out.text.startswith("{"), out.text


def test_a_constrained_request_continues_across_the_handoff(make_tiny_engine, chat_prompt):
    for structure in (CONSTRAINTS["json"], CONSTRAINTS["grammar"]):
        p = SamplingParams(max_tokens=24, temperature=0.8, seed=3, structured_output=structure)
        [want] = make_tiny_engine().generate([chat_prompt], p)
        prefill, decode = make_tiny_engine(), make_tiny_engine()
        prefill.add_request("r", chat_prompt, p, prefill_only=True)
        [first] = drain(prefill)["r"]
        assert first.prefilled
        assert decode.import_request(*prefill.export_kv("r"))
        assert prefill.release("r")
        rest = drain(decode)["r"]
        assert first.new_token_ids + [t for o in rest for t in o.new_token_ids] == want.token_ids
        assert rest[-1].finish_reason == want.finish_reason
        assert decode.stats.num_free_blocks == decode.stats.num_kv_blocks


def test_a_complete_form_ends_the_request_even_with_ignore_eos(
    make_tiny_engine, tokenizer, chat_prompt
):
    engine = make_tiny_engine()
    for extra in ({"ignore_eos": True}, {"min_tokens": 10}):
        params = SamplingParams(
            max_tokens=20, temperature=0, structured_output=CONSTRAINTS["regex"], **extra
        )
        [out] = engine.generate([chat_prompt], params)
        assert out.finish_reason == "stop" and re.fullmatch(r"[0-9]{3}-[a-z]{2}", out.text)
    # the first token may complete it: on the prefill side, the request ends there
    whole = tuple(tokenizer.convert_tokens_to_ids(["yes", "no"]))  # not "y", "n", "ye"
    one = SamplingParams(
        max_tokens=5,
        temperature=0,
        structured_output=CONSTRAINTS["yes_no"],
        allowed_token_ids=whole,
    )
    engine.add_request("c", chat_prompt, one, prefill_only=True)
    [out] = drain(engine)["c"]
    assert out.finish_reason == "stop" and not out.prefilled and out.new_text in ("yes", "no")
    assert engine.stats.num_free_blocks == engine.stats.num_kv_blocks


@pytest.mark.parametrize(
    ("structure", "needle"),
    [
        (StructuredOutput("regex", "(", param="guided_regex"), "unclosed group"),
        (StructuredOutput("json", '{"type": 5}', param="response_format"), "type must be"),
        (StructuredOutput("json", "{not json"), "invalid json"),
        (StructuredOutput("grammar", "root ::= missing_rule"), "invalid grammar"),
        (StructuredOutput("choice", "[]"), "invalid choice"),
        (StructuredOutput("json", "{}", whitespace_pattern="(", param="guided_json"),
         "invalid json"),
        (StructuredOutput("structural_tag", "{}", param="structural_tag"), "'structures' must"),
        (StructuredOutput("structural_tag", "[" * 100_000), "nested too deeply"),
        (StructuredOutput("grammar", "[" * 100_000), "invalid grammar"),
        (StructuredOutput("structural_tag", json.dumps({**TAG_FIELDS, "triggers": ["<g"]})),
         "its begin '<f=a>' starts with no trigger"),
        (StructuredOutput("structural_tag", json.dumps({**TAG_FIELDS, "triggers": [""]})),
         "'triggers' must"),
        (StructuredOutput("structural_tag", json.dumps(
            {**TAG_FIELDS, "structures": [{"begin": "<f=a>", "schema": {"type": 5}, "end": ""}]})),
         "invalid structural_tag"),
    ],
)  # fmt: skip
def test_a_constraint_that_does_not_compile_is_refused(make_tiny_engine, structure, needle):
    engine = make_tiny_engine()
    params = SamplingParams(max_tokens=4, structured_output=structure)
    with pytest.raises(InvalidRequestError, match=re.escape(needle)) as e:
        engine.add_request("bad", "hi", params)
    assert e.value.param == structure.param
    assert not engine.has_unfinished


def test_a_grammar_past_llguidances_limits_is_refused_without_its_backtrace(make_tiny_engine):
    """llguidance asserts its limits in native code: the error it keeps is the assertion and a
    backtrace of its frames, of no use to a client; the request is refused with the first."""
    rules = range(66_000)  # more symbols than llguidance's grammars hold (65525)
    lark = "start: " + " | ".join(f"r{i}" for i in rules) + "\n"
    lark += "\n".join(f'r{i}: "a"' for i in rules)
    structure = StructuredOutput("grammar", lark, param="guided_grammar")
    engine = make_tiny_engine()
    with pytest.raises(InvalidRequestError, match="invalid grammar: .*symbols") as e:
        engine.add_request("big", "hi", SamplingParams(max_tokens=4, structured_output=structure))
    assert "\n" not in str(e.value) and e.value.param == "guided_grammar"
    assert not engine.has_unfinished


CHOICES = ["yes", "yes sir", "é", "日本", "a\nb", "back\\slash", 'quote"', "(paren)", "/x/", ""]


def test_a_choice_masks_as_llguidances_own_choice_grammar(tokenizer):
    """A choice compiles to one Lark terminal (engine/grammar.py), not to llguidance's own
    choice grammar (a rule of alternatives, the second path here): token by token along
    each choice (escapes, other scripts, a prefix of another, the empty string), both allow
    the same tokens and both accept at its end."""
    import llguidance

    grammars = Grammars(tokenizer, len(tokenizer))
    theirs = llguidance.grammar_from("choice", json.dumps(CHOICES))
    ours = StructuredOutput("choice", json.dumps(CHOICES))
    for choice in CHOICES:
        matchers = [grammars.matcher(ours, []), llguidance.LLMatcher(grammars.tokenizer, theirs)]
        for token in [*tokenizer.encode(choice), None]:
            mine, own = (m.compute_bitmask() for m in matchers)
            assert mine == own, (choice, token)
            if token is not None:
                assert all(m.consume_token(token) for m in matchers)
        assert all(m.is_accepting() for m in matchers), choice


def test_thousands_of_choices_are_served(make_tiny_engine):
    """A parser row of llguidance's holds 2000 items: as a rule of alternatives, 2000 choices
    or more failed at their first token; as one terminal, 5000 labels are served."""
    labels = [f"label {i}" for i in range(5000)]
    structure = StructuredOutput("choice", json.dumps(labels), param="guided_choice")
    params = SamplingParams(max_tokens=8, temperature=0.0, structured_output=structure)
    [out] = make_tiny_engine().generate(["Pick one:"], params)
    assert out.text in labels and out.finish_reason == "stop"


def test_requests_copy_one_compile_of_their_constraint(tokenizer, monkeypatch):
    """A constraint compiles once however many requests check it, also at once (a request's n
    choices, each validated on a thread of its own); each request's matcher is a copy that
    moves alone: the first one's mask stays the start's after a second consumed tokens."""
    grammars = Grammars(tokenizer, len(tokenizer))
    digits = StructuredOutput("regex", "[0-9]{2,5}")
    compiles = []

    def slow(structure, grammar_text=grammar.grammar_text):  # what each compile calls
        compiles.append(structure)
        time.sleep(0.2)  # the four checks overlap
        return grammar_text(structure)

    monkeypatch.setattr(grammar, "grammar_text", slow)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(grammars.check, [digits] * 4))
    first = grammars.matcher(digits, [])
    start = first.compute_bitmask()
    second = grammars.matcher(digits, tokenizer.encode("12"))
    assert second.compute_bitmask() != start  # after two digits it may also end
    assert first.compute_bitmask() == start and len(compiles) == 1


def test_first_checks_of_different_constraints_build_the_vocabulary_once(tokenizer, monkeypatch):
    """Checks of two constraints at once, each on its own thread (requests arriving together
    at a fresh replica), build llguidance's view of the vocabulary once, not once each."""
    import llguidance.hf

    built = []

    def slow(*args, build=llguidance.hf.from_tokenizer, **kwargs):
        built.append(1)
        time.sleep(0.2)  # the two checks overlap
        return build(*args, **kwargs)

    monkeypatch.setattr(llguidance.hf, "from_tokenizer", slow)
    grammars = Grammars(tokenizer, len(tokenizer))
    pair = [StructuredOutput("regex", "[0-9]+"), StructuredOutput("regex", "[a-z]+")]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(grammars.check, pair))
    assert len(built) == 1


def test_structured_output_kinds_and_empty_specs_are_checked():
    with pytest.raises(InvalidRequestError, match="kind must be one of"):
        StructuredOutput("xml", "<a/>")
    with pytest.raises(InvalidRequestError, match="regex constraint is empty") as e:
        StructuredOutput("regex", "", param="guided_regex")
    assert e.value.param == "guided_regex"
    assert grammar_text(StructuredOutput("json_object"))  # needs no spec


def test_a_row_left_with_no_token_samples_eos():
    """Pure sampler: constraints that together ban every token (allowed ids that are all bad
    words; a mask of nothing) leave EOS, greedy and sampled, rather than a draw from nothing;
    a mask alone keeps its argmax among the allowed tokens."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    history = [TokenHistory([1, 2], [], eos_token_id=7)] * 3
    banned = SamplingParams(temperature=0, allowed_token_ids=(5,), bad_words_token_ids=((5,),))
    sampled = SamplingParams(temperature=1.0, seed=1)
    bits = torch.zeros(2, 2, dtype=torch.int32)  # packed: row 1 nothing, row 2 tokens 3, 11, 40
    bits[1, 0] = (1 << 3) | (1 << 11)
    bits[1, 1] = 1 << (40 - 32)
    tokens = sample(
        logits, [banned, sampled, SamplingParams(temperature=0)],
        [None, torch.Generator().manual_seed(1), None], history, TokenMasks((1, 2), bits),
    )  # fmt: skip
    assert tokens[:2] == [7, 7]
    assert tokens[2] == max((3, 11, 40), key=lambda t: logits[2, t].item())


def test_request_fields_become_one_constraint():
    """OpenAI's response_format, vLLM's structured_outputs and guided_* -> StructuredOutput,
    naming the field; two constraints, unknown keys and unserved options are refused."""
    from app.protocol import APIError, CompletionRequest, parse

    def params(**fields):
        body = {"model": "m", "prompt": "x", **fields}
        return parse(json.dumps(body).encode(), CompletionRequest).sampling_params(4)

    schema = {"type": "object"}
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": schema}}
    cases = [
        ({"response_format": fmt}, ("json", json.dumps(schema), "response_format")),
        ({"response_format": {"type": "json_object"}}, ("json_object", "", "response_format")),
        ({"structured_outputs": {"regex": "a+"}}, ("regex", "a+", "structured_outputs.regex")),
        ({"guided_choice": ["a", "b"]}, ("choice", '["a", "b"]', "guided_choice")),
        ({"guided_grammar": 'root ::= "a"'}, ("grammar", 'root ::= "a"', "guided_grammar")),
        ({"guided_json": '{"type":"object"}'}, ("json", '{"type":"object"}', "guided_json")),
        ({"response_format": {"type": "structural_tag", **TAG_FIELDS}},
         ("structural_tag", json.dumps(TAG_FIELDS), "response_format")),
        ({"structured_outputs": {"structural_tag": json.dumps(TAG_FIELDS)}},
         ("structural_tag", json.dumps(TAG_FIELDS), "structured_outputs.structural_tag")),
        ({"structured_outputs": {"structural_tag": TAG_FIELDS}},
         ("structural_tag", json.dumps(TAG_FIELDS), "structured_outputs.structural_tag")),
        ({"structural_tag": json.dumps(TAG_FIELDS)},
         ("structural_tag", json.dumps(TAG_FIELDS), "structural_tag")),
    ]  # fmt: skip
    for fields, (kind, spec, param) in cases:
        so = params(**fields).structured_output
        assert (so.kind, so.spec, so.param, so.any_whitespace) == (kind, spec, param, True)
    tight = params(structured_outputs={"json": schema, "disable_any_whitespace": True})
    assert not tight.structured_output.any_whitespace
    for fields in (
        {"guided_json": schema, "guided_whitespace_pattern": "[ ]?"},
        {"structured_outputs": {"json_object": True, "whitespace_pattern": "[ ]?"}},
    ):
        assert params(**fields).structured_output.whitespace_pattern == "[ ]?"
    assert params(response_format={"type": "text"}).structured_output is None
    refused = [
        ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex"),
        ({"structured_outputs": {"regx": "a"}}, "structured_outputs.regx"),
        ({"response_format": {"type": "structural_tag", "triggers": ["<f"]}}, "response_format"),
        (
            {"response_format": {"type": "structural_tag", "format": {"type": "triggered_tags"}}},
            "response_format",
        ),  # xgrammar's later form
        (
            {"structured_outputs": {"whitespace_pattern": " "}},
            "structured_outputs.whitespace_pattern",
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern"),  # no JSON to shape
        ({"guided_regex": "a", "guided_whitespace_pattern": " "}, "guided_whitespace_pattern"),
        ({"structured_outputs": {"regex": ""}}, "structured_outputs.regex"),
    ]
    for fields, param in refused:
        with pytest.raises(APIError) as e:
            params(**fields)
        assert (e.value.status, e.value.param) == (400, param), fields


def test_a_failing_parser_ends_its_request_with_an_error_and_frees_it(make_tiny_engine, tokenizer):
    """llguidance gives up on a lexeme repeated a million times: at the second token here. The
    request ends ("abort") with an InvalidRequestError naming the field, its blocks go back,
    the engine serves on. An EOS forced because nothing else was left is no error."""
    engine = make_tiny_engine()
    huge = StructuredOutput("grammar", "start: /[0-9]/ /a{1000000}/", param="guided_grammar")
    engine.add_request("r", "The capital of France is", SamplingParams(structured_output=huge))
    outs = drain(engine)["r"]
    assert [o.error for o in outs[:-1]] == [None] and re.fullmatch("[0-9]", outs[0].new_text)
    assert outs[-1].finish_reason == "abort"
    assert outs[-1].error.param == "guided_grammar"
    assert "failed at output token 2: lexer error" in str(outs[-1].error)
    assert engine.stats.num_free_blocks == engine.stats.num_kv_blocks
    maybe = tuple(tokenizer.encode(" maybe"))  # allowed, and not a way to write yes or no
    for ignore_eos in (False, True):
        params = SamplingParams(
            structured_output=CONSTRAINTS["yes_no"],
            allowed_token_ids=maybe,
            ignore_eos=ignore_eos,
        )
        [out] = engine.generate(["Yes or no?"], params)
        assert (out.token_ids, out.finish_reason) == ([tokenizer.eos_token_id], "stop")


def test_constrained_requests_survive_preemption(make_tiny_engine, chat_prompt):
    """A request preempted (its KV dropped and recomputed) keeps its parser where it was: the
    outputs equal those of an engine with room for all."""
    story = {"type": "object", "properties": {"story": {"type": "string", "minLength": 300}}}
    long = StructuredOutput(
        "json", json.dumps({**story, "required": ["story"]}), any_whitespace=False
    )
    params = [SamplingParams(max_tokens=28, seed=i, structured_output=long) for i in range(4)]
    roomy = make_tiny_engine().generate([chat_prompt] * 4, params)
    tight = make_tiny_engine(num_kv_blocks=14, block_size=16)  # 4 x (41 + 28) tokens do not fit
    outs = tight.generate([chat_prompt] * 4, params)
    assert tight.num_preemptions > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in roomy]
    assert all(o.text.startswith("{") and '"story"' in o.text for o in outs)
    assert tight.blocks.num_free_blocks == 14


def test_the_batched_masks_equal_each_matchers_own(tokenizer):
    """The engine's masks, computed for all constrained rows at once by llguidance's thread
    pool, equal each matcher's own serial mask, row by row, whatever state each is in; and
    unpacked they allow exactly the tokens whose bits are set."""
    grammars = Grammars(tokenizer, len(tokenizer))
    json_schema = StructuredOutput("json", json.dumps(PERSON))
    digits = StructuredOutput("regex", "[0-9]{2,5}")
    states = [
        grammars.matcher(json_schema, []),
        grammars.matcher(json_schema, tokenizer.encode('{"name": "Al')),
        grammars.matcher(digits, []),
        grammars.matcher(digits, tokenizer.encode("12")),
    ]
    bits = grammars.masks(states)
    for row, matcher in zip(bits, states, strict=True):
        own = torch.frombuffer(bytearray(matcher.compute_bitmask()), dtype=torch.int32)
        # the matcher's own mask has a word of room past the vocabulary (49152 = 32 x 1536)
        assert torch.equal(row, own[: row.numel()]) and not own[row.numel() :].any()
    unpacked = unpack_masks(bits, len(tokenizer))
    for row, words in zip(unpacked, bits, strict=True):
        set_bits = np.unpackbits(words.numpy().view(np.uint8), bitorder="little")
        assert row.nonzero().view(-1).tolist() == np.flatnonzero(set_bits).tolist()
    digits = unpacked[2].nonzero().view(-1).tolist()  # the regex's start: one digit each
    assert sorted(tokenizer.decode([t]) for t in digits) == [str(d) for d in range(10)]
    after_two = unpacked[3].nonzero().view(-1).tolist()  # two digits in: more, or the end
    assert after_two == sorted([*digits, tokenizer.eos_token_id])


def test_the_masks_load_no_compiler(default_model_path):
    """A replica's first constrained request imported llguidance.torch for its masks, whose
    torch.compile kernel loads torch's inductor: 1.5 s on the engine thread (every request of
    the replica held up), in the prefill and again in the decode replica. In a process of
    its own: what the engine imports is the point."""
    code = (
        "import sys; from transformers import AutoTokenizer; from engine.grammar import "
        "Grammars; from engine.sampling_params import StructuredOutput as S; "
        f"t = AutoTokenizer.from_pretrained({str(default_model_path)!r}); "
        "g = Grammars(t, len(t)); bits = g.masks([g.matcher(S('regex', '[0-9]+'), [])]); "
        "print(int(bits.ne(0).sum()), 'torch._inductor' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    allowed_words, inductor = done.stdout.split()
    assert int(allowed_words) > 0 and inductor == "False"


def _follows(grammars, structure, text: str) -> tuple[bool, bool]:
    """Whether a matcher takes every token of `text`, and whether the form is then complete."""
    matcher = grammars.matcher(structure, [])
    ok = all(matcher.consume_token(t) for t in grammars.hf_tokenizer.encode(text))
    return ok, ok and matcher.is_stopped()


@pytest.mark.parametrize(
    ("thinking", "text", "follows", "complete"),
    [
        # the output starts inside a think block: free text (JSON-like too) up to </think>
        ("opened", 'Hm, {"age": "x"} is not it.</think>{"name":"Al","age":3}', True, True),
        ("opened", 'Hm.</think>{"name":"Al"', True, False),
        ("opened", "Hm.</think>Al is 3.", False, False),  # the answer is still constrained
        ("opened", "Still thinking", True, False),
        # a think block may come first, or the answer at once
        ("optional", '<think>Hm.</think>{"name":"Al","age":3}', True, True),
        ("optional", '\n<think>a\nb</think>{"name":"Al","age":3}', True, True),
        ("optional", '{"name":"Al","age":3}', True, True),
        ("optional", 'Hm.</think>{"name":"Al","age":3}', False, False),
        ("", '<think>Hm.</think>{"name":"Al","age":3}', False, False),
    ],
)
def test_a_reasoning_models_constraint_starts_after_its_thinking(
    tokenizer, thinking, text, follows, complete
):
    """vLLM's order with a reasoning parser: the thinking is free, the answer constrained (an
    llguidance grammar with the constraint as its subgrammar)."""
    grammars = Grammars(tokenizer, len(tokenizer))
    structure = StructuredOutput(
        "json", json.dumps(PERSON), any_whitespace=False, thinking=thinking
    )
    assert _follows(grammars, structure, text) == (follows, complete)
    grammars.check(structure)  # compiles
    with pytest.raises(InvalidRequestError, match="thinking"):
        StructuredOutput("json", "{}", thinking="always")


@pytest.mark.parametrize(
    ("structure", "answer"),
    [
        (StructuredOutput("choice", json.dumps(["Paris", "Lyon"])), "Lyon"),
        (StructuredOutput("regex", "[0-9]{3}"), "123"),
        (StructuredOutput("grammar", 'start: "a" "b"'), "ab"),
        (StructuredOutput("grammar", 'root ::= "a" "b"'), "ab"),  # GBNF
        (StructuredOutput("json_object"), '{"a": 1}'),
    ],
)
def test_every_kind_of_constraint_follows_the_thinking(tokenizer, structure, answer):
    grammars = Grammars(tokenizer, len(tokenizer))
    thinking = dataclasses.replace(structure, thinking="opened")
    grammars.check(thinking)
    assert _follows(grammars, thinking, f"Hm, {answer}?</think>{answer}") == (True, True)
    assert _follows(grammars, thinking, f"Hm.</think>x{answer}")[0] is False


def test_the_think_block_takes_the_parsers_own_tags(tokenizer):
    grammars = Grammars(tokenizer, len(tokenizer))
    tags = ("[THINK]", "[/THINK]")  # Magistral's: regex characters in them
    structure = StructuredOutput("regex", "[0-9]+/[0-9]+", thinking="optional", think_tags=tags)
    assert _follows(grammars, structure, "[THINK]a/b [x]</think>[/THINK]1/2") == (True, False)
    assert _follows(grammars, structure, "<think>a</think>1/2")[0] is False


WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TAGS = StructuredOutput(
    "structural_tag",
    json.dumps({
        "structures": [
            {"begin": "<function=get_weather>", "schema": WEATHER, "end": "</function>"},
            {"begin": "<function=get_time>", "schema": {"type": "object"}, "end": "</function>"},
        ],
        "triggers": ["<function="],
    }),
    any_whitespace=False,
)  # fmt: skip


@pytest.mark.parametrize(
    ("text", "follows"),
    [
        ("Let me check the weather.", True),  # free text: no trigger, anything goes
        ('Sure. <function=get_weather>{"city":"Paris"}</function> Done.', True),
        ('<function=get_time>{}</function><function=get_weather>{"city":"Lyon"}</function>', True),
        ("<function=get_news>{}</function>", False),  # a trigger, then no structure's begin
        ('<function=get_weather>{"town":"Paris"}</function>', False),  # not the schema's
        ('<function=get_weather>{"city":"Paris"} and', False),  # not its end
    ],
)
def test_structural_tags_constrain_only_what_follows_a_trigger(tokenizer, text, follows):
    """vLLM's structural_tag: free text, and where it writes a trigger, one of the structures
    beginning with it (its begin, JSON under its schema, its end); the form is never complete
    (free text may always follow: EOS ends the reply)."""
    grammars = Grammars(tokenizer, len(tokenizer))
    grammars.check(TAGS)
    assert _follows(grammars, TAGS, text) == (follows, False)


def test_a_whitespace_pattern_shapes_the_whitespace_between_json_tokens(tokenizer):
    """vLLM's guided_whitespace_pattern / structured_outputs.whitespace_pattern (llguidance's
    x-guidance whitespace_pattern), in place of any whitespace or none; JSON kinds only."""
    grammars = Grammars(tokenizer, len(tokenizer))
    one_space = StructuredOutput("json", json.dumps(PERSON), whitespace_pattern="[ ]?")
    grammars.check(one_space)
    assert _follows(grammars, one_space, '{"name": "Al", "age": 3}') == (True, True)
    assert _follows(grammars, one_space, '{"name":"Al","age":3}') == (True, True)
    assert _follows(grammars, one_space, '{\n"name": "Al"')[0] is False
    assert _follows(grammars, CONSTRAINTS["json"], '{"name": "Al"')[0] is False  # none at all
    tags = dataclasses.replace(TAGS, whitespace_pattern="\n?")
    assert _follows(grammars, tags, '<function=get_weather>{\n"city":"Paris"}</function>')[0]
    with pytest.raises(InvalidRequestError, match="shapes JSON only"):
        StructuredOutput("regex", "a+", whitespace_pattern=" ")


def test_structural_tags_follow_the_thinking(tokenizer):
    grammars = Grammars(tokenizer, len(tokenizer))
    thinking = dataclasses.replace(TAGS, thinking="opened")
    grammars.check(thinking)
    call = '<function=get_weather>{"city":"Paris"}</function>'
    # a trigger inside the thinking is free text; after it, the tags hold
    assert _follows(grammars, thinking, f"Hm, <function=x?</think>So {call} ok") == (True, False)
    assert _follows(grammars, thinking, "Hm.</think><function=x>{}</function>")[0] is False


def test_structural_tags_greedy_equals_transformers_under_the_same_tags(
    make_tiny_engine, tiny_hf_model, tokenizer, chat_prompt
):
    """The model's own text up to the trigger (the second word it writes), then the
    structure, then free text again: token for token transformers' greedy generate under the
    same grammar."""
    free_params = SamplingParams(max_tokens=30, temperature=0)
    [free] = make_tiny_engine().generate([chat_prompt], free_params)
    word = tokenizer.decode(free.token_ids[1:2])
    person = {"begin": word, "schema": PERSON, "end": "."}
    fields = {"structures": [person], "triggers": [word]}
    tags = StructuredOutput("structural_tag", json.dumps(fields), any_whitespace=False)
    [out] = make_tiny_engine().generate(
        [chat_prompt], dataclasses.replace(free_params, structured_output=tags)
    )
    assert out.token_ids == _hf_constrained(tiny_hf_model, tokenizer, chat_prompt, tags, 30)
    head, trigger, rest = out.text.partition(word)
    assert trigger and free.text.startswith(head + trigger)  # free until the trigger
    value, end = json.JSONDecoder().raw_decode(rest.lstrip())
    assert isinstance(value["name"], str) and isinstance(value["age"], int)
    assert rest.lstrip()[end:].startswith(".")  # the structure's end, then free text
    assert out.token_ids != free.token_ids
