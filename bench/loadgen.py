"""Open-loop load generator for any OpenAI-compatible server (ours, vLLM, SGLang, ...).

    python -m bench.loadgen --url http://127.0.0.1:8000 --rate 0.5 --num-requests 40 \\
        --input-len 512 --output-len 64 --goodput ttft:8700 tpot:133 [--cv 1.0]
    python -m bench.loadgen --rate 0.2 --dataset sharegpt --goodput ttft:2000 tpot:150
    python -m bench.loadgen --rate 1 --input-len 64 --prefix-len 448 --num-prefixes 4 ...

Requests are sent at their arrival times whatever the server does (open loop: a slow server
builds a queue, as in production), streamed, and timed per request: arrival, first token, last
token, output tokens (from the stream's usage), errors. Bounded in count and in time: requests
still running at the deadline are cancelled and count as failures. `--prefix-len P
--num-prefixes K` put one of K shared P-token prefixes before every prompt (vLLM's benchmark
`--random-prefix-len`; a system prompt): what a prefix cache reuses. Requests are greedy
unless `--temperature` (and `--top-p`, `--top-k`, `--min-p`, vLLM's benchmark's flags) say
otherwise: a sampled workload pays for its draws in every step.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field, replace

import httpx

from bench.datasets import DATASETS, DatasetItem, LengthFilter, load
from bench.metrics import SLO, RequestRecord, summarize
from placement.workload import Workload

GREEDY = {"temperature": 0.0}


@dataclass(frozen=True)
class LoadRequest:
    arrival_s: float  # offset from the start of the run
    prompt: str | list[int]
    max_tokens: int
    ignore_eos: bool = True
    sampling: dict[str, float] = field(default_factory=lambda: dict(GREEDY))  # body fields


def synthetic(
    workload: Workload, rate: float, seed: int = 0, vocab: int = 49152
) -> list[LoadRequest]:
    """Token-id prompts of the workload's lengths at `rate` (arrivals as in the simulator),
    each its shared prefix (if the workload has them) and then tokens of its own."""
    import numpy as np

    rng = np.random.default_rng(seed + 1)
    prefixes = shared_prefixes(workload, seed, vocab)
    return [
        LoadRequest(
            r.arrival_ms / 1e3,
            prefixes[r.prefix_id]
            + rng.integers(100, vocab - 100, r.input_len - r.prefix_len).tolist(),
            r.output_len,
        )
        for r in workload.sample(rate, seed)
    ]


def shared_prefixes(workload: Workload, seed: int = 0, vocab: int = 49152) -> list[list[int]]:
    """The workload's distinct shared prefixes, as token ids ([[]] without them)."""
    import numpy as np

    if workload.prefix_len == 0:
        return [[]]
    rng = np.random.default_rng(seed + 4)
    shape = (workload.num_prefixes, workload.prefix_len)
    return rng.integers(100, vocab - 100, shape).tolist()


def from_dataset(
    items: list[DatasetItem],
    num_requests: int,
    rate: float,
    cv: float = 1.0,
    seed: int = 0,
    shared: Workload | None = None,
) -> list[LoadRequest]:
    """Dataset prompts (drawn with replacement) at `rate`, arrivals as in the simulator; with
    `shared` (a workload with prefixes) each after one of its shared prefixes."""
    shared = shared or Workload(num_requests)
    prefixes = shared_prefixes(shared, seed)
    groups = shared.prefix_ids(num_requests, seed)
    return [
        LoadRequest(t, prefixes[g] + list(items[i].prompt_ids), items[i].output_len)
        for (t, i), g in zip(
            dataset_schedule(len(items), num_requests, rate, cv, seed), groups, strict=True
        )
    ]


def dataset_schedule(
    num_items: int, num_requests: int, rate: float, cv: float = 1.0, seed: int = 0
) -> list[tuple[float, int]]:
    """(arrival s, item index) pairs; the simulator replays the same schedule."""
    import numpy as np

    arrivals = Workload(num_requests, 1, 1, cv=cv).sample(rate, seed)
    picks = np.random.default_rng(seed + 2).integers(0, num_items, num_requests)
    return [(a.arrival_ms / 1e3, int(i)) for a, i in zip(arrivals, picks, strict=True)]


