"""Triton SGMV for GPUs: a shrink kernel (x @ A^T, fp32, scaled) then an expand kernel (v @ Bt into y).

Each program handles BLOCK_M tokens of one segment, so a segment's rows are loaded once per token block
(not once per token), and a segment with many tokens becomes a tiled GEMM. The [N, Rmax] intermediate
is fp32. DoRA segments end the expand with their row scale (openlora/lora/dora.py): the entry d of
each segment picks g and shift rows, and entry 0 is the identity, so the epilogue needs no branch.
Tested on the CPU with TRITON_INTERPRET=1 (set before this module is imported).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from openlora.kernels.backend import LoRABackend
from openlora.lora.batch import LoRABatch, SiteRows


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, v_ptr, tok_ptr, seg_ptr, rowidx_ptr, rowptr_ptr, scale_ptr,
    K, stride_x, stride_a, stride_v,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, FP32_DOT: tl.constexpr,
):
    """v[i, j] = scale[j] * <x[tok[i]], A[rows[j]]> for token slots i and local rows j of one segment."""
    pid_m = tl.program_id(0)
    g = tl.program_id(1)
    pid_r = tl.program_id(2)
    s0 = tl.load(seg_ptr + g)
    s1 = tl.load(seg_ptr + g + 1)
    r0 = tl.load(rowptr_ptr + g)
    r1 = tl.load(rowptr_ptr + g + 1)
    m0 = s0 + pid_m * BLOCK_M
    j0 = pid_r * BLOCK_R
    if (m0 < s1) & (j0 < r1 - r0):
        offs_m = m0 + tl.arange(0, BLOCK_M)  # token slots (positions in token_idx)
        mask_m = offs_m < s1
        tok = tl.load(tok_ptr + offs_m, mask=mask_m, other=0)
        offs_j = j0 + tl.arange(0, BLOCK_R)  # local row numbers within the segment
        mask_j = offs_j < r1 - r0
        rows = tl.load(rowidx_ptr + r0 + offs_j, mask=mask_j, other=0)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            xb = tl.load(x_ptr + tok[:, None] * stride_x + offs_k[None, :],
                         mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BM, BK]
            ab = tl.load(a_ptr + rows[:, None] * stride_a + offs_k[None, :],
                         mask=mask_j[:, None] & mask_k[None, :], other=0.0)  # [BR, BK]
            if FP32_DOT:
                acc += tl.dot(xb.to(tl.float32), tl.trans(ab.to(tl.float32)), input_precision="ieee")
            else:  # 16-bit inputs: exact products, fp32 accumulation
                acc += tl.dot(xb, tl.trans(ab), out_dtype=tl.float32)
        sc = tl.load(scale_ptr + r0 + offs_j, mask=mask_j, other=0.0)
        acc = acc * sc[None, :]
        tl.store(v_ptr + offs_m[:, None] * stride_v + offs_j[None, :], acc,
                 mask=mask_m[:, None] & mask_j[None, :])


@triton.jit
def _expand_kernel(
    v_ptr, bt_ptr, y_ptr, tok_ptr, seg_ptr, rowidx_ptr, rowptr_ptr, dora_ptr, g_ptr, sh_ptr,
    N, stride_v, stride_b, stride_y, stride_g,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_DORA: tl.constexpr, HAS_SHIFT: tl.constexpr,
):
    """y[tok[i], n] = dtype(fp32(y[tok[i], n]) + sum_j v[i, j] * Bt[rows[j], n]) for one segment's slots;
    with HAS_DORA, dtype((fp32(y) + delta) * g[d, n] + shift[d, n]) for the segment's entry d."""
    pid_m = tl.program_id(0)
    g = tl.program_id(1)
    pid_n = tl.program_id(2)
    s0 = tl.load(seg_ptr + g)
    s1 = tl.load(seg_ptr + g + 1)
    r0 = tl.load(rowptr_ptr + g)
    r1 = tl.load(rowptr_ptr + g + 1)
    m0 = s0 + pid_m * BLOCK_M
    if (m0 < s1) & (r1 > r0):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < s1
        tok = tl.load(tok_ptr + offs_m, mask=mask_m, other=0)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for j0 in range(0, r1 - r0, BLOCK_R):
            offs_j = j0 + tl.arange(0, BLOCK_R)
            mask_j = offs_j < r1 - r0
            rows = tl.load(rowidx_ptr + r0 + offs_j, mask=mask_j, other=0)
            vb = tl.load(v_ptr + offs_m[:, None] * stride_v + offs_j[None, :],
                         mask=mask_m[:, None] & mask_j[None, :], other=0.0)  # [BM, BR] fp32
            bb = tl.load(bt_ptr + rows[:, None] * stride_b + offs_n[None, :],
                         mask=mask_j[:, None] & mask_n[None, :], other=0.0)  # [BR, BN]
            acc += tl.dot(vb, bb.to(tl.float32), input_precision="ieee")
        y_ptrs = y_ptr + tok[:, None] * stride_y + offs_n[None, :]
        mask = mask_m[:, None] & mask_n[None, :]
        yb = tl.load(y_ptrs, mask=mask, other=0.0)
        out = yb.to(tl.float32) + acc
        if HAS_DORA:
            d = tl.load(dora_ptr + g)
            out = out * tl.load(g_ptr + d * stride_g + offs_n, mask=mask_n, other=1.0)[None, :]
            if HAS_SHIFT:
                out = out + tl.load(sh_ptr + d * stride_g + offs_n, mask=mask_n, other=0.0)[None, :]
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=mask)


