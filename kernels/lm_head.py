"""The LM head for decode-sized batches on CPU: stream the vocabulary matrix once per step.

A decode step projects a handful of hidden states (one per running request) onto the whole
vocabulary: SmolLM2's head is 49152 x 576 floats (113 MB), read from memory every step. With
`x @ W^T`, MKL's small-M path reads W once per row, so 2 or 3 rows cost 2-4x a single row on
one thread (measured on this machine: 11.5 ms for 1 row, 27 ms for 2, 40-47 ms for 3, 21-24 ms
from 4 rows on, when it switches to a packed GEMM). `W @ x^T` streams W once for all rows.
Beyond a few dozen rows (prefill logits, big batches) the usual orientation is as fast or
faster, so the head switches back.
"""

from __future__ import annotations

import torch
from torch import nn

MAX_ROWS = 8  # measured crossover: both orientations cost the same near 16 rows


class FewRowsHead(nn.Module):
    """Wraps the model's `lm_head` Linear (weights shared, tied embeddings stay tied)."""

    def __init__(self, linear: nn.Linear, max_rows: int = MAX_ROWS) -> None:
        super().__init__()
        self.linear = linear
        self.max_rows = max_rows

    @property
    def weight(self) -> torch.Tensor:  # callers that read lm_head.weight still work
        return self.linear.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        rows = hidden.reshape(-1, hidden.shape[-1])
        if rows.shape[0] > self.max_rows:
            return self.linear(hidden)
        out = torch.mm(self.linear.weight, rows.t()).t().contiguous()  # (rows, vocab)
        if self.linear.bias is not None:
            out += self.linear.bias
        return out.view(*hidden.shape[:-1], out.shape[-1])


def install(model: nn.Module) -> bool:
    """Swap a CPU model's Linear `lm_head` for FewRowsHead; False when it does not apply."""
    head = getattr(model, "lm_head", None)
    if not isinstance(head, nn.Linear) or head.weight.device.type != "cpu":
        return False
    model.lm_head = FewRowsHead(head)
    return True