async def _one(client: httpx.AsyncClient, url: str, model: str, req: LoadRequest):
    body = {
        "model": model,
        "prompt": req.prompt,
        "max_tokens": req.max_tokens,
        **req.sampling,
        "ignore_eos": req.ignore_eos,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    arrival = time.perf_counter()  # when it was actually sent (open loop: on schedule)
    first = last = None
    tokens = prompt_tokens = 0
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")[:200]
                return RequestRecord(arrival, None, None, 0, error=f"HTTP {r.status_code}: {text}")
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices"):
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    tokens += 1
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                    prompt_tokens = chunk["usage"]["prompt_tokens"]
    except (httpx.HTTPError, asyncio.CancelledError) as e:
        return RequestRecord(arrival, first, last, tokens, prompt_tokens, type(e).__name__)
    return RequestRecord(arrival, first, last, tokens, prompt_tokens)


def served_model(url: str) -> str:
    """The model the server at `url` lists first (its base model), as vLLM's benchmark takes
    it when none is named."""
    response = httpx.get(f"{url}/v1/models", timeout=30)
    response.raise_for_status()
    return response.json()["data"][0]["id"]


async def run(
    url: str,
    model: str | None,
    requests: list[LoadRequest],
    max_duration_s: float = 600.0,
    progress: bool = True,
) -> tuple[list[RequestRecord], float]:
    """-> (one record per request, wall-clock duration); model None: served_model(url)."""
    from tqdm import tqdm

    model = model or served_model(url)

    bar = tqdm(total=len(requests), disable=not progress, unit="req")
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=32)
    async with httpx.AsyncClient(timeout=httpx.Timeout(max_duration_s), limits=limits) as client:
        t0 = time.perf_counter()

        async def timed(req: LoadRequest):
            await asyncio.sleep(max(0.0, t0 + req.arrival_s - time.perf_counter()))
            record = await _one(client, url, model, req)
            bar.update()
            return record

        tasks = [asyncio.create_task(timed(r)) for r in requests]
        done, pending = await asyncio.wait(tasks, timeout=max_duration_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        duration = time.perf_counter() - t0
    bar.close()
    records = []
    for task, req in zip(tasks, requests, strict=True):
        if task in done and not task.cancelled():
            records.append(task.result())
        else:
            records.append(RequestRecord(t0 + req.arrival_s, None, None, 0, error="deadline"))
    return records, duration


def parse_goodput(specs: list[str]) -> SLO:
    """vLLM's `--goodput ttft:MS tpot:MS` -> an SLO in seconds."""
    targets = {}
    for spec in specs:
        key, _, value = spec.partition(":")
        if key not in ("ttft", "tpot") or not value:
            raise argparse.ArgumentTypeError(f"--goodput takes ttft:MS and tpot:MS, got {spec!r}")
        targets[key] = float(value) / 1e3
    if set(targets) != {"ttft", "tpot"}:
        raise argparse.ArgumentTypeError("--goodput needs both ttft:MS and tpot:MS")
    return SLO(targets["ttft"], targets["tpot"])


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", choices=DATASETS, help="default: synthetic lengths")
    parser.add_argument("--input-len", type=int, default=512, help="synthetic prompt tokens")
    parser.add_argument("--output-len", type=int, default=64, help="synthetic output tokens")
    parser.add_argument("--max-input-len", type=int, default=1024, help="dataset filter")
    parser.add_argument("--max-output-len", type=int, default=512, help="dataset cap")
    parser.add_argument("--cv", type=float, default=1.0, help="1 = Poisson; >1 burstier (Gamma)")
    parser.add_argument("--prefix-len", type=int, default=0, help="shared tokens before prompts")
    parser.add_argument("--num-prefixes", type=int, default=1, help="distinct shared prefixes")
    parser.add_argument("--tokenizer", help="for dataset prompts; default: the embedded model")
    parser.add_argument("--seed", type=int, default=0)
    sampling = parser.add_argument_group("sampling (vLLM's benchmark flags; default: greedy)")
    sampling.add_argument("--temperature", type=float, default=0.0)
    sampling.add_argument("--top-p", type=float, help="not sent unless given")
    sampling.add_argument("--top-k", type=int, help="not sent unless given")
    sampling.add_argument("--min-p", type=float, help="not sent unless given")


def sampling_of(args: argparse.Namespace) -> dict[str, float]:
    """The sampling fields every request's body carries: temperature always (greedy where
    the namespace has none, as a caller's own may not), the others where given."""
    fields = {"temperature": getattr(args, "temperature", 0.0)}
    fields |= {name: getattr(args, name, None) for name in ("top_p", "top_k", "min_p")}
    return {k: v for k, v in fields.items() if v is not None}


def dataset_items(args: argparse.Namespace) -> list[DatasetItem] | None:
    if not args.dataset:
        return None
    from transformers import AutoTokenizer

    from engine.model_store import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model(args.tokenizer)))
    lengths = LengthFilter(max_input=args.max_input_len, max_output=args.max_output_len)
    return load(
        args.dataset, lambda s: tokenizer.encode(s, add_special_tokens=False), 2000, lengths
    )


def workload_of(args: argparse.Namespace, n: int) -> Workload:
    """The synthetic workload (or a dataset's shared prefixes) the flags describe; ValueError
    names what is out of range."""
    return Workload(
        n,
        args.input_len,
        args.output_len,
        cv=args.cv,
        prefix_len=args.prefix_len,
        num_prefixes=args.num_prefixes,
    )


def make_requests(
    args: argparse.Namespace, items: list[DatasetItem] | None, rate: float, n: int
) -> list[LoadRequest]:
    workload = workload_of(args, n)
    if items is not None:
        requests = from_dataset(items, n, rate, args.cv, args.seed, workload)
    else:
        requests = synthetic(workload, rate, args.seed)
    sampling = sampling_of(args)
    return [replace(r, sampling=dict(sampling)) for r in requests]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", help="the served name; default: the first /v1/models lists")
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--num-requests", type=int, default=40)
    parser.add_argument("--goodput", nargs=2, required=True, metavar="KEY:MS")
    parser.add_argument("--max-duration-s", type=float, default=600.0)
    add_workload_args(parser)
    args = parser.parse_args(argv)
    try:
        slo = parse_goodput(args.goodput)
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    try:
        requests = make_requests(args, dataset_items(args), args.rate, args.num_requests)
    except ValueError as e:  # the workload's numbers
        parser.error(str(e))
    records, duration = asyncio.run(run(args.url, args.model, requests, args.max_duration_s))
    print(json.dumps({"rate": args.rate, **summarize(records, slo, duration)}, indent=2))


if __name__ == "__main__":
    main()
