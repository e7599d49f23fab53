"""Paged KV-cache bookkeeping: which physical blocks each request holds. Pure Python.

A request with `n` tokens in the cache holds ceil(n / block_size) blocks, listed in order in its
block table. Without prefix caching, ownership is a plain partition of the pool into the free
list and the requests' tables.

With prefix caching (vLLM's automatic prefix caching), a full block whose tokens are computed is
published under a key that names its tokens and every token before it (a chained digest), and a
new request whose leading full blocks have published keys takes those blocks into its table
instead of computing them: blocks are then shared and reference-counted. A block nobody holds
goes back to the free list and keeps its key until it is handed out again, least recently freed
first, so a prefix stays reusable while the pool has room. Only full blocks are shared and a
request writes only past its computed tokens, so a shared block is never written.

A request's `cache_salt` (vLLM's) starts its chain from a digest of the salt instead of from
nothing: requests share blocks only when they give the same salt (or none), so a tenant cannot
learn, by timing its first token, what another tenant's prompts began with. A request's LoRA
adapter does the same: the same tokens under another adapter have other keys and values.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator


def block_key(parent: bytes, token_ids: list[int]) -> bytes:
    """The key of a full block: its tokens and, through `parent`, all tokens before it. A
    cryptographic digest, so a client cannot craft tokens that take another prompt's KV."""
    return hashlib.blake2b(parent + array("q", token_ids).tobytes(), digest_size=16).digest()


def chain_root(cache_salt: str | None, lora: str | None = None) -> bytes:
    """The parent of a prompt's first block key: nothing, or the digest of its cache salt and
    of its LoRA adapter's name (personalized, so no block's key can equal it)."""
    root = b""
    for value, person in ((cache_salt, b"cache_salt"), (lora, b"lora")):
        if value is not None:
            data = root + value.encode("utf-8", "surrogatepass")
            root = hashlib.blake2b(data, digest_size=16, person=person).digest()
    return root


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = False) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        # free blocks, the next to hand out first; a freed block joins at the end
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._refs = [0] * num_blocks
        self._tables: dict[str, list[int]] = {}
        self._key_of: dict[int, bytes] = {}  # published block -> its key
        self._block_of: dict[bytes, int] = {}  # key -> the block published under it
        self._chains: dict[str, list[bytes]] = {}  # request -> keys of its full blocks so far

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
        new = [self._take_free() for _ in range(missing)]
        self._tables.setdefault(request_id, []).extend(new)
        return new

    def _take_free(self) -> int:
        block, _ = self._free.popitem(last=False)
        key = self._key_of.pop(block, None)  # its old contents are about to be overwritten
        if key is not None:
            del self._block_of[key]
        self._refs[block] = 1
        return block

    def truncate(self, request_id: str, num_tokens: int) -> int:
        """Let go of the request's blocks past those `num_tokens` tokens need (speculative
        decoding's refused drafts); -> how many. Blocks past the computed tokens are the
        request's alone: never published, so never shared."""
        table = self._tables[request_id]
        keep = self.blocks_for(num_tokens)
        for block in table[keep:]:
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free[block] = None
        dropped = max(0, len(table) - keep)
        del table[keep:]
        return dropped

    def free(self, request_id: str) -> int:
        """Let go of all blocks of a request; freeing an unknown request is a no-op."""
        table = self._tables.pop(request_id, None)
        self._chains.pop(request_id, None)
        if table is None:
            return 0
        for block in reversed(table):  # a prefix's tail is handed out again before its head
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free[block] = None
        return len(table)

    # ---- prefix caching ------------------------------------------------------------------------

    def take_cached_prefix(self, request_id: str, token_ids: list[int], root: bytes = b"") -> int:
        """Start `request_id`'s table (it has none) with the published blocks that hold the
        leading full blocks of `token_ids`; -> how many tokens they hold (0 without caching)."""
        return self.take_cached_blocks(request_id, self._chain(token_ids, root))

    def take_cached_blocks(self, request_id: str, keys: Iterable[bytes]) -> int:
        """take_cached_prefix for a caller that has the tokens' prefix_keys already."""
        if not self.enable_caching:
            return 0
        taken, blocks = [], []
        for key in keys:
            block = self._block_of.get(key)
            if block is None:
                break
            taken.append(key)
            blocks.append(block)
        for block in blocks:
            if self._refs[block] == 0:
                del self._free[block]
            self._refs[block] += 1
        self._tables[request_id] = blocks
        self._chains[request_id] = taken
        return len(blocks) * self.block_size

    def prefix_keys(self, token_ids: list[int], root: bytes = b"") -> list[bytes]:
        """The keys the leading full blocks of `token_ids` are (or would be) published under;
        `root`: the request's `chain_root`."""
        return list(self._chain(token_ids, root))

    def _chain(self, token_ids: list[int], root: bytes) -> Iterator[bytes]:
        size, parent = self.block_size, root
        for start in range(0, len(token_ids) - size + 1, size):
            parent = block_key(parent, token_ids[start : start + size])
            yield parent

    def publish(
        self,
        request_id: str,
        num_computed: int,
        token_ids: Callable[[int, int], list[int]],
        root: bytes = b"",
    ) -> None:
        """Publish the request's full blocks among its first `num_computed` tokens not yet
        published; token_ids(start, end) gives its tokens. Where a block with the same tokens is
        already published, that one stays the cached copy."""
        if not self.enable_caching:
            return
        chain = self._chains.setdefault(request_id, [])
        table, size = self._tables[request_id], self.block_size
        for i in range(len(chain), num_computed // size):
            key = block_key(chain[-1] if chain else root, token_ids(i * size, (i + 1) * size))
            chain.append(key)
            block = table[i]
            if key not in self._block_of and block not in self._key_of:
                self._block_of[key], self._key_of[block] = block, key

    def check_integrity(self) -> None:
        """Every block is free xor held, and held as often as the tables list it; published
        keys and blocks map one to one."""
        held: dict[int, int] = {}
        for table in self._tables.values():
            for block in table:
                held[block] = held.get(block, 0) + 1
        free = set(self._free)
        problems = [
            b
            for b in range(self.num_blocks)
            if (b in free) == (b in held) or self._refs[b] != held.get(b, 0)
        ]
        if problems or len(free) != len(self._free):
            raise AssertionError(
                f"block pool corrupt at blocks {problems[:8]}: {len(held)} held + "
                f"{len(self._free)} free != {self.num_blocks}, or a count is wrong"
            )
        if any(self._key_of.get(b) != k for k, b in self._block_of.items()) or len(
            self._key_of
        ) != len(self._block_of):
            raise AssertionError("prefix cache index corrupt")
