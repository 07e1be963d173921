"""Block manager bookkeeping: reference counts, chained prefix hashes, LRU eviction."""

from __future__ import annotations

from moeflow.engine.block_manager import BlockManager, hash_block
from moeflow.engine.request import Request
from moeflow.sampling_params import SamplingParams


def _req(ids: list[int], rid: str = "r") -> Request:
    return Request(rid, ids, SamplingParams(), max_tokens=8)


def test_hash_chain_depends_on_every_earlier_token() -> None:
    a = hash_block(b"", [1, 2, 3, 4])
    assert a == hash_block(b"", [1, 2, 3, 4])
    assert hash_block(a, [5, 6, 7, 8]) != hash_block(hash_block(b"", [1, 2, 3, 5]), [5, 6, 7, 8])
    assert len(a) == 32


def test_allocate_free_and_prefix_hits() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    r1 = _req(list(range(10)))
    assert bm.get_computed_blocks(r1) == []
    assert bm.allocate_slots(r1, 10)
    assert len(r1.block_table) == 3 and bm.num_free_blocks == 5
    r1.num_computed_tokens = 10
    bm.cache_full_blocks(r1)  # blocks 0 and 1 are full
    assert r1.num_hashed_blocks == 2

    r2 = _req(list(range(8)) + [99, 98], "r2")
    hits = bm.get_computed_blocks(r2)
    assert hits == r1.block_table[:2]
    assert bm.allocate_slots(r2, 2, hits)
    assert [bm.ref_counts[b] for b in hits] == [2, 2]
    assert bm.num_free_blocks == 4

    bm.free(r1)
    bm.free(r2)
    assert bm.num_free_blocks == 8 and all(c == 0 for c in bm.ref_counts)
    # Freed blocks stay findable until reused.
    r3 = _req(list(range(9)), "r3")
    assert len(bm.get_computed_blocks(r3)) == 2


def test_prefix_hit_never_covers_the_last_token() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    r1 = _req(list(range(8)))
    assert bm.allocate_slots(r1, 8)
    r1.num_computed_tokens = 8
    bm.cache_full_blocks(r1)
    bm.free(r1)
    same = _req(list(range(8)), "same")
    assert len(bm.get_computed_blocks(same)) == 1  # the last block is recomputed for logits


def test_out_of_blocks_changes_nothing_and_eviction_drops_hashes() -> None:
    bm = BlockManager(num_blocks=3, block_size=4)
    r1 = _req(list(range(8)))
    assert bm.allocate_slots(r1, 8)
    r1.num_computed_tokens = 8
    bm.cache_full_blocks(r1)
    big = _req(list(range(100, 120)), "big")
    assert not bm.allocate_slots(big, 20)
    assert big.block_table == [] and bm.num_free_blocks == 1
    bm.free(r1)
    assert bm.allocate_slots(big, 12)  # reuses the cached blocks, dropping their hashes
    assert bm.cached == {}
