"""Pool of fixed-size KV blocks with reference counts and a prefix cache (torch-free).

A block is identified by an integer id. Free blocks sit in an LRU queue; a free block may still hold
cached KV (it has a hash) and is reused by a prefix hit until it is evicted by a new allocation.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence


def hash_block(parent: bytes | None, tokens: Sequence[int], salt: str) -> bytes:
    """Content key of one full block: its tokens, every token before it (through the parent's key)
    and the namespace salt (adapter content hashes + tenant). 16-byte blake2b: no practical
    collisions, so one tenant cannot forge a hit on another's blocks."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"root")
    h.update(salt.encode())
    h.update(b"|")
    h.update(",".join(map(str, tokens)).encode())
    return h.digest()


class BlockPool:
    """Reference-counted blocks; free blocks are evicted least recently freed first."""

    def __init__(self, num_blocks: int, enable_caching: bool = True, scrub: bool = False) -> None:
        assert num_blocks > 0
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        # Scrubbing: a block whose content nobody may read again (freed without a cache hash, or a cached
        # block evicted for reuse) is listed in `_dirty` until the runner zeroes it (take_dirty).
        self.scrub = scrub
        self._dirty: list[int] = []
        self._holds = [False] * num_blocks  # holds some request's KV that was not zeroed yet
        self.ref_cnt = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[bytes, int] = {}  # block hash -> block id holding that content

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    def usage(self) -> float:
        """Fraction of blocks held by running requests."""
        return 1.0 - self.num_free / self.num_blocks

    def allocate(self, n: int) -> list[int]:
        """Take n free blocks (the caller checked `num_free`); evicts their cached content."""
        assert n <= self.num_free, "caller must check num_free"
        out = []
        for _ in range(n):
            bid, _ = self.free_queue.popitem(last=False)
            old = self.block_hash[bid]
            if self.scrub and self._holds[bid]:  # evicted cached content: zero it before it is reused
                self._dirty.append(bid)
            self._holds[bid] = True
            if old is not None:
                if self.cached.get(old) == bid:
                    del self.cached[old]
                self.block_hash[bid] = None
            self.ref_cnt[bid] = 1
            out.append(bid)
        return out

    def lookup(self, block_hash: bytes) -> int | None:
        return self.cached.get(block_hash) if self.enable_caching else None

    def touch(self, block_ids: Sequence[int]) -> None:
        """Take a reference on cached blocks found by a prefix hit."""
        for bid in block_ids:
            if self.ref_cnt[bid] == 0:
                del self.free_queue[bid]
            self.ref_cnt[bid] += 1

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference each. Callers pass blocks tail first, so a sequence's last blocks are
        evicted before its first ones (the first ones are the most shareable prefix)."""
        for bid in block_ids:
            self.ref_cnt[bid] -= 1
            assert self.ref_cnt[bid] >= 0, f"block {bid} freed twice"
            if self.ref_cnt[bid] == 0:
                self.free_queue[bid] = None
                if self.scrub and self.block_hash[bid] is None:  # no prefix hit can reuse it: zero it now
                    self._dirty.append(bid)
                    self._holds[bid] = False

    def take_dirty(self) -> list[int]:
        """Blocks to zero now (scrubbing on), each listed once; the caller zeroes them before the next
        forward writes into them."""
        out, self._dirty = self._dirty, []
        return out

    def mark_cached(self, block_id: int, block_hash: bytes) -> None:
        """Record that a full block holds the content `block_hash`."""
        if not self.enable_caching or self.block_hash[block_id] is not None:
            return
        self.block_hash[block_id] = block_hash
        self.cached.setdefault(block_hash, block_id)
