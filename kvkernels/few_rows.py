"""Linear layers for decode-sized batches on CPU: stream each weight matrix once per step.

A decode step multiplies a handful of rows (one per running request) by every weight matrix of
the model, and on a CPU reading those matrices from memory is the step's cost. With
`x @ W^T`, MKL's single-thread paths for 2 or 3 rows read W once per row: measured on the
host of 2026-11-22, the vocabulary matrix (49152 x 576 fp32, 113 MB) costs 11.5 ms for 1
row, 27 ms for 2, 40-47 ms for 3 and 21-24 ms from 4 rows (a packed GEMM); the 30 layers'
matrices of the default model (425 MB) cost 41-44, 58-66, 66-74 and 50-64 ms. `W @ x^T`
with two or more columns streams W once for all of them: 26-30 ms for the 30 layers at 2
columns, 8 ms for the vocabulary matrix. One row is padded to two because MKL's
matrix-vector path (one column) read memory more slowly than its two-column GEMM. Beyond a
few rows the usual orientation is as fast or faster (the layers' matrices from 4 rows, the
vocabulary matrix from about 16), so each Linear switches back above its own limit. Prefill
batches (hundreds of rows) never take this path.

Not every host is that one: on 2026-12-05's (AMX, 10-12 GB/s a core) `W @ x^T` was the slower
orientation, and the few-rows forward doubled a decode step at 1-3 rows. So the engine measures
both on the model's own matrices, once per host (engine/linear_tuning.py), and installs this
forward only at the row counts where it won.

The switch replaces the forward of each nn.Linear instance: the module, its weights (tied
embeddings stay tied) and its hooks (the tensor-parallel all-reduce) are untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

HEAD_MAX_ROWS = 8  # the vocabulary matrix: both orientations cost the same near 16 rows
LAYER_MAX_ROWS = 3  # the layers' matrices: from 4 rows MKL's packed GEMM is as fast


@dataclass(frozen=True)
class FewRows:
    """The row counts at which each kind of Linear takes the few-rows forward: the LM head's
    and the layers'. Which orientation is faster depends on the host (its BLAS paths and its
    memory): engine/linear_tuning.py measures it there."""

    head: frozenset[int] = frozenset(range(1, HEAD_MAX_ROWS + 1))
    layers: frozenset[int] = frozenset(range(1, LAYER_MAX_ROWS + 1))


EVERYWHERE = FewRows()  # every row count up to the limits (what 2026-11-22's host gained from)
NOWHERE = FewRows(frozenset(), frozenset())


def few_rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """F.linear(x, weight, bias) computed as (W @ rows^T)^T, one row padded to two."""
    rows = x.reshape(-1, x.shape[-1])
    n = rows.shape[0]
    if n == 1:
        rows = torch.cat([rows, rows])
    out = torch.mm(weight, rows.t()).t()[:n].contiguous()  # (n, out_features)
    if bias is not None:
        out += bias
    return out.view(*x.shape[:-1], weight.shape[0])


class _FewRowsForward:
    """Bound as a Linear instance's forward: its row counts stream W once, others use F.linear."""

    def __init__(self, linear: nn.Linear, rows: frozenset[int]) -> None:
        self.linear, self.rows = linear, rows

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.linear.weight, self.linear.bias
        if x.numel() // x.shape[-1] not in self.rows:
            return F.linear(x, w, b)
        return few_rows_linear(x, w, b)


def _installed(module: nn.Module) -> bool:
    return isinstance(module.__dict__.get("forward"), _FewRowsForward)


def candidates(model: nn.Module) -> tuple[list[nn.Linear], list[nn.Linear]]:
    """A CPU model's Linears that may take the few-rows forward: (the LM head, the layers').

    The LM head in any dtype (as measured in fp32 and kept since), the layers' Linears only in
    float32: the dtype these measurements cover. A Linear with a forward of its own (Llama 4's
    router) keeps it."""
    head = getattr(model, "lm_head", None)
    heads, layers = [], []
    for module in model.modules():
        if not isinstance(module, nn.Linear) or module.weight.device.type != "cpu":
            continue
        if type(module).forward is not nn.Linear.forward:
            continue
        if module is head:
            heads.append(module)
        elif module.weight.dtype == torch.float32:
            layers.append(module)
    return heads, layers


def install(model: nn.Module, rows: FewRows = EVERYWHERE) -> int:
    """Switch a CPU model's Linear layers to the few-rows forward at `rows` -> how many were
    switched (one with no row count to take keeps its own forward)."""
    heads, layers = candidates(model)
    switched = 0
    for modules, counts in ((heads, rows.head), (layers, rows.layers)):
        for module in modules:
            if counts and not _installed(module):
                module.forward = _FewRowsForward(module, counts)
                switched += 1
    return switched


def uninstall(model: nn.Module) -> int:
    """Back to nn.Linear's own forward everywhere (the benchmark's baseline)."""
    switched = 0
    for module in model.modules():
        if _installed(module):
            del module.forward
            switched += 1
    return switched
