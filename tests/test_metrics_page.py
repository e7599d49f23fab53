"""app/metrics_page.py: the API port's /metrics page, merged from nodes' Prometheus pages as Ray
writes them (the live page of a running application: tests/test_serve.py)."""

from __future__ import annotations

import asyncio
import http.server
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app import metrics_page
from app.metrics_page import NoMetricsError, merge

pytestmark = pytest.mark.unit


def _page(node: str, app_count: float, other_count: float) -> str:
    """A node's page as Ray's metrics agent writes it: Ray's own family, a histogram and a
    counter with a sample of the application "chat" and one of the application "other"."""

    def labels(app: str, **more: str) -> str:
        tags = {"NodeAddress": node, "application": app, "deployment": "Ingress", **more}
        return ",".join(f'{k}="{v}"' for k, v in tags.items())

    lines = [
        "# HELP ray_node_cpu_utilization Total CPU usage",
        "# TYPE ray_node_cpu_utilization gauge",
        f'ray_node_cpu_utilization{{NodeAddress="{node}"}} 12.5',
        "# HELP ray_splitserve_ttft_ms time to first token",
        "# TYPE ray_splitserve_ttft_ms histogram",
    ]
    for app, count in (("chat", app_count), ("other", other_count)):
        lines += [
            f"ray_splitserve_ttft_ms_bucket{{{labels(app, le='100.0')}}} {count}",
            f"ray_splitserve_ttft_ms_bucket{{{labels(app, le='+Inf')}}} {count}",
            f"ray_splitserve_ttft_ms_count{{{labels(app)}}} {count}",
            f"ray_splitserve_ttft_ms_sum{{{labels(app)}}} {count * 40}",
        ]
    lines += ["# HELP ray_splitserve_requests_total finished requests"]
    lines += ["# TYPE ray_splitserve_requests_total counter"]
    for app, count in (("chat", app_count), ("other", other_count)):
        lines += [f"ray_splitserve_requests_total{{{labels(app, finish='stop')}}} {count}"]
    return "\n".join(lines) + "\n"


