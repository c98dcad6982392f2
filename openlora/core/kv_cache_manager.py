"""Maps requests to KV blocks: prefix-cache lookup, slot allocation, freeing (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass, field

from openlora.core.block_pool import BlockPool, hash_block
from openlora.request import Request


@dataclass
class _SeqBlocks:
    block_ids: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)  # keys of the leading full blocks


class KVCacheManager:
    """Owns the block table of every live request."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 scrub: bool = False) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_prefix_caching, scrub)
        self.seqs: dict[str, _SeqBlocks] = {}
        self.num_hit_tokens = 0
        self.num_query_tokens = 0

    def block_ids(self, request_id: str) -> list[int]:
        return self.seqs[request_id].block_ids

    def _hashes_upto(self, req: Request, num_full_blocks: int, hashes: list[bytes]) -> list[bytes]:
        """Extend `hashes` to cover the first `num_full_blocks` blocks of the request's tokens."""
        bs = self.block_size
        salt = req.cache_salt
        while len(hashes) < num_full_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            toks = [req.token_at(j) for j in range(i * bs, (i + 1) * bs)]
            hashes.append(hash_block(parent, toks, salt))
        return hashes

    def get_computed_blocks(self, req: Request) -> tuple[list[int], int]:
        """Longest cached prefix of full blocks: (block ids, tokens they cover). At least one token
        is always left to compute, so the request still produces logits. A request that asks for prompt
        logprobs takes no hit: every prompt position must be computed to score it (as vLLM does)."""
        if not self.pool.enable_caching or req.sampling_params.prompt_logprobs is not None:
            return [], 0
        max_blocks = (req.num_tokens - 1) // self.block_size
        hashes = self._hashes_upto(req, max_blocks, [])
        hit: list[int] = []
        for h in hashes:
            bid = self.pool.lookup(h)
            if bid is None:
                break
            hit.append(bid)
        self.num_query_tokens += req.num_tokens
        self.num_hit_tokens += len(hit) * self.block_size
        return hit, len(hit) * self.block_size

    def blocks_needed(self, req: Request, num_new_tokens: int, num_computed_blocks: int = 0) -> int:
        """New blocks required to hold `num_new_tokens` more tokens."""
        seq = self.seqs.get(req.request_id)
        have = (len(seq.block_ids) if seq else 0) + num_computed_blocks
        total = req.num_computed_tokens + num_new_tokens
        if seq is None:  # first allocation: computed tokens are those of the hit blocks
            total = num_computed_blocks * self.block_size + num_new_tokens
        need = -(-total // self.block_size)
        return max(0, need - have)

    def allocate_slots(
        self, req: Request, num_new_tokens: int, computed_blocks: list[int] | None = None
    ) -> bool:
        """Reserve blocks for `num_new_tokens` more tokens; False (nothing changed) if the pool is
        short. `computed_blocks` are prefix-cache hits taken on first scheduling."""
        computed_blocks = computed_blocks or []
        # Hit blocks with no other user sit in the free queue: taking them shrinks it too.
        hits_in_free = sum(1 for b in computed_blocks if self.pool.ref_cnt[b] == 0)
        need = self.blocks_needed(req, num_new_tokens, len(computed_blocks))
        if need + hits_in_free > self.pool.num_free:
            return False
        is_new = req.request_id not in self.seqs
        seq = self.seqs.setdefault(req.request_id, _SeqBlocks())
        if computed_blocks:
            self.pool.touch(computed_blocks)
            seq.block_ids.extend(computed_blocks)
        seq.block_ids.extend(self.pool.allocate(need))
        # Blocks that will be full once this step's tokens are written become cacheable now: in one
        # forward pass all new K/V are written before any attention reads the cache.
        start = len(computed_blocks) * self.block_size if is_new else req.num_computed_tokens
        full = (start + num_new_tokens) // self.block_size
        if self.pool.enable_caching and full > len(seq.hashes):
            first = len(seq.hashes)
            self._hashes_upto(req, full, seq.hashes)
            for i in range(first, full):
                self.pool.mark_cached(seq.block_ids[i], seq.hashes[i])
        return True

    def free(self, req: Request) -> None:
        """Release all blocks of a request (tail first)."""
        seq = self.seqs.pop(req.request_id, None)
        if seq is not None:
            self.pool.free(list(reversed(seq.block_ids)))

    @property
    def usage(self) -> float:
        return self.pool.usage()

    @property
    def prefix_hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_query_tokens if self.num_query_tokens else 0.0

    def take_dirty(self) -> list[int]:
        """Freed blocks whose KV must be zeroed now (CacheConfig.scrub_freed_memory); see BlockPool."""
        return self.pool.take_dirty()
