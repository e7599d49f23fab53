"""A GPU engine's KV cache sized as a share of its GPU's memory (vLLM's
--gpu-memory-utilization).

The engine may hold `share` of the device's total memory: the weights, the memory its largest
step needs, an allowance for what torch does not allocate itself, and the KV cache in the rest.
The largest step is measured, as vLLM measures it: a prompt step of max_num_batched_tokens
tokens over max_num_seqs sequences runs on a throwaway cache before the real one is allocated,
and torch's peak allocation is read (weights included, the throwaway cache taken out).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Protocol

import torch

from engine.model_runner import ModelInput, SeqInput

GIB = 2**30
# what a GPU engine holds beyond torch's allocations: the CUDA context, cuBLAS workspaces and
# the decode graphs' memory pool (vLLM profiles the last; an allowance here)
NON_TORCH_BYTES = GIB
# the sampler's float32 temporaries per row of logits (probabilities, top-p's sorted copy,
# the penalties' scratch), beyond the logits the profiled step allocates itself
SAMPLER_COPIES = 3


class MemoryProbe(Protocol):
    """What the sizing reads of a device's memory (CudaProbe; tests give their own)."""

    def total(self) -> int: ...
    def free(self) -> int: ...
    def reset_peak(self) -> None: ...
    def peak(self) -> int: ...


@dataclass(frozen=True)
class CudaProbe:
    device: torch.device

    def total(self) -> int:
        return torch.cuda.mem_get_info(self.device)[1]

    def free(self) -> int:
        gc.collect()  # the throwaway runner's cache, whatever still refers to it
        torch.cuda.empty_cache()  # its memory back to the device
        return torch.cuda.mem_get_info(self.device)[0]

    def reset_peak(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)


def profile_batch(tokens: int, seqs: int, max_len: int, block_size: int) -> ModelInput:
    """The largest prompt step a scheduler of `tokens` tokens and `seqs` sequences runs: the
    tokens split over as many sequences as they need (each at most max_len) and at most
    `seqs`, each sampling its last token, each on its own blocks from block 0."""
    count = min(max(1, seqs), tokens)
    count = max(count, -(-tokens // max_len))
    sizes = [tokens // count + (i < tokens % count) for i in range(count)]
    batch, block = [], 0
    for size in sizes:
        blocks = -(-size // block_size)
        batch.append(SeqInput([0] * size, 0, list(range(block, block + blocks)), True))
        block += blocks
    return ModelInput(batch)


def kv_cache_bytes(share: float, total: int, peak: int, free: int) -> int:
    """The bytes the KV cache may take: `share` of `total`, less the measured `peak` (weights
    and the largest step) and NON_TORCH_BYTES; ValueError where that leaves nothing, or more
    than is `free` (another process holds the rest)."""
    budget = int(share * total) - peak - NON_TORCH_BYTES
    if budget <= 0:
        raise ValueError(
            f"gpu_memory_utilization {share}: {share * total / GIB:.2f} GiB of the GPU's "
            f"{total / GIB:.2f} GiB leaves no KV cache past the weights and the largest step "
            f"({peak / GIB:.2f} GiB) and {NON_TORCH_BYTES / GIB:.0f} GiB for CUDA's own; raise "
            "it, or lower max_num_batched_tokens"
        )
    if budget > free:
        raise ValueError(
            f"gpu_memory_utilization {share}: the KV cache would take {budget / GIB:.2f} GiB "
            f"but {free / GIB:.2f} GiB of the GPU is free (other processes hold the rest); "
            "lower it"
        )
    return budget


def sampler_bytes(seqs: int, vocab_size: int) -> int:
    """The sampler's temporaries for a step of `seqs` sampled rows."""
    return SAMPLER_COPIES * seqs * vocab_size * 4
