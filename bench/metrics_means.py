"""What the /metrics page says of a run of requests against what their client measured: the
mean TTFT, inter-token latency and prompt length from the page's exact histogram sums (what a
dashboard's `rate(_sum) / rate(_count)` reads), from the sums Ray's metrics agent would have
exported (each observation at its bucket's midpoint, the rule of Ray 2.60's agent, applied to
the page's bucket counts), and the client's own; then what a scrape of the page costs.

After `make serve`, in another shell:

    python -m bench.metrics_means             # http://127.0.0.1:8000, 20 requests

Requests go one at a time, streamed, with prompts of 8 to 600 words and 8 output tokens;
the page is read before (once the server's earlier requests are all on it) and after (once
Ray has exported all of these), so the server's earlier requests do not count.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

TTFT = "vllm:time_to_first_token_seconds"
ITL = "vllm:inter_token_latency_seconds"
PROMPT_LEN = "vllm:request_prompt_tokens"
EXPORT_WAIT_S = 60.0
EXPORT_INTERVAL_S = 10.0  # Ray's default: a request's series reach the page this much later


def _histograms(url: str, model: str) -> dict[str, dict]:
    """name -> {"count", "sum", "buckets": {upper bound: cumulative count}} of `model`."""
    page = httpx.get(f"{url}/metrics", timeout=30).text
    out: dict[str, dict] = {}
    for family in text_string_to_metric_families(page):
        if family.name not in (TTFT, ITL, PROMPT_LEN):
            continue
        got = out.setdefault(family.name, {"count": 0.0, "sum": 0.0, "buckets": {}})
        for s in family.samples:
            if s.labels.get("model_name") != model:
                continue
            if s.name.endswith("_bucket"):
                le = float(s.labels["le"])
                got["buckets"][le] = got["buckets"].get(le, 0.0) + s.value
            else:
                key = s.name.rsplit("_", 1)[1]
                got[key] += s.value
    return out


def _settled(url: str, model: str) -> dict[str, dict]:
    """The histograms once the server's earlier requests are all on the page: two reads an
    export interval apart that agree."""
    last = _histograms(url, model)
    while True:
        time.sleep(EXPORT_INTERVAL_S + 1)
        now = _histograms(url, model)
        if now == last:
            return now
        last = now


def midpoint_sum(buckets: dict[float, float]) -> float:
    """The sum Ray's agent exports for these cumulative bucket counts: each observation at
    its bucket's midpoint, one past the last bound at twice that bound."""
    bounds = sorted(b for b in buckets if b != float("inf"))
    total, below, lower = 0.0, 0.0, 0.0
    for bound in bounds:
        total += (buckets[bound] - below) * (lower + bound) / 2
        below, lower = buckets[bound], bound
    return total + (buckets.get(float("inf"), below) - below) * 2 * bounds[-1]


def _delta(after: dict, before: dict) -> dict:
    buckets = {k: v - before.get("buckets", {}).get(k, 0.0) for k, v in after["buckets"].items()}
    return {
        "count": after["count"] - before.get("count", 0.0),
        "sum": after["sum"] - before.get("sum", 0.0),
        "buckets": buckets,
    }


def _request(
    client: httpx.Client, url: str, model: str, words: int
) -> tuple[float, list[float], int]:
    """One streamed completion -> (the client's TTFT in s, the intervals between its chunks
    after the first, in s, its prompt tokens)."""
    body = {
        "model": model,
        "prompt": "word " * words,
        "max_tokens": 8,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start, ttft, prompt_tokens = time.perf_counter(), None, 0
    last, intervals = 0.0, []
    with client.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line.removeprefix("data: "))
            now = time.perf_counter() - start
            if chunk["choices"]:
                if ttft is None:
                    ttft = now
                else:
                    intervals.append(now - last)
                last = now
            if chunk.get("usage"):
                prompt_tokens = chunk["usage"]["prompt_tokens"]
    assert ttft is not None
    return ttft, intervals, prompt_tokens


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--scrapes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    model = httpx.get(f"{args.url}/v1/models", timeout=30).json()["data"][0]["id"]
    before = _settled(args.url, model)
    rng = random.Random(args.seed)
    with httpx.Client() as client:  # made outside the clock: building one takes 15-25 ms
        lengths = [rng.randint(8, 600) for _ in range(args.requests)]
        measured = [_request(client, args.url, model, n) for n in lengths]
    deadline = time.monotonic() + EXPORT_WAIT_S
    while True:  # until the page counts every request
        after = _histograms(args.url, model)
        counts = [_delta(after[n], before.get(n, {}))["count"] for n in (TTFT, PROMPT_LEN)]
        if counts == [args.requests] * 2:
            break
        assert time.monotonic() < deadline, f"the page counts {counts} of {args.requests}"
        time.sleep(1)
    client = {
        TTFT: [t for t, _, _ in measured],
        ITL: [i for _, intervals, _ in measured for i in intervals],
        PROMPT_LEN: [n for _, _, n in measured],
    }
    for name, scale, unit in ((TTFT, 1000, "ms"), (ITL, 1000, "ms"), (PROMPT_LEN, 1, "tokens")):
        d = _delta(after[name], before.get(name, {}))
        exact, approx = d["sum"] / d["count"], midpoint_sum(d["buckets"]) / d["count"]
        print(
            f"{name} mean of {len(client[name])} / {d['count']:.0f}: client "
            f"{statistics.mean(client[name]) * scale:.1f} {unit}, page (exact sum) "
            f"{exact * scale:.1f}, Ray's midpoint sum {approx * scale:.1f}"
        )
    seconds, size = [], 0
    for _ in range(args.scrapes):
        start = time.perf_counter()
        page = httpx.get(f"{args.url}/metrics", timeout=30).text
        seconds.append(time.perf_counter() - start)
        size = len(page.splitlines())
    families = sum(1 for line in page.splitlines() if line.startswith("# TYPE"))
    vllm = sum(1 for line in page.splitlines() if line.startswith("# TYPE vllm:"))
    print(
        f"/metrics: {families} families ({vllm} vLLM's), {size} lines, "
        f"median {statistics.median(seconds) * 1000:.0f} ms a scrape of {args.scrapes}"
    )


if __name__ == "__main__":
    main()
