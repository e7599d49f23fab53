"""bench/serving_overhead.py's HTTP side: what it times is the server's, against a local HTTP
server whose stream's timing is known."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from bench import serving_overhead

# a stand-in server's chunks timed against the wall clock
pytestmark = [pytest.mark.unit, pytest.mark.wall_clock]

FIRST_S, INTERVAL_S, CHUNKS = 0.08, 0.03, 4


class _Stream(BaseHTTPRequestHandler):
    """Its first SSE chunk FIRST_S after the request, then one every INTERVAL_S."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        time.sleep(FIRST_S)
        for i in range(CHUNKS):
            if i:
                time.sleep(INTERVAL_S)
            self.wfile.write(b'data: {"choices": []}\n\n')
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_request_is_timed_from_its_sending_not_from_the_clients_building(url, monkeypatch):
    built = httpx.AsyncClient.__init__

    def slow_to_build(self, *args, **kwargs):  # as a TLS context is, tenfold
        time.sleep(0.2)
        built(self, *args, **kwargs)

    monkeypatch.setattr(httpx.AsyncClient, "__init__", slow_to_build)
    ttft, tpot = serving_overhead.http_request(url, "m", [1, 2, 3], CHUNKS)
    assert FIRST_S <= ttft < FIRST_S + 0.1
    assert tpot == pytest.approx(INTERVAL_S, abs=0.015)
