"""Paged attention on the CPU, reading K/V straight from the block cache (C++ extension, SDPA fallback).

Semantics (decode, one query row per sequence n, query head h, kv head g = h // (H // KVH)):

    L = seq_lens[n];  lo = max(0, L - window) if window else 0
    pos -> cache row (block_table[n, pos // bs], pos % bs)
    out[n, h] = softmax(scale * q[n, h] @ K[lo:L, g]^T) @ V[lo:L, g]        # [d], fp32 accumulation

    q [N, H, d] fp32/bf16 (dim 2 contiguous; a strided view is fine), k_cache/v_cache
    [num_blocks, block_size, KVH, d] contiguous, same dtype; block_table int64 [N, max_blocks] (padding
    past ceil(L / bs) is never read); seq_lens int64 [N]. Output [N, H, d] in q's dtype.

Prefill with cached context (`paged_prefill_attention`): query i sits at position p = start + i and sees
keys [max(0, p + 1 - window), p + 1) of the sequence whose blocks are `block_ids`.

NOTE: the kernel is flash-decoding style (online softmax over 32-key tiles), parallel over
(sequence, kv head) with at::parallel_for; the G = H / KVH query heads of one kv head are processed
together so each K/V row is read from memory once per group, not once per query head, and bf16 is
widened in registers. The gather+SDPA path it replaces copies every sequence's blocks (padded to the
longest sequence) before computing, i.e. it reads the cache, writes a copy and reads it again.
NOTE: the prefill entry reuses the decode inner loop per query row (K/V of the context are re-read
per query row, from cache for short contexts): right for short chunks on top of a long context; a
long prompt chunk is better served by SDPA's GEMMs (measure with bench/attention_micro.py).
"""

from __future__ import annotations

import functools
import logging
from types import ModuleType

import torch
import torch.nn.functional as F

from openlora.kernels.build import build_extension, try_build

logger = logging.getLogger("openlora.kernels")

_DTYPES = (torch.float32, torch.bfloat16)


def load_extension() -> ModuleType:
    """The compiled C++ paged attention module (see openlora.kernels.build). -ffp-contract=off as in
    csrc/decoder_cpu.cpp, which compiles the same source: both builds then round alike."""
    return build_extension("paged_attn", "paged_attention_cpu.cpp", "paged attention", ("-ffp-contract=off",))


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether the C++ kernel can be used (built and loaded); logs the reason once when it cannot."""
    return try_build(load_extension, "paged attention", "attention uses gather + torch SDPA")


def _use_ext(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    return (q.device.type == "cpu" and q.dtype in _DTYPES and k_cache.dtype == q.dtype and q.stride(-1) == 1
            and k_cache.is_contiguous() and available())


def _i64(t: torch.Tensor) -> torch.Tensor:
    """int64 contiguous (no copy when it already is)."""
    return t.to(torch.long).contiguous()


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           window: int | None = None, out: torch.Tensor | None = None,
                           portable: bool = False) -> torch.Tensor:
    """Decode attention of q [N, H, d] against the paged cache -> [N, H, d] (see the module docstring).

    `out` (optional): a contiguous [N, H, d] tensor of q's dtype to write into (e.g. `out[:nd]` of the
    layer's output buffer), saving a copy. `portable=True` runs the scalar C++ kernel (tests only).
    """
    if _use_ext(q, k_cache):
        ext = load_extension()
        return ext.paged_decode(q, k_cache, v_cache, _i64(block_table), _i64(seq_lens), float(scale),
                                int(window or 0), portable, out)
    res = decode_sdpa(q, k_cache, v_cache, block_table, seq_lens, scale, window)
    if out is not None:
        out.copy_(res)
        return out
    return res


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_ids: torch.Tensor, start: int, scale: float, window: int | None = None,
                            out: torch.Tensor | None = None, portable: bool = False) -> torch.Tensor:
    """Causal attention of a chunk q [n, H, d] (positions start .. start+n-1, K/V already written to the
    cache) against the sequence's blocks `block_ids` int64 [nb] -> [n, H, d]."""
    if _use_ext(q, k_cache):
        ext = load_extension()
        return ext.paged_prefill(q, k_cache, v_cache, _i64(block_ids), int(start), float(scale),
                                 int(window or 0), portable, out)
    res = prefill_sdpa(q, k_cache, v_cache, block_ids, start, scale, window)
    if out is not None:
        out.copy_(res)
        return out
    return res


# --- torch fallbacks (gather the blocks, then SDPA with a mask); also the tests' reference ------------------


def decode_sdpa(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                seq_lens: torch.Tensor, scale: float, window: int | None = None) -> torch.Tensor:
    """The gather + SDPA decode path: copies each row's blocks into [N, KVH, max_blocks * bs, d]."""
    N, H, d = q.shape
    nb, bs, kvh, _ = k_cache.shape
    width = block_table.shape[1]
    flat = block_table.reshape(-1)  # [N * width]
    kk = k_cache.view(nb, -1).index_select(0, flat).view(N, -1, kvh, d).transpose(1, 2)  # [N, KVH, L, d]
    vv = v_cache.view(nb, -1).index_select(0, flat).view(N, -1, kvh, d).transpose(1, 2)
    kpos = torch.arange(width * bs, device=q.device)[None, :]
    lens = seq_lens.to(q.device)[:, None]
    mask = kpos < lens
    if window:
        mask &= kpos >= lens - window
    o = F.scaled_dot_product_attention(q.unsqueeze(2), kk, vv, attn_mask=mask[:, None, None, :], scale=scale,
                                       enable_gqa=kvh != H)  # [N, H, 1, d]
    return o.squeeze(2)


def prefill_sdpa(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_ids: torch.Tensor,
                 start: int, scale: float, window: int | None = None) -> torch.Tensor:
    """Gather the sequence's blocks and run causal-with-offset SDPA: [n, H, d] -> [n, H, d]."""
    n, H, d = q.shape
    kvh = k_cache.shape[2]
    ctx = start + n
    kk = k_cache[block_ids].view(-1, kvh, d)[:ctx].transpose(0, 1).unsqueeze(0)  # [1, KVH, ctx, d]
    vv = v_cache[block_ids].view(-1, kvh, d)[:ctx].transpose(0, 1).unsqueeze(0)
    qpos = torch.arange(start, ctx, device=q.device)[:, None]
    kpos = torch.arange(ctx, device=q.device)[None, :]
    mask = kpos <= qpos
    if window:
        mask &= kpos > qpos - window
    o = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), kk, vv, attn_mask=mask, scale=scale,
                                       enable_gqa=kvh != H)  # [1, H, n, d]
    return o.squeeze(0).transpose(0, 1)
