"""GET /metrics on the API port, as vLLM serves it: this application's series, from every node.

Ray exports each process's metrics through its node's metrics agent, one Prometheus endpoint
per node on a port Ray picks (`serve run` starts a local cluster without a fixed one). A
Prometheus pointed at the API port, as a vLLM user's is, finds them here instead: the ingress
reads every live node's endpoint, keeps the samples labelled with this application (its own
splitserve_* series and Serve's per-application ones) and answers them as one page, one HELP
and TYPE per family. Any ingress replica answers the same page.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from starlette.responses import Response

from app.protocol import APIError
from app.vllm_metrics import vllm_named
from deployments.metrics import EXACT_SUM

logger = logging.getLogger(__name__)
APP_LABEL = "application"  # the label Serve's metrics API puts on a replica's series
FETCH_TIMEOUT_S = 5.0  # a node whose endpoint is slower is left out of this scrape


class NoMetricsError(RuntimeError):
    """No node's metrics endpoint answered."""


async def answer(app_name: str) -> Response:
    """GET /metrics: `app_name`'s series, ours and under vLLM's names; a 503 when no node's
    metrics endpoint answers."""
    try:
        page = await scrape(app_name)
    except NoMetricsError as e:
        raise APIError(503, str(e), kind="server_error") from None
    return Response(page, media_type=CONTENT_TYPE_LATEST)


async def scrape(app_name: str) -> str:
    """The Prometheus text of `app_name`'s series on every live node of this cluster."""
    urls = await asyncio.to_thread(node_endpoints)
    if not urls:
        raise NoMetricsError("no live node exports metrics (Ray's metrics export port)")
    texts = await _fetch_all(urls)
    if not texts:
        raise NoMetricsError(f"no node's metrics endpoint answered ({', '.join(urls)})")
    # parsing takes ~0.1 ms a sample: off the event loop that streams tokens
    return await asyncio.to_thread(merge, texts, app_name)


def node_endpoints() -> list[str]:
    """The metrics URL of each live node (Ray's metrics export port)."""
    import ray

    urls = []
    for node in ray.nodes():
        port = node.get("MetricsExportPort")
        if node.get("Alive") and port:
            host = node["NodeManagerAddress"]
            host = f"[{host}]" if ":" in host else host  # an IPv6 address
            urls.append(f"http://{host}:{port}/metrics")
    return urls


async def _fetch_all(urls: list[str]) -> list[str]:
    """Each URL's text; one that fails or times out is logged and left out."""
    import aiohttp

    async def fetch(session: aiohttp.ClientSession, url: str) -> str:
        async with session.get(url) as response:
            response.raise_for_status()
            return await response.text()

    timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        results = await asyncio.gather(*(fetch(session, u) for u in urls), return_exceptions=True)
    texts = []
    for url, result in zip(urls, results, strict=True):
        if isinstance(result, BaseException):
            logger.warning("metrics: %s did not answer: %r", url, result)
        else:
            texts.append(result)
    return texts


def merge(texts: Iterable[str], app_name: str) -> str:
    """The families of several Prometheus pages, each holding only `app_name`'s samples, as
    one page (a family found on several pages: its samples of every page, one HELP and TYPE),
    those recorded under vLLM's names named as vLLM names them (app/vllm_metrics.py)."""
    # first the lines that may be the application's, as text (most of a node's page is Ray's
    # own, and parsing costs ~0.1 ms a sample): each of its samples holds this label as
    # written; so may a label named, say, sub_application, so the parsed labels decide
    needle = f'{APP_LABEL}="{_escaped(app_name)}"'
    families: dict[str, Metric] = {}
    for text in texts:
        lines = (line for line in text.splitlines() if line.startswith("#") or needle in line)
        try:  # a page that does not parse is one node's fault: the others' still count
            parsed = list(text_string_to_metric_families("\n".join(lines) + "\n"))
        except ValueError as e:
            logger.warning("metrics: a node's page did not parse, left out: %s", e)
            continue
        for family in parsed:
            samples = [s for s in family.samples if s.labels.get(APP_LABEL) == app_name]
            if family.name in families:
                families[family.name].samples.extend(samples)
            elif samples:
                family.samples = samples
                families[family.name] = family
    merged = vllm_named(_with_exact_sums(families))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(merged))
    return generate_latest(registry).decode()


def _with_exact_sums(families: dict[str, Metric]) -> list[Metric]:
    """The families, each histogram's sums its companion counter's values (Ray exports a
    histogram's sum from its buckets' midpoints: deployments.metrics.Histogram), the
    companions left out. A series whose companion has no value observed nothing above 0."""
    for name in [n for n in families if n.endswith(EXACT_SUM)]:
        sums = families.pop(name)
        histogram = families.get(name.removesuffix(EXACT_SUM))
        if histogram is None or histogram.type != "histogram":
            continue
        exact = {_series(s.labels): s.value for s in sums.samples}
        histogram.samples = [
            s._replace(value=exact.get(_series(s.labels), 0.0))
            if s.name == histogram.name + "_sum"
            else s
            for s in histogram.samples
        ]
    return list(families.values())


def _series(labels: dict[str, str]) -> tuple:
    return tuple(sorted(labels.items()))


class _Families:
    """A prometheus_client collector of families parsed elsewhere."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def _escaped(value: str) -> str:
    """A label value as the Prometheus text format writes it."""
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
