"""Paged KV-cache bookkeeping: which physical blocks each request owns. Pure Python.

A request with `n` tokens in the cache owns ceil(n / block_size) blocks, listed in order in its
block table. Blocks are never shared (no prefix caching), so ownership is a plain partition of
the pool into a free list and the requests' tables; `check_integrity` verifies exactly that.
"""

from __future__ import annotations

from collections import deque


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._tables: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, request_id: str) -> list[int]:
        return self._tables[request_id]

    def owns(self, request_id: str) -> bool:
        return request_id in self._tables

    def num_missing(self, request_id: str, num_tokens: int) -> int:
        """Blocks still needed so that `request_id` can hold `num_tokens` tokens."""
        have = len(self._tables.get(request_id, ()))
        return max(0, self.blocks_for(num_tokens) - have)

    def can_allocate(self, request_id: str, num_tokens: int, reserve: int = 0) -> bool:
        return self.num_missing(request_id, num_tokens) + reserve <= len(self._free)

    def allocate(self, request_id: str, num_tokens: int) -> list[int]:
        """Grow the request's table to hold `num_tokens` tokens; returns the new block ids."""
        missing = self.num_missing(request_id, num_tokens)
        if missing > len(self._free):
            raise RuntimeError(
                f"allocate({request_id!r}, {num_tokens}) needs {missing} blocks, "
                f"{len(self._free)} free; call can_allocate first"
            )
        new = [self._free.popleft() for _ in range(missing)]
        self._tables.setdefault(request_id, []).extend(new)
        return new

    def free(self, request_id: str) -> int:
        """Return all blocks of a request to the pool; freeing an unknown request is a no-op."""
        table = self._tables.pop(request_id, None)
        if table is None:
            return 0
        self._free.extend(table)
        return len(table)

    def check_integrity(self) -> None:
        owned = [b for table in self._tables.values() for b in table]
        every = owned + list(self._free)
        if len(every) != self.num_blocks or set(every) != set(range(self.num_blocks)):
            raise AssertionError(
                f"block pool corrupt: {len(owned)} owned + {len(self._free)} free "
                f"!= {self.num_blocks}, or a block is listed twice"
            )
