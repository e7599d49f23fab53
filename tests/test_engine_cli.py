"""`python -m engine generate`: the engine alone from the command line."""

from __future__ import annotations

import pytest
import torch

from engine.__main__ import main
from engine.model_runner import ModelRunner
from tests.conftest import hf_greedy

pytestmark = pytest.mark.model

PROMPT = "The capital of France is"


def test_generate_prints_transformers_greedy_text(hf_model, tokenizer, capsys):
    assert main(["generate", "--prompt", PROMPT, "--max-tokens", "8"]) == 0
    expected = tokenizer.decode(hf_greedy(hf_model, tokenizer, PROMPT, 8), skip_special_tokens=True)
    assert capsys.readouterr().out == expected + "\n"


def test_a_bad_value_is_exit_2_with_its_message(capsys):
    assert main(["generate", "--prompt", PROMPT, "--max-tokens", "0"]) == 2
    assert "max_tokens" in capsys.readouterr().err


def test_a_request_the_engine_fails_is_exit_1_with_its_error(monkeypatch, capsys):
    execute = ModelRunner.execute

    def nan_logits(self, model_input):
        return torch.full_like(execute(self, model_input), float("nan"))

    monkeypatch.setattr(ModelRunner, "execute", nan_logits)
    assert main(["generate", "--prompt", PROMPT, "--max-tokens", "8"]) == 1
    assert "error: the engine failed request cli at output token 0" in capsys.readouterr().err
