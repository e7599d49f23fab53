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
