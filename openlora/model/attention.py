"""Paged attention over a flattened batch (new K/V already written into the block cache): row-wise query
rows attend in one batched call, other prefill chunks one call each (causal with offset)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from openlora.kernels import attention_cpu
from openlora.worker.forward_context import AttentionMetadata


def causal_mask(start: int, q_len: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """bool [q_len, start + q_len]: query i (position start + i) sees keys at positions <= its own
    (and, with a sliding window, > its own - window). None when plain is_causal suffices."""
    ctx = start + q_len
    if start == 0 and (window is None or ctx <= window):
        return None
    qpos = torch.arange(start, ctx, device=device)[:, None]
    kpos = torch.arange(ctx, device=device)[None, :]
    m = kpos <= qpos
    if window is not None:
        m &= kpos > qpos - window
    return m


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, H, d]; k, v: [T, KVH, d] (already written to the cache). Returns [T, H * d]."""
    T, H, d = q.shape
    kvh = k.shape[1]
    out = torch.empty(T, H, d, dtype=q.dtype, device=q.device)
    nd = meta.num_rowwise
    if nd and meta.paged_kernel:
        # C++ flash-decoding over the block table: no gathered copy of K/V.
        attention_cpu.paged_decode_attention(q[:nd], k_cache, v_cache, meta.decode_block_table,
                                             meta.decode_seq_lens, scale, meta.window, out=out[:nd])
    elif nd:
        nb = k_cache.shape[0]
        flat = meta.decode_block_table.view(-1)  # [nd * max_blocks]
        # index_select on [num_blocks, block_size * KVH * d] rows: one contiguous copy per block.
        kk = k_cache.view(nb, -1).index_select(0, flat).view(nd, -1, kvh, d).transpose(1, 2)  # [nd, KVH, L, d]
        vv = v_cache.view(nb, -1).index_select(0, flat).view(nd, -1, kvh, d).transpose(1, 2)
        qq = q[:nd].unsqueeze(2)  # [nd, H, 1, d]
        o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=meta.decode_mask, scale=scale,
                                           enable_gqa=kvh != H)
        out[:nd] = o.squeeze(2)
    for p in meta.prefills:
        s, n = p.q_start, p.q_len
        qq = q[s:s + n].transpose(0, 1).unsqueeze(0)  # [1, H, n, d]
        if p.start == 0:
            kk = k[s:s + n].transpose(0, 1).unsqueeze(0)  # [1, KVH, n, d]
            vv = v[s:s + n].transpose(0, 1).unsqueeze(0)
        else:
            ctx = p.start + n
            kk = k_cache[p.block_ids].view(-1, kvh, d)[:ctx].transpose(0, 1).unsqueeze(0)
            vv = v_cache[p.block_ids].view(-1, kvh, d)[:ctx].transpose(0, 1).unsqueeze(0)
        if p.mask is None:
            o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=scale, enable_gqa=kvh != H)
        else:
            o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=p.mask, scale=scale, enable_gqa=kvh != H)
        out[s:s + n] = o.squeeze(0).transpose(0, 1)
    return out.view(T, H * d)
