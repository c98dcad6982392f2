"""Scrubbing in the block pool: which freed blocks must be zeroed, each listed once."""

from __future__ import annotations

from openlora.core.block_pool import BlockPool


def test_freed_blocks_are_listed_for_zeroing_unless_a_prefix_hit_may_reuse_them():
    p = BlockPool(4, enable_caching=True, scrub=True)
    a = p.allocate(2)
    p.mark_cached(a[0], b"h0")  # a full block with a hash: kept for prefix hits
    p.free(list(reversed(a)))
    assert p.take_dirty() == [a[1]]  # the partial block: nobody can read it again
    assert p.take_dirty() == []  # listed once
    b = p.allocate(4)  # evicts the cached block too: its old content is zeroed before reuse
    assert p.take_dirty() == [a[0]]
    p.free(b)
    assert sorted(p.take_dirty()) == sorted(b)
    off = BlockPool(2, enable_caching=True, scrub=False)
    off.free(off.allocate(2))
    assert off.take_dirty() == []
