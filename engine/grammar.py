"""Structured outputs: a request's StructuredOutput compiled into an llguidance matcher that
says, before each sampled token, which tokens can continue the output's form.

llguidance (one of vLLM's structured-output backends) builds its parser lazily, token by token,
so a request's own schema costs about a millisecond to start and no vocabulary-sized
precomputation; it has no dependencies beyond a 3 MB wheel. A matcher's state is the output
so far: a decode replica rebuilds it by replaying the tokens the prefill replica sampled.
"""

from __future__ import annotations

import functools
import json
import re
import threading

import torch

from engine.sampling_params import InvalidRequestError, StructuredOutput

# constraints kept compiled per engine: a JSON schema of 20 properties holds ~50 KB, a
# choice of 10k strings ~1 MB (16 of those: 15 MB; 167 MB as llguidance's own choice grammar)
COMPILED = 16


def grammar_text(structure: StructuredOutput) -> str:
    """The llguidance grammar of a constraint (not yet checked: see Grammars.check); with
    `thinking`, free reasoning first, then the constraint (an llguidance grammar that refers
    to the constraint's as a subgrammar)."""
    text = _constraint_text(structure)
    if not structure.thinking:
        return text
    inner = _top_level(text)
    inner["grammars"][0]["name"] = "answer"
    outer = {"lark_grammar": _think_block(structure)}
    return json.dumps({**inner, "grammars": [outer, *inner["grammars"]]})


def _think_block(structure: StructuredOutput) -> str:
    """The Lark start of a reasoning model's output: its think block (lazy: up to the first
    end tag), free, then the constraint's grammar (@answer)."""
    start, end = (_regex(tag) for tag in structure.think_tags)
    if structure.thinking == "opened":
        return f"start: think @answer\nthink[lazy]: /(.|\\n)*{end}/\n"
    return f"start: think? @answer\nthink[lazy]: /[ \\t\\n]*{start}(.|\\n)*{end}/\n"


def _regex(text: str) -> str:
    """`text` as a regex between Lark's slashes."""
    return re.escape(text).replace("/", "\\/")


def _top_level(text: str) -> dict:
    """A grammar as llguidance's list of grammars: JSON already, or a Lark grammar's text
    (what llguidance gives for choices and grammars)."""
    try:
        top = json.loads(text)
    except (json.JSONDecodeError, RecursionError):  # a grammar's text (of any nesting)
        top = None
    return (
        top
        if isinstance(top, dict) and "grammars" in top
        else {"grammars": [{"lark_grammar": text}]}
    )


def _constraint_text(structure: StructuredOutput) -> str:
    import llguidance

    options = structure.json_options
    try:
        if structure.kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}', options)
        if structure.kind == "json":
            return llguidance.LLMatcher.grammar_from_json_schema(structure.spec, options)
        if structure.kind == "choice":
            return _choice_grammar(structure)
        if structure.kind == "structural_tag":
            return _structural_tags(structure)
        return llguidance.grammar_from(structure.kind, structure.spec)
    except ValueError as e:  # not JSON, or a GBNF grammar that does not convert
        raise InvalidRequestError(f"invalid {structure.kind}: {e}", structure.param) from e
    except RecursionError as e:  # JSON nested past Python's recursion limit
        message = f"invalid {structure.kind}: nested too deeply to read"
        raise InvalidRequestError(message, structure.param) from e


def _structural_tags(structure: StructuredOutput) -> str:
    """vLLM's structural tag (xgrammar's first form, which vLLM's llguidance backend serves):
    free text, until the output writes one of the triggers; then one of the structures whose
    begin starts with it: the rest of its begin, a JSON value under its schema, its end; then
    free text again. A ValueError says what is malformed."""
    import llguidance

    spec = json.loads(structure.spec)
    structures = spec.get("structures") if isinstance(spec, dict) else None
    triggers = spec.get("triggers") if isinstance(spec, dict) else None
    if not structures or not isinstance(structures, list):
        raise ValueError("'structures' must be a list of one or more {begin, schema, end}")
    if not triggers or not all(isinstance(t, str) and t for t in triggers):
        raise ValueError("'triggers' must be a list of one or more non-empty strings")
    tags = []
    for i, item in enumerate(structures):
        tag = item if isinstance(item, dict) else {}
        begin, end, schema = tag.get("begin"), tag.get("end"), tag.get("schema") or {}
        if not isinstance(begin, str) or not isinstance(end, str) or not isinstance(schema, dict):
            raise ValueError(f"structures[{i}] needs a begin and an end (text) and a schema")
        trigger = next((t for t in triggers if begin.startswith(t)), None)
        if trigger is None:
            raise ValueError(f"structures[{i}]: its begin {begin!r} starts with no trigger")
        schema = {**schema, "x-guidance": structure.json_options}
        tags.append(llguidance.StructTag(trigger=trigger, begin=begin, grammar=schema, end=end))
    return llguidance.StructTag.to_grammar(tags)


def _choice_grammar(structure: StructuredOutput) -> str:
    """A choice's spec, a JSON list of one or more strings (an empty list would compile to a
    grammar of the empty output), as one Lark terminal that is any of them. llguidance's own
    choice grammar makes each string an alternative of the start rule, and a parser row holds
    at most 2000 items: 2000 choices or more failed at their first token (5000 labels, say),
    and 60k took 12 s to compile. As a terminal the strings go to the lexer, which takes them
    all (100k in 0.8 s, masks ~0.2 ms), with the same masks token by token."""
    choices = json.loads(structure.spec)
    if not choices or not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise InvalidRequestError(
            f"invalid choice: a list of one or more strings, got {structure.spec[:100]}",
            structure.param,
        )
    return "start: CHOICE\nCHOICE: " + " | ".join(json.dumps(c) for c in choices) + "\n"