def _samples(text: str) -> set[tuple]:
    return {
        (s.name, tuple(sorted(s.labels.items())), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_the_page_holds_the_applications_samples_of_every_node_once_per_family():
    pages = [_page("10.0.0.1", 3, 5), _page("10.0.0.2", 4, 6)]
    page = merge(pages, "chat")
    wanted = {s for p in pages for s in _samples(p) if dict(s[1]).get("application") == "chat"}
    assert _samples(page) == wanted
    assert len(wanted) == 2 * 5  # two nodes' histogram (4) and counter (1)
    assert {dict(s[1])["NodeAddress"] for s in wanted} == {"10.0.0.1", "10.0.0.2"}
    # one HELP and one TYPE per family, as Prometheus requires; Ray's own family left out
    types = [line for line in page.splitlines() if line.startswith("# TYPE")]
    assert sorted(types) == [
        "# TYPE ray_splitserve_requests_total counter",
        "# TYPE ray_splitserve_ttft_ms histogram",
    ]
    assert page.count("# HELP ray_splitserve_ttft_ms ") == 1


def test_a_family_first_seen_without_the_applications_samples_is_kept_from_the_next_node():
    others_only = _page("10.0.0.1", 3, 5).replace('application="chat"', 'application="x"')
    page = merge([others_only, _page("10.0.0.2", 4, 6)], "chat")
    assert {dict(s[1])["NodeAddress"] for s in _samples(page)} == {"10.0.0.2"}
    assert len(_samples(page)) == 5


def test_only_the_application_label_itself_selects_a_sample():
    # the application's label text as another label's (sub_application) or inside a value
    # (where its quotes are escaped): neither selects the other application's samples
    decoy = _page("10.0.0.1", 3, 5).replace(
        'deployment="Ingress"', r'deployment="a,application=\"chat\"",sub_application="chat"'
    )
    page = merge([decoy], "chat")
    assert {dict(s[1])["application"] for s in _samples(page)} == {"chat"}
    assert len(_samples(page)) == 5  # the "other" samples stay out
    assert merge([decoy], "nobody") == ""  # no series: an empty page, as Prometheus takes it


def test_a_page_that_does_not_parse_is_left_out():
    good = _page("10.0.0.2", 4, 6)
    broken = _page("10.0.0.1", 3, 5) + 'ray_splitserve_requests_total{application="chat"} many\n'
    assert merge([broken, good], "chat") == merge([good], "chat") != ""


def test_a_node_that_does_not_answer_is_left_out_and_none_answering_is_an_error(monkeypatch):
    text = _page("10.0.0.1", 3, 5)

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            body = text.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        live = f"http://127.0.0.1:{server.server_port}/metrics"
        with http.server.HTTPServer(("127.0.0.1", 0), Page) as closed:
            gone = f"http://127.0.0.1:{closed.server_port}/metrics"  # closed once left
        monkeypatch.setattr(metrics_page, "node_endpoints", lambda: [gone, live])
        assert asyncio.run(metrics_page.scrape("chat")) == merge([text], "chat")
        server.shutdown()
    monkeypatch.setattr(metrics_page, "node_endpoints", lambda: [gone])
    with pytest.raises(NoMetricsError, match="no node's metrics endpoint answered"):
        asyncio.run(metrics_page.scrape("chat"))
    monkeypatch.setattr(metrics_page, "node_endpoints", list)
    with pytest.raises(NoMetricsError, match="no live node exports metrics"):
        asyncio.run(metrics_page.scrape("chat"))


def test_a_histograms_sum_is_its_exact_sum_counters():
    """Ray exports a histogram's sum from its buckets' midpoints; the page shows the exact sum
    that deployments.metrics.Histogram counts beside it (of the same series), and not the
    counter itself; a series with nothing above 0 observed has no counter value: its sum is 0."""
    ingress = 'application="chat",deployment="Ingress",replica="r1"'
    idle = 'application="chat",deployment="Ingress",replica="r2"'
    node = _page("10.0.0.1", 3, 5) + "\n".join(
        [
            "# HELP ray_splitserve_e2e_latency_ms request latency",
            "# TYPE ray_splitserve_e2e_latency_ms histogram",
            f'ray_splitserve_e2e_latency_ms_bucket{{{ingress},le="+Inf"}} 2',
            f"ray_splitserve_e2e_latency_ms_count{{{ingress}}} 2",
            f"ray_splitserve_e2e_latency_ms_sum{{{ingress}}} 60000.0",  # two past the last bound
            f'ray_splitserve_e2e_latency_ms_bucket{{{idle},le="+Inf"}} 1',
            f"ray_splitserve_e2e_latency_ms_count{{{idle}}} 1",
            f"ray_splitserve_e2e_latency_ms_sum{{{idle}}} 2.5",  # a 0 counted at its midpoint
            "# HELP ray_splitserve_e2e_latency_ms_exact_sum_total exact sum",
            "# TYPE ray_splitserve_e2e_latency_ms_exact_sum_total counter",
            f"ray_splitserve_e2e_latency_ms_exact_sum_total{{{ingress}}} 61234.5",
        ]
    )
    page = merge([node + "\n"], "chat")
    assert "exact_sum" not in page
    sums = {
        dict(labels)["replica"]: value
        for name, labels, value in _samples(page)
        if name == "ray_splitserve_e2e_latency_ms_sum"
    }
    assert sums == {"r1": 61234.5, "r2": 0.0}
    # the rest as the node has it: the buckets and counts, and the histogram without a
    # counter (its sum 3 x 40)
    chat = {s for s in _samples(node) if dict(s[1]).get("application") == "chat"}
    unchanged = {s for s in chat if "exact_sum" not in s[0] and "e2e_latency_ms_sum" not in s[0]}
    assert unchanged == {s for s in _samples(page) if "e2e_latency_ms_sum" not in s[0]}
    assert {v for n, _, v in unchanged if n == "ray_splitserve_ttft_ms_sum"} == {120.0}
