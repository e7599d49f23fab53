"""What a beam search costs a running server, against greedy and sampled requests of as many
tokens, and what it finds (the logprob sums of its beams against greedy's).

After `make serve`, in another shell:

    python -m bench.beam_cost                     # http://127.0.0.1:8000, 32 tokens, 3 rounds

Each round sends greedy n=1, sampled n=4, beam n=1 and beam n=4 one after another (EOS
ignored, so every choice has `--max-tokens` tokens); the medians are over the rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import httpx

PROMPT = "The history of the Roman Empire begins"
KINDS = {
    "greedy n=1": {"temperature": 0},
    "sampled n=4": {"temperature": 1.0, "n": 4},
    "beam n=1": {"use_beam_search": True},
    "beam n=4": {"use_beam_search": True, "n": 4},
}


def _post(url: str, body: dict) -> tuple[float, dict]:
    start = time.perf_counter()
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=600)
    elapsed = time.perf_counter() - start
    r.raise_for_status()
    return elapsed, r.json()


def _sums(reply: dict) -> list[float]:
    return [round(sum(c["logprobs"]["token_logprobs"]), 3) for c in reply["choices"]]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    model = httpx.get(f"{args.url}/v1/models", timeout=30).json()["data"][0]["id"]
    base = {"model": model, "prompt": PROMPT, "max_tokens": args.max_tokens, "ignore_eos": True}
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for _ in range(args.rounds):
        for kind, fields in KINDS.items():
            times[kind].append(_post(args.url, {**base, **fields})[0])
    for kind, seconds in times.items():
        print(
            f"{kind}: median {statistics.median(seconds):.2f} s of {[round(s, 2) for s in seconds]}"
        )
    scored = {**base, "logprobs": 0}
    print("logprob sums: greedy", _sums(_post(args.url, {**scored, **KINDS["greedy n=1"]})[1]))
    print("logprob sums: beam n=1", _sums(_post(args.url, {**scored, **KINDS["beam n=1"]})[1]))
    print("logprob sums: beam n=4", _sums(_post(args.url, {**scored, **KINDS["beam n=4"]})[1]))


if __name__ == "__main__":
    main()
