"""What a multi-model application's router costs the front end: the CPU time its processes
(ModelRouter, each Ingress) spend per streamed request, beside a single model's application.

    serve run bench/router_cost.yaml &   # a model alone at /one, two models at /multi
    python -m bench.router_cost --app one --app multi [--requests 20] [--max-tokens 64]

Each app gets `--requests` sequential streamed completions of `--max-tokens` forced tokens
(its first /v1/models name, or `--model`); the CPU time (user + system) of every Ingress and
ModelRouter replica process on this host is read from /proc before and after. Run it on the
host of the replicas, with nothing else served meanwhile.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import httpx

from bench.loadgen import served_model

_FRONT = re.compile(r"ServeReplica:([^:]+):(Ingress[^\s]*|ModelRouter)")


def front_end_processes() -> dict[str, int]:
    """'<app>:<deployment>' -> pid, of every front-end replica process on this host."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            title = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if match := _FRONT.search(title):
            found[f"{match[1]}:{match[2]}"] = int(proc.name)
    return found


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stream(url: str, model: str, prompt: str, max_tokens: int) -> int:
    """One streamed completion -> its SSE events."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True}  # fmt: skip
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as r:
        r.raise_for_status()
        return sum(line.startswith("data: ") for line in r.iter_lines())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="Serve's proxy")
    parser.add_argument("--app", action="append", required=True, help="route prefix = app name")
    parser.add_argument("--model", help="the served name; default: the first /v1/models lists")
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    procs = front_end_processes()
    print(f"front-end processes: {sorted(procs)}")
    for app in args.app:
        url = f"{args.url}/{app}"
        model = args.model or served_model(url)
        before = {name: cpu_seconds(pid) for name, pid in procs.items()}
        events = sum(
            stream(url, model, f"Story {i}:", args.max_tokens) for i in range(args.requests)
        )
        spent = {name: (cpu_seconds(pid) - before[name]) * 1000 for name, pid in procs.items()}
        per_request = ", ".join(
            f"{name} {ms / args.requests:.0f}" for name, ms in sorted(spent.items())
        )
        print(f"/{app} ({model}): {events} events; CPU ms per request: {per_request}")


if __name__ == "__main__":
    main()
