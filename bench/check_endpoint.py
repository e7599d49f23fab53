"""Check a running server through the official `openai` client, as a user's code would call it.

After `serve run serve_config.yaml` (or `make serve`), in another shell:

    python -m bench.check_endpoint                       # http://127.0.0.1:8000
    python -m bench.check_endpoint --greedy greedy.json  # and compare the greedy texts

Each check prints `OK <name>` or `FAIL <name>: <why>`; the exit status is 0 only if all passed.
They cover what a client of an OpenAI-compatible server relies on: /health and /v1/models;
completions and chat, streamed and not, greedy (the streamed text must equal the whole one, and
`usage` must count it); a forced tool call and a JSON schema (both parse); the Responses API;
vLLM's beam search (n different beams, each token among its step's alternatives, counted);
a 400 with OpenAI's error body for a bad request, after which the server still answers;
/metrics, a Prometheus page (vLLM's route) that holds the model's first-token times under
vLLM's name within METRICS_WAIT_S.

`--greedy FILE`: the greedy texts are compared with the ones FILE holds (another run, another
commit, another mode of the same model), or written there when it does not exist yet.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai

PROMPT = "The capital of France is"
QUESTION = [{"role": "user", "content": "Name three colours."}]
GREEDY = {"temperature": 0, "max_tokens": 24}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            # bounded: a small model's string can run on past any max_tokens
            "properties": {"city": {"type": "string", "maxLength": 24}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
CITY = {
    "type": "object",
    "properties": {  # bounded, as WEATHER's
        "name": {"type": "string", "maxLength": 24},
        "population": {"type": "integer", "maximum": 10**9},
    },
    "required": ["name", "population"],
    "additionalProperties": False,
}
CITY_FORMAT = {"name": "city", "schema": CITY}
CHECKS = (
    "health", "models", "completion", "chat", "tool_call", "json_schema", "responses",
    "beam_search", "bad_request", "metrics",
)  # fmt: skip
# how long a fresh server's /metrics may stay empty: Ray exports a process's metrics every
# 10 s by default, Serve's replicas' first among them
METRICS_WAIT_S = 30.0


class CheckFailed(Exception):
    pass


def expect(condition: bool, why: str) -> None:
    if not condition:
        raise CheckFailed(why)


@dataclass
class Checks:
    """The checks against one server; `greedy` collects the greedy texts by check name."""

    url: str
    client: openai.OpenAI
    model: str = ""
    greedy: dict[str, str] = field(default_factory=dict)

    def health(self) -> None:
        response = httpx.get(f"{self.url}/health", timeout=30)
        expect(response.status_code == 200, f"/health answered {response.status_code}")

    def models(self) -> None:
        models = [m.id for m in self.client.models.list()]
        expect(bool(models), "/v1/models lists no model")
        self.model = self.model or models[0]
        expect(self.model in models, f"{self.model!r} is not among {models}")

    def completion(self) -> None:
        create = self.client.completions.create
        self.greedy["completion"] = _streamed_as_whole(
            create, lambda c: c.text, lambda c: c.text, model=self.model, prompt=PROMPT
        )

    def chat(self) -> None:
        create = self.client.chat.completions.create
        self.greedy["chat"] = _streamed_as_whole(
            create,
            lambda c: c.message.content,
            lambda c: c.delta.content or "",
            model=self.model,
            messages=QUESTION,
        )

    def tool_call(self) -> None:
        named = {"type": "function", "function": {"name": "get_weather"}}
        reply = self.client.chat.completions.create(
            model=self.model,
            messages=[{"role": "user", "content": "What is the weather in Paris?"}],
            tools=[WEATHER],
            tool_choice=named,
            temperature=0,
            max_tokens=64,
        )
        calls = reply.choices[0].message.tool_calls or []
        expect(len(calls) == 1, f"{len(calls)} tool calls")
        expect(calls[0].function.name == "get_weather", f"called {calls[0].function.name!r}")
        arguments = json.loads(calls[0].function.arguments)
        expect(isinstance(arguments.get("city"), str), f"arguments {arguments}")

    def json_schema(self) -> None:
        reply = self.client.chat.completions.create(
            model=self.model,
            messages=[{"role": "user", "content": "Describe Paris as JSON."}],
            response_format={"type": "json_schema", "json_schema": CITY_FORMAT},
            temperature=0,
            max_tokens=96,
            # vLLM's option: no whitespace between the JSON's tokens, which a small (or random)
            # model may otherwise write past any max_tokens
            extra_body={"structured_outputs": {"disable_any_whitespace": True}},
        )
        choice = reply.choices[0]
        expect(choice.finish_reason == "stop", f"{choice.finish_reason}: {choice.message.content}")
        city = json.loads(choice.message.content)
        expect(isinstance(city.get("name"), str), f"name in {city}")
        expect(isinstance(city.get("population"), int), f"population in {city}")

    def responses(self) -> None:
        response = self.client.responses.create(
            model=self.model, input="Say hello.", temperature=0, max_output_tokens=16
        )
        expect(response.status in ("completed", "incomplete"), f"status {response.status}")
        expect(bool(response.output_text), "no output text")

    def beam_search(self) -> None:
        reply = self.client.completions.create(
            model=self.model,
            prompt=PROMPT,
            n=2,
            max_tokens=8,
            logprobs=4,
            extra_body={"use_beam_search": True, "return_token_ids": True},
        )
        ids = [choice.model_extra["token_ids"] for choice in reply.choices]
        expect(len(ids) == 2 and ids[0] != ids[1], f"beams {ids}")
        counted = reply.usage.completion_tokens
        expect(counted == sum(map(len, ids)), f"usage counts {counted} of {ids}")
        for choice in reply.choices:  # a beam's token is among its step's 2n likeliest
            logprobs = choice.logprobs
            for token, top in zip(logprobs.tokens, logprobs.top_logprobs, strict=True):
                expect(token in top, f"{token!r} not among its step's likeliest {top}")

    def bad_request(self) -> None:
        try:
            self.client.completions.create(model=self.model, prompt=PROMPT, max_tokens=-1)
        except openai.BadRequestError as e:  # its message is the error body's
            expect("max_tokens" in str(e), f"the error does not name the field: {e}")
        else:
            raise CheckFailed("max_tokens=-1 was served")
        self.health()  # still serving

    def metrics(self) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        deadline = time.monotonic() + METRICS_WAIT_S
        while True:
            response = httpx.get(f"{self.url}/metrics", timeout=30)
            expect(response.status_code == 200, f"/metrics answered {response.status_code}")
            families = text_string_to_metric_families(response.text)  # raises on a bad page
            # the first-token times of the checks above, under vLLM's name for this model
            if any(
                s.name == "vllm:time_to_first_token_seconds_count"
                and s.labels.get("model_name") == self.model
                and s.value > 0
                for family in families
                for s in family.samples
            ):
                return
            expect(
                time.monotonic() < deadline,
                f"/metrics held no vllm:time_to_first_token_seconds of {self.model!r}"
                f" in {METRICS_WAIT_S} s",
            )
            time.sleep(1)

    def all(self) -> list[tuple[str, Callable[[], None]]]:
        return [(name, getattr(self, name)) for name in CHECKS]


def _streamed_as_whole(create, whole_text, delta_text, **fields) -> str:
    """The greedy reply asked whole, then streamed with usage: the same text and token count
    -> the text."""
    whole = create(**fields, **GREEDY)
    text = whole_text(whole.choices[0])
    expect(bool(text), "an empty reply")
    expect(0 < whole.usage.completion_tokens <= GREEDY["max_tokens"], f"usage {whole.usage}")
    parts, usage = [], None
    stream_options = {"include_usage": True}
    for chunk in create(**fields, **GREEDY, stream=True, stream_options=stream_options):
        parts.extend(delta_text(choice) for choice in chunk.choices)
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
    streamed = "".join(parts)
    expect(streamed == text, f"streamed {streamed!r} but the whole reply was {text!r}")
    expect(usage == whole.usage.completion_tokens, f"streamed usage {usage}")
    return text


def compare_greedy(greedy: dict[str, str], path: Path) -> list[str]:
    """Differences between `greedy` and the texts kept in `path`; writes them if it has none."""
    if not path.exists():
        path.write_text(json.dumps(greedy, indent=1, ensure_ascii=False))
        return []
    kept = json.loads(path.read_text())
    return [
        f"{name}: {text!r}, {path} holds {kept.get(name)!r}"
        for name, text in greedy.items()
        if kept.get(name) != text
    ]


def run(url: str, api_key: str, model: str = "", greedy: Path | None = None) -> list[str]:
    """Every check against the server at `url` -> the report's lines."""
    url = url.rstrip("/")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, timeout=300, max_retries=0)
    checks, lines = Checks(url, client, model), []
    for name, check in checks.all():
        try:
            check()
        except (CheckFailed, openai.OpenAIError, httpx.HTTPError, ValueError, KeyError) as e:
            lines.append(f"FAIL {name}: {type(e).__name__}: {e}")
        else:
            lines.append(f"OK {name}")
    if greedy is not None:
        lines += [f"FAIL greedy {diff}" for diff in compare_greedy(checks.greedy, greedy)]
    return lines


def wait_until_ready(url: str, timeout_s: float, poll_s: float = 1.0) -> bool:
    """Whether /health answered 200 within `timeout_s` (503 while the replicas start, no
    answer while Serve does)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=poll_s * 5).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        if time.monotonic() + poll_s > deadline:
            return False
        time.sleep(poll_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", default="unused", help="the server's, if it asks for one")
    parser.add_argument("--model", default="", help="default: the first /v1/models lists")
    parser.add_argument("--greedy", type=Path, help="compare the greedy texts with this file's")
    parser.add_argument(
        "--wait-s", type=float, default=0.0, help="first wait up to this long for /health 200"
    )
    args = parser.parse_args(argv)
    if args.wait_s and not wait_until_ready(args.url, args.wait_s):
        print(f"FAIL ready: /health not 200 within {args.wait_s:g} s")
        return 1
    lines = run(args.url, args.api_key, args.model, args.greedy)
    print("\n".join(lines))
    failed = sum(line.startswith("FAIL") for line in lines)
    print("ALL OK" if not failed else f"{failed} FAILED")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