def _triton_plan(batch: LoRABatch, rows: SiteRows) -> tuple[int, int, int]:
    """(longest segment in tokens, largest segment rank, G) from the host copies of the indptrs."""
    seg = batch.seg_indptr_list
    rptr = rows.row_indptr_list or [int(v) for v in rows.row_indptr.tolist()]
    g = len(seg) - 1
    max_n = max((seg[i + 1] - seg[i] for i in range(g)), default=0)
    max_r = max((rptr[i + 1] - rptr[i] for i in range(g)), default=0)
    return max_n, max_r, g


class TritonBackend(LoRABackend):
    """SGMV as two Triton launches per (site, layer); fp32, bf16 and fp16."""

    name = "triton"
    BLOCK_M = 16
    BLOCK_R = 16
    BLOCK_K = 64
    BLOCK_N = 64

    def sgmv(
        self, y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, batch: LoRABatch, site: str,
        layer: int = 0,
    ) -> None:
        if site not in batch.sites or batch.empty:
            return
        rows = batch.sites[site]
        max_n, max_r, g = self._plan(batch, site, "triton", _triton_plan)
        if max_n == 0 or max_r == 0:
            return
        assert x.stride(1) == 1 and y.stride(1) == 1 and a.stride(1) == 1 and bt.stride(1) == 1
        k, n = x.shape[1], y.shape[1]
        v = torch.empty(batch.token_idx.numel(), max_r, dtype=torch.float32, device=x.device)  # [N, Rmax]
        bm, br = self.BLOCK_M, self.BLOCK_R
        grid_s = (triton.cdiv(max_n, bm), g, triton.cdiv(max_r, br))
        _shrink_kernel[grid_s](
            x, a, v, batch.token_idx, batch.seg_indptr, rows.row_idx, rows.row_indptr, rows.row_scale,
            k, x.stride(0), a.stride(0), v.stride(0),
            BLOCK_M=bm, BLOCK_R=br, BLOCK_K=self.BLOCK_K,
            # NOTE: Triton's CPU interpreter (the only way tensors reach here on a CPU) computes 16-bit
            # tl.dot wrongly (garbage of ~1e10), so on CPU the tiles are upcast; on GPUs bf16/fp16 tiles
            # go to the tensor cores with fp32 accumulation (exact products).
            FP32_DOT=x.dtype == torch.float32 or not x.is_cuda,
        )
        grid_e = (triton.cdiv(max_n, bm), g, triton.cdiv(n, self.BLOCK_N))
        dora = rows.seg_dora is not None
        gt = rows.g_table[layer] if dora else v  # [E, out] fp32 (v: an unused placeholder pointer)
        sh = rows.shift_table[layer] if dora and rows.shift_table is not None else gt
        assert gt.stride(1) == 1 and sh.stride(0) == gt.stride(0)
        _expand_kernel[grid_e](
            v, bt, y, batch.token_idx, batch.seg_indptr, rows.row_idx, rows.row_indptr,
            rows.seg_dora if dora else batch.seg_indptr, gt, sh,
            n, v.stride(0), bt.stride(0), y.stride(0), gt.stride(0),
            BLOCK_M=bm, BLOCK_N=self.BLOCK_N, BLOCK_R=br, HAS_DORA=dora, HAS_SHIFT=sh is not gt,
        )
