"""Quantized linear layers on GPUs through Triton: y = x @ W^T (+ bias), W packed by triton_quant_pack.pack,
x [..., K] fp32, bf16 or fp16, y [..., N] in x's dtype.

Modes (the same semantics as the CPU path, openlora/kernels/quant_gemm.py):
    "w8a16", "w4a16"  codes are loaded per [BLOCK_N, BLOCK_K] tile (4-bit: two nibbles per byte), the zero
        point is subtracted in registers (u - z is a small integer, exact in bf16/fp16), and tl.dot
        multiplies x by it with fp32 accumulation; per group, the sum is scaled once and the min term is
        added as min * sum(x over the group):  y = sum_g s[n, g] x_g . (u - z)[n, g] + m[n, g] sum(x_g).
    "w8a8"  activations quantized per token and per group at run time (a small kernel):
        sx[m, g] = max|x[m, group g]| / 127 (1 where that is 0), xq = clamp(rint(x / sx), -127, 127) int8,
        then int8 x int8 -> int32 tl.dot per group (tensor cores) with the scale epilogue per group:
        y[m, n] = sum over g in order of float(isum[m, n, g]) * (sx[m, g] * sw[n, g]), plus bias.

    pack(w, mode, device) -> TritonQuant     (re-exported from triton_quant_pack)
    linear(x, packed, bias=None) -> y
    quantize_activations(x, packed) -> (xq int8 [M, K] in stored column order, sx fp32 [M, G])  (w8a8)

NOTE: Triton's CPU interpreter (TRITON_INTERPRET=1, how the tests run these kernels without a GPU)
computes bf16 tl.dot wrongly, so off-GPU 16-bit tiles are upcast to fp32 (exact: the products of a
16-bit x and small integer codes are the same numbers). fp32 x takes an IEEE fp32 dot everywhere (the
1e-10 normalized error bound of the fp32 path rules out TF32). The interpreter also truncates fp32 ->
bf16 on store (GPUs round to nearest even), so off-GPU the kernels write fp32 and torch rounds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from openlora.kernels.triton_quant_pack import MODES, TritonQuant, pack

__all__ = ["MODES", "TritonQuant", "linear", "pack", "quantize_activations"]

BLOCK_N = 64


@triton.jit
def _source(perm_ptr, cols, mask, HAS_PERM: tl.constexpr):
    """The x columns that stored columns `cols` multiply: perm[cols], or cols themselves."""
    if HAS_PERM:
        cols = tl.load(perm_ptr + cols, mask=mask, other=0)
    return cols


@triton.jit
def _load_x(x_ptr, perm_ptr, offs_m, cols, mask_m, mask_k, stride_x, HAS_PERM: tl.constexpr):
    """x[offs_m, perm[cols]] (or x[offs_m, cols]) as a [BM, BK] tile in x's dtype, 0 where masked."""
    cols = _source(perm_ptr, cols, mask_k, HAS_PERM)
    return tl.load(x_ptr + offs_m[:, None] * stride_x + cols[None, :], mask=mask_m[:, None] & mask_k[None, :],
                   other=0.0)


@triton.jit
def _dot_codes(xt, wt, acc, FP32_DOT: tl.constexpr):
    """acc [BM, BN] + xt [BM, BK] @ wt[BN, BK]^T; wt holds small integers in fp32 (exact in any dtype)."""
    if FP32_DOT:
        return acc + tl.dot(xt.to(tl.float32), tl.trans(wt), input_precision="ieee")
    return acc + tl.dot(xt, tl.trans(wt.to(xt.dtype)), out_dtype=tl.float32)


