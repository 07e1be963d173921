"""Ref-counted KV blocks and the prefix cache. A full block is keyed by a chained SHA-256 of its
tokens (and, through the parent hash, of every token before it), so a shared prefix is computed
once. No torch: this is bookkeeping only.

NOTE: a block whose ref count drops to 0 keeps its hash and stays findable until it is reused
(LRU order of the free queue); the free count includes such blocks."""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from moeflow.engine.request import Request
from moeflow.utils import cdiv


def hash_block(parent: bytes, token_ids: list[int]) -> bytes:
    """Chained hash of one full block: sha256(parent hash || tokens as int64)."""
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash -> block id
        # Free blocks, least recently freed first; values unused.
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        # Statistics: prompt tokens looked up and found in the prefix cache.
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def blocks_needed(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def get_computed_blocks(self, req: Request) -> list[int]:
        """Leading blocks of `req` already in the prefix cache. At least one token is always left
        to compute, so the step that finishes the prompt yields logits."""
        if not self.enable_prefix_caching:
            return []
        num_full = (req.num_tokens - 1) // self.block_size
        self._update_hashes(req, num_full)
        hits: list[int] = []
        for block_hash in req.block_hashes[:num_full]:
            block = self.cached.get(block_hash)
            if block is None:
                break
            hits.append(block)
        self.num_queried_tokens += req.num_tokens
        self.num_hit_tokens += len(hits) * self.block_size
        return hits

    def allocate_slots(
        self, req: Request, num_new_tokens: int, computed_blocks: list[int] | None = None
    ) -> bool:
        """Grow `req.block_table` to hold its computed tokens, the prefix-cache hits and
        `num_new_tokens` more. Returns False (and changes nothing) when blocks run out."""
        hits = computed_blocks or []
        total = req.num_computed_tokens + len(hits) * self.block_size + num_new_tokens
        num_new_blocks = self.blocks_needed(total) - len(req.block_table) - len(hits)
        free_hits = sum(1 for b in hits if self.ref_counts[b] == 0)
        if num_new_blocks > self.num_free_blocks - free_hits:
            return False
        for block in hits:
            if self.ref_counts[block] == 0:
                del self.free_queue[block]
            self.ref_counts[block] += 1
        if hits:  # only at admission, into an empty table: every hit is a hashed full block
            req.block_table.extend(hits)
            req.num_hashed_blocks = len(req.block_table)
        for _ in range(max(num_new_blocks, 0)):
            block, _ = self.free_queue.popitem(last=False)
            old_hash = self.block_hashes[block]
            if old_hash is not None:
                if self.cached.get(old_hash) == block:
                    del self.cached[old_hash]
                self.block_hashes[block] = None
            self.ref_counts[block] = 1
            req.block_table.append(block)
        return True

    def cache_full_blocks(self, req: Request) -> None:
        """Register the blocks that became full with this step's computed tokens."""
        if not self.enable_prefix_caching:
            return
        num_full = req.num_computed_tokens // self.block_size
        if num_full <= req.num_hashed_blocks:
            return
        self._update_hashes(req, num_full)
        for i in range(req.num_hashed_blocks, num_full):
            block_hash, block = req.block_hashes[i], req.block_table[i]
            if block_hash not in self.cached:
                self.cached[block_hash] = block
                self.block_hashes[block] = block_hash
        req.num_hashed_blocks = num_full

    def free(self, req: Request) -> None:
        """Release `req`'s blocks; the tail enters the free queue first, so it is evicted first."""
        for block in reversed(req.block_table):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0, f"block {block} freed twice"
            if self.ref_counts[block] == 0:
                self.free_queue[block] = None
        req.block_table = []
        req.num_hashed_blocks = 0

    def _update_hashes(self, req: Request, num_full: int) -> None:
        bs = self.block_size
        for i in range(len(req.block_hashes), num_full):
            parent = req.block_hashes[i - 1] if i else b""
            req.block_hashes.append(hash_block(parent, req.tokens_slice(i * bs, (i + 1) * bs)))