class Grammars:
    """One engine's structured outputs: its vocabulary as llguidance sees it (built on first
    use: about 0.3 s for a 49k vocabulary) and a matcher per constrained request."""

    def __init__(self, tokenizer, vocab_size: int) -> None:
        self.hf_tokenizer = tokenizer
        self.vocab_size = vocab_size  # the logits' width, which may exceed the tokenizer's
        self._tokenizer = None
        # the first checks of different constraints run at once, each on its own thread, and
        # would each build the vocabulary's view (~0.45 s of CPU)
        self._tokenizer_lock = threading.Lock()
        self._executor = None  # llguidance's thread pool for the masks, made on first use
        # Each constraint is compiled once, by its first check (a replica's, off its event
        # loop and its engine thread: deployments/engine_loop.py), and each request's matcher
        # is a copy of that one, which shares its compiled grammar (microseconds). Compiling
        # takes seconds for the largest constraints (30k choices ~1 s, 60k ~7 s, in native
        # code with the GIL released), once on the engine thread: every request of the
        # replica waited that long. Also spares a request's n choices, and requests sharing
        # a schema, compiling it again. Kept: the last COMPILED of them (thread-safe).
        self._compiled = functools.lru_cache(maxsize=COMPILED)(self._compile)
        # one compile per constraint at a time: a request's n choices are validated at once,
        # each on its own thread, and would otherwise each compile it (n x the CPU)
        self._compiling: dict[StructuredOutput, threading.Lock] = {}
        self._compiling_guard = threading.Lock()

    @property
    def tokenizer(self):
        with self._tokenizer_lock:
            if self._tokenizer is None:
                import llguidance.hf

                self._tokenizer = llguidance.hf.from_tokenizer(
                    self.hf_tokenizer, n_vocab=self.vocab_size
                )
        return self._tokenizer

    def check(self, structure: StructuredOutput) -> None:
        """Raise InvalidRequestError (naming the request's field) for a constraint that does
        not compile: a malformed schema, regex or grammar, or one past llguidance's limits."""
        self._template(structure)

    def matcher(self, structure: StructuredOutput, output_ids: list[int]):
        """A matcher for the constraint, advanced past the output so far (a request imported
        after its prefill, or restarted)."""
        matcher = self._template(structure).deep_copy()
        for token in output_ids:
            matcher.consume_token(token)
        return matcher

    def _template(self, structure: StructuredOutput):
        """The constraint's compiled matcher, at the start of the output: copied, never
        advanced."""
        with self._compiling_guard:
            lock = self._compiling.setdefault(structure, threading.Lock())
        try:
            with lock:  # the later callers find it compiled
                matcher, error = self._compiled(structure)
        finally:
            with self._compiling_guard:
                self._compiling.pop(structure, None)
        if error:
            raise InvalidRequestError(error, structure.param)
        return matcher

    def _compile(self, structure: StructuredOutput) -> tuple[object | None, str]:
        """(the constraint's matcher, "") or (None, what is wrong with it)."""
        import llguidance

        try:
            text = grammar_text(structure)
        except InvalidRequestError as e:
            return None, str(e)
        matcher = llguidance.LLMatcher(self.tokenizer, text, log_level=0)
        if matcher.is_error():
            # a limit's assertion comes with a native backtrace: of no use to a client
            error = matcher.get_error().split("\n<backtrace>")[0]
            return None, f"invalid {structure.kind}: {error}"
        return matcher, ""

    def masks(self, matchers: list) -> torch.Tensor:
        """(n, W) int32, bit k of word j set where token 32 j + k can continue matcher i's
        output (EOS once it may end): llguidance's packed bitmask, one row per matcher,
        computed by its thread pool with the GIL released (the rows in parallel, where the
        engine used to ask one matcher after another)."""
        # not llguidance.torch: importing it compiles a kernel with torch.compile, which
        # loads torch's inductor: 1.5 s on the engine thread at a replica's first
        # constrained request, every request of the replica held up that long
        import llguidance.numpy

        if self._executor is None:
            self._executor = llguidance.LLExecutor()
        bits = llguidance.numpy.allocate_token_bitmask(len(matchers), self.vocab_size)
        rows = [(m, i) for i, m in enumerate(matchers)]
        llguidance.numpy.fill_next_token_bitmask_par(self._executor, rows, bits)
        return torch.from_numpy(bits)


def advance(matcher, token: int, eos_token_id: int | None) -> tuple[bool, str | None]:
    """Advance the matcher past a sampled token -> (the request ends here, the parser's error).
    It ends when the form is complete (nothing may follow) or at an EOS the form did not allow
    (the sampler forces EOS where every token was banned); any other refused token means the
    parser failed (a limit of llguidance's, e.g. a regex repeating a million times), named in
    the error."""
    if matcher.consume_token(token):
        return matcher.is_stopped(), None
    if token == eos_token_id:
        return True, None
    return True, matcher.get_error().split("\n<state>")[0] or "the parser refused the token"