@triton.jit
def _store_out(y_ptr, acc, bias_ptr, offs_m, offs_n, mask_m, mask_n, stride_y, HAS_BIAS: tl.constexpr):
    """y[offs_m, offs_n] = dtype(acc + bias) (one rounding)."""
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_y + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _a16_kernel(
    x_ptr, perm_ptr, codes_ptr, scale_ptr, zero_ptr, min_ptr, bias_ptr, y_ptr,
    M, N, GROUP, NUM_GROUPS, stride_x, stride_c, stride_y,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FOUR_BIT: tl.constexpr,
    HAS_PERM: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_MIN: tl.constexpr, HAS_BIAS: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of y = x @ (s (u - z) + m)^T, group by group (module docstring)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    c_rows = codes_ptr + offs_n[:, None] * stride_c  # [BN, 1] row starts of the codes
    if FOUR_BIT:  # BLOCK_K / 2 bytes per step: even columns in the low nibbles, odd ones in the high
        steps = 2 * tl.arange(0, BLOCK_K // 2)
    else:
        steps = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, NUM_GROUPS):
        g1 = (g + 1) * GROUP  # this group's columns are [g * GROUP, g1)
        gacc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # x_g . (u - z)
        xsum = tl.zeros((BLOCK_M,), dtype=tl.float32)  # sum(x_g), for the min term
        z = tl.zeros((BLOCK_N, 1), dtype=tl.float32)
        if HAS_ZERO:
            z = tl.load(zero_ptr + g * N + offs_n, mask=mask_n, other=0.0)[:, None]
        for k0 in range(g * GROUP, g1, BLOCK_K):
            cols = k0 + steps
            mask_k = cols < g1
            mask_c = mask_n[:, None] & mask_k[None, :]
            xt = _load_x(x_ptr, perm_ptr, offs_m, cols, mask_m, mask_k, stride_x, HAS_PERM)  # [BM, BK(/2)]
            if FOUR_BIT:
                b = tl.load(c_rows + (cols // 2)[None, :], mask=mask_c, other=0)  # uint8 [BN, BK / 2]
                xo = _load_x(x_ptr, perm_ptr, offs_m, cols + 1, mask_m, mask_k, stride_x, HAS_PERM)
                gacc = _dot_codes(xt, (b & 15).to(tl.float32) - z, gacc, FP32_DOT)
                gacc = _dot_codes(xo, (b >> 4).to(tl.float32) - z, gacc, FP32_DOT)
                if HAS_MIN:
                    xsum += tl.sum(xo.to(tl.float32), 1)
            else:
                q = tl.load(c_rows + cols[None, :], mask=mask_c, other=0)  # int8 [BN, BK]
                gacc = _dot_codes(xt, q.to(tl.float32) - z, gacc, FP32_DOT)
            if HAS_MIN:
                xsum += tl.sum(xt.to(tl.float32), 1)
        acc += gacc * tl.load(scale_ptr + g * N + offs_n, mask=mask_n, other=0.0)[None, :]
        if HAS_MIN:
            acc += xsum[:, None] * tl.load(min_ptr + g * N + offs_n, mask=mask_n, other=0.0)[None, :]
    _store_out(y_ptr, acc, bias_ptr, offs_m, offs_n, mask_m, mask_n, stride_y, HAS_BIAS)


@triton.jit
def _rint(v):
    """Round half to even (torch.round) of fp32 v with |v| < 2^22; floor and v - floor(v) are exact there."""
    t = tl.floor(v)
    d = v - t
    odd = t - 2.0 * tl.floor(t * 0.5)  # 1.0 where t is odd
    return t + tl.where(d > 0.5, 1.0, tl.where(d == 0.5, odd, 0.0))


@triton.jit
def _quantize_x_kernel(
    x_ptr, perm_ptr, xq_ptr, sx_ptr, M, GROUP, NUM_GROUPS, stride_x, stride_q,
    BLOCK_M: tl.constexpr, BLOCK: tl.constexpr, HAS_PERM: tl.constexpr,
):
    """Rows [BLOCK_M] of program 0 and group g = program 1: sx[rows, g] and xq[rows, group g]
    (module docstring). Two passes over the group: its max, then the codes."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    g = tl.program_id(1)
    g1 = (g + 1) * GROUP
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(g * GROUP, g1, BLOCK):
        cols = k0 + tl.arange(0, BLOCK)
        xv = _load_x(x_ptr, perm_ptr, offs_m, cols, mask_m, cols < g1, stride_x, HAS_PERM).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(xv), 1))
    sx = tl.div_rn(amax, 127.0)  # correctly rounded, as torch divides
    sx = tl.where(sx == 0.0, 1.0, sx)
    tl.store(sx_ptr + offs_m * NUM_GROUPS + g, sx, mask=mask_m)
    for k0 in range(g * GROUP, g1, BLOCK):
        cols = k0 + tl.arange(0, BLOCK)
        mask_k = cols < g1
        xv = _load_x(x_ptr, perm_ptr, offs_m, cols, mask_m, mask_k, stride_x, HAS_PERM).to(tl.float32)
        r = tl.minimum(tl.maximum(_rint(tl.div_rn(xv, sx[:, None])), -127.0), 127.0)
        tl.store(xq_ptr + offs_m[:, None] * stride_q + cols[None, :], r.to(tl.int8),
                 mask=mask_m[:, None] & mask_k[None, :])


@triton.jit
def _a8_kernel(
    xq_ptr, sx_ptr, codes_ptr, scale_ptr, bias_ptr, y_ptr,
    M, N, GROUP, NUM_GROUPS, stride_q, stride_c, stride_y,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of y = sum_g float(xq_g @ q_g^T) * (sx[:, g] sw[g, :]) (+ bias)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_rows = xq_ptr + offs_m[:, None] * stride_q  # [BM, 1]
    c_rows = codes_ptr + offs_n[:, None] * stride_c  # [BN, 1]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, NUM_GROUPS):
        g1 = (g + 1) * GROUP
        isum = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)  # exact integer sums of this group
        for k0 in range(g * GROUP, g1, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            mask_k = (cols < g1)[None, :]
            a = tl.load(a_rows + cols[None, :], mask=mask_m[:, None] & mask_k, other=0)  # int8 [BM, BK]
            b = tl.load(c_rows + cols[None, :], mask=mask_n[:, None] & mask_k, other=0)  # int8 [BN, BK]
            isum += tl.dot(a, tl.trans(b))  # int8 x int8 -> int32
        sx = tl.load(sx_ptr + offs_m * NUM_GROUPS + g, mask=mask_m, other=0.0)  # [BM]
        sw = tl.load(scale_ptr + g * N + offs_n, mask=mask_n, other=0.0)  # [BN]
        acc += isum.to(tl.float32) * (sx[:, None] * sw[None, :])
    _store_out(y_ptr, acc, bias_ptr, offs_m, offs_n, mask_m, mask_n, stride_y, HAS_BIAS)


def _block_m(m: int) -> int:
    """Token block: 16 (the smallest tl.dot tile) for decode batches, up to 64 for prefill."""
    return min(64, max(16, triton.next_power_of_2(m)))


def _block_k(group: int) -> int:
    """Columns per step: at least 32 (int8 tensor-core depth; 16 per nibble half), at most 128 (128 bytes
    of int8 codes per row), and no wider than the group needs (a group's last step is masked, steps never
    cross groups)."""
    return min(128, max(32, triton.next_power_of_2(group)))


def _rows(x: torch.Tensor, packed: TritonQuant) -> torch.Tensor:
    """x [..., K] -> [M, K] with unit column stride, checked against the packed weight."""
    if x.shape[-1] != packed.k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {packed.k}")
    if x.device != packed.codes.device:
        raise ValueError(f"x is on {x.device}, the weight on {packed.codes.device}")
    x2 = x.reshape(-1, packed.k)
    return x2 if x2.stride(1) == 1 else x2.contiguous()


def quantize_activations(x: torch.Tensor, packed: TritonQuant) -> tuple[torch.Tensor, torch.Tensor]:
    """w8a8's run-time activation quantization: (xq int8 [M, K] with columns in the weight's stored order,
    i.e. x[:, perm], and sx fp32 [M, G]) per token and group (module docstring)."""
    x2 = _rows(x, packed)
    m, k, g = x2.shape[0], packed.k, packed.num_groups
    xq = torch.empty(m, k, dtype=torch.int8, device=x.device)
    sx = torch.empty(m, g, dtype=torch.float32, device=x.device)
    if m:
        perm = packed.perm if packed.perm is not None else xq  # xq: an unused placeholder pointer
        bm = min(16, triton.next_power_of_2(m))
        block = min(256, triton.next_power_of_2(packed.group))  # a [bm, block] fp32 tile: 16 KiB at most
        _quantize_x_kernel[(triton.cdiv(m, bm), g)](
            x2, perm, xq, sx, m, packed.group, g, x2.stride(0), xq.stride(0),
            BLOCK_M=bm, BLOCK=block, HAS_PERM=packed.perm is not None)
    return xq, sx


def linear(x: torch.Tensor, packed: TritonQuant, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ W^T (+ bias [N]) -> [..., N] in x's dtype, on x's device (the packed weight's)."""
    x2 = _rows(x, packed)
    m, n = x2.shape[0], packed.n
    out_dtype = x.dtype if x.is_cuda else torch.float32  # NOTE (module docstring): the interpreter truncates
    y = torch.empty(m, n, dtype=out_dtype, device=x.device)
    if m == 0:
        return y.to(x.dtype).view(*x.shape[:-1], n)
    if bias is not None:
        assert bias.shape == (n,) and bias.is_contiguous()
    bm, bk = _block_m(m), _block_k(packed.group)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, BLOCK_N))
    b = bias if bias is not None else y  # y: an unused placeholder pointer
    if packed.mode == "w8a8":
        xq, sx = quantize_activations(x2, packed)
        _a8_kernel[grid](xq, sx, packed.codes, packed.scale, b, y, m, n, packed.group, packed.num_groups,
                         xq.stride(0), packed.codes.stride(0), y.stride(0),
                         BLOCK_M=bm, BLOCK_N=BLOCK_N, BLOCK_K=bk, HAS_BIAS=bias is not None)
        return y.to(x.dtype).view(*x.shape[:-1], n)
    s = packed.scale
    _a16_kernel[grid](
        x2, packed.perm if packed.perm is not None else s, packed.codes, s,
        packed.zero if packed.zero is not None else s, packed.min if packed.min is not None else s, b, y,
        m, n, packed.group, packed.num_groups, x2.stride(0), packed.codes.stride(0), y.stride(0),
        BLOCK_M=bm, BLOCK_N=BLOCK_N, BLOCK_K=bk, FOUR_BIT=packed.mode == "w4a16",
        HAS_PERM=packed.perm is not None, HAS_ZERO=packed.zero is not None, HAS_MIN=packed.min is not None,
        HAS_BIAS=bias is not None, FP32_DOT=x.dtype == torch.float32 or not x.is_cuda,
    )
    return y.to(x.dtype).view(*x.shape[:-1], n)
