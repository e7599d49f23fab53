"""bench/check_endpoint.py's own logic: the greedy texts compared or kept, and a server that
does not answer fails every check (the checks against a real server: tests/test_serve.py)."""

from __future__ import annotations

import json
import socket

import pytest

from bench import check_endpoint

pytestmark = pytest.mark.unit


def test_greedy_texts_are_kept_then_compared(tmp_path):
    path = tmp_path / "greedy.json"
    texts = {"completion": " Paris.", "chat": "Red, green, blue."}
    assert check_endpoint.compare_greedy(texts, path) == []  # kept
    assert json.loads(path.read_text()) == texts
    assert check_endpoint.compare_greedy(texts, path) == []
    [diff] = check_endpoint.compare_greedy({**texts, "chat": "Red."}, path)
    assert diff.startswith("chat: 'Red.'") and "'Red, green, blue.'" in diff


def test_a_server_that_does_not_answer_fails_every_check(capsys):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert check_endpoint.main(["--url", f"http://127.0.0.1:{port}"]) == 1
    lines = capsys.readouterr().out.splitlines()
    names = check_endpoint.CHECKS
    assert [line.split()[:2] for line in lines[:-1]] == [["FAIL", f"{n}:"] for n in names]
    assert lines[-1] == f"{len(names)} FAILED"


def test_a_server_never_ready_fails_the_wait_at_its_end(capsys, monkeypatch):
    """--wait-s: /health polled until 200 or the time is up (a port nothing listens on)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    monkeypatch.setattr(check_endpoint.time, "sleep", lambda s: None)
    clock = iter(range(1000))
    monkeypatch.setattr(check_endpoint.time, "monotonic", lambda: next(clock))
    assert not check_endpoint.wait_until_ready(url, 5)
    assert check_endpoint.main(["--url", url, "--wait-s", "3"]) == 1
    assert capsys.readouterr().out == "FAIL ready: /health not 200 within 3 s\n"


def test_the_wait_ends_at_the_first_200(monkeypatch):
    answers = iter([503, 503, 200])
    asked = []

    def get(url, timeout):
        asked.append(url)
        return type("Response", (), {"status_code": next(answers)})()

    monkeypatch.setattr(check_endpoint.httpx, "get", get)
    monkeypatch.setattr(check_endpoint.time, "sleep", lambda s: None)
    assert check_endpoint.wait_until_ready("http://h:1", 60)
    assert asked == ["http://h:1/health"] * 3
