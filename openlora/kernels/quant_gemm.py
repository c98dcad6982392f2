"""Quantized linear layers on the CPU (C++ extension csrc/quant_gemm.cpp), for the small-M matmuls of
decode steps: y = x @ W^T (+ bias), W a QuantWeight (openlora.quant.types), x [M, K] fp32 or bf16, y in x's
dtype.

Modes:
    "w8a16"  8-bit codes (per-channel or grouped scales, zero points, min), fp32 FMAs on codes converted in
             registers; scale and offset applied once per k block.
    "w4a16"  4-bit codes in groups (GGUF Q4_0/Q4_1: 32; ours: 128), two per byte, same arithmetic.
    "w8a8"   dynamic int8 x per token and group of `group` columns (symmetric, sx = max|x| / 127 over the
             group), symmetric int8 weights with one scale per row and group (group = K: per channel),
             int32 sums per group (AVX2 VPMADDUBSW sign trick, or AVX512-VNNI VPDPBUSD), an fp32 scale
             epilogue per group.

    available() -> bool                      (the extension builds; checked once per process)
    isa() -> "avx512_vnni" | "avx2" | "scalar"  (the path this CPU runs; A16 modes use avx2 code on VNNI CPUs)
    pack(w, mode) -> PackedQuant             (once at load; the QuantWeight's own tensors are not kept)
    linear(x, packed, bias=None) -> [M, N]
    reference_linear(x, w, mode, bias=None)  (plain torch on dequantized operands: the test oracle)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import ModuleType

import torch

from openlora.kernels.build import build_extension, try_build
from openlora.quant.types import QuantWeight

MODES = ("w8a16", "w4a16", "w8a8")
NR = 16  # output columns per packed panel (csrc/quant_gemm.cpp)


def load_extension() -> ModuleType:
    return build_extension("quant_gemm", "quant_gemm.cpp", "quantized GEMM")


@functools.cache
def available() -> bool:
    return try_build(load_extension, "quantized GEMM", "quantized layers unavailable")


def isa() -> str:
    """The path linear() takes here by default (see _checked_isa)."""
    return _checked_isa()


@functools.cache
def _checked_isa() -> str:
    """The extension's best path, once it has matched the scalar path bit for bit on W8A8 (exact int32
    sums: any difference is a bug). NOTE: the AVX512-VNNI path was written on an AVX2-only machine and
    first runs wherever this does; if it disagrees, this process falls back to AVX2 and says so."""
    best = load_extension().isa()
    if best != "avx512_vnni":
        return best
    g = torch.Generator().manual_seed(0)
    for group in (200, 40):  # per channel, and 5 groups
        w = QuantWeight(q=torch.randint(-127, 128, (40, 200), dtype=torch.int8, generator=g),
                        scale=torch.rand(40, 200 // group, generator=g) + 0.01, zero=None, bits=8, group=group)
        if not _same_on(pack(w, "w8a8"), best, g):
            return "avx2"
    return best


def _same_on(packed: PackedQuant, best: str, g: torch.Generator) -> bool:
    """W8A8 on `best` equals the scalar path bit for bit for a few batch sizes (else logged: False)."""
    for m in (1, 3, 9):
        x = torch.randn(m, 200, generator=g)
        got = linear(x, packed, isa=best)
        want = linear(x, packed, isa="scalar")
        if not torch.equal(got, want):
            import logging

            logging.getLogger("openlora.kernels").warning(
                "quantized GEMM: the AVX512-VNNI W8A8 path disagrees with the scalar one (M=%d); using AVX2", m)
            return False
    return True


@dataclass(frozen=True)
class PackedQuant:
    """A QuantWeight in the kernel's layout (csrc/quant_gemm.cpp describes each tensor)."""

    mode: str
    n: int  # out features
    k: int  # in features
    group: int
    codes: torch.Tensor  # w8a16 int8 [Nb, K, 16]; w4a16 uint8 [Nb, K, 8]; w8a8 int8 [Nb, K4, 16, 4]
    scale: torch.Tensor  # fp32 [Nb, K/group, 16]
    # a16: fp32 offset c = min - scale (zero - qmin) [Nb, K/group, 16]; w8a8: int32 128 * group sums of q
    aux: torch.Tensor
    perm: torch.Tensor | None  # int64 [K]: the kernel reads x[:, perm]

    @property
    def nbytes(self) -> int:
        """Resident bytes (codes, scales, offsets or sums, permutation)."""
        ts = [self.codes, self.scale, self.aux] + ([self.perm] if self.perm is not None else [])
        return sum(t.numel() * t.element_size() for t in ts)


def _panels(t: torch.Tensor) -> torch.Tensor:
    """[N, C] -> [Nb, 16, C], rows padded with zeros to a multiple of 16."""
    n = t.shape[0]
    nb = -(-n // NR)
    if nb * NR != n:
        t = torch.cat([t, t.new_zeros(nb * NR - n, *t.shape[1:])])
    return t.view(nb, NR, *t.shape[1:])


def pack(w: QuantWeight, mode: str) -> PackedQuant:
    """W in the layout of `mode` (see the module docstring); raises ValueError where W does not fit it."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    n, k = w.shape
    q = w.q
    perm = None if w.perm is None else w.perm.to(torch.int64).contiguous()
    if mode == "w8a8":
        if w.bits != 8 or w.min is not None or (w.zero is not None and bool((w.zero != 0).any())):
            raise ValueError("w8a8 needs 8-bit symmetric weights (zero 0, no min)")
        if w.group != k and w.group % 4:
            raise ValueError(f"w8a8 groups must be a multiple of 4 columns (or K), got {w.group}")
        if bool((q == -128).any()):
            raise ValueError("w8a8 codes must lie in [-127, 127] (the AVX2 sign trick cannot negate -128)")
        k4 = -(-k // 4)
        qp = torch.nn.functional.pad(q, (0, 4 * k4 - k))  # [N, 4 K4]
        codes = _panels(qp).view(-1, NR, k4, 4).permute(0, 2, 1, 3).contiguous()  # [Nb, K4, 16, 4]
        sw = _panels(w.scale.float()).transpose(1, 2).contiguous()  # [Nb, G, 16]
        gsum = 128 * q.to(torch.int32).view(n, k // w.group, w.group).sum(2)  # [N, G]
        wsum = _panels(gsum.to(torch.int32)).transpose(1, 2).contiguous()
        return PackedQuant(mode, n, k, w.group, codes, sw, wsum, perm)
    qmin = 0
    if mode == "w4a16":
        if w.bits != 4:
            raise ValueError("w4a16 needs 4-bit codes")
        lo, hi = int(q.min()), int(q.max())
        qmin = -8 if lo < 0 else 0
        if lo < qmin or hi > qmin + 15:
            raise ValueError(f"4-bit codes out of range: {lo}..{hi}")
        u = _panels((q.to(torch.int16) - qmin).to(torch.uint8)).transpose(1, 2)  # [Nb, K, 16]
        codes = (u[..., :8] | (u[..., 8:] << 4)).contiguous()  # [Nb, K, 8]: column j low, j + 8 high nibble
    else:
        codes = _panels(q).transpose(1, 2).contiguous()  # [Nb, K, 16]
    s = w.scale.float()
    z = w.zero.float() if w.zero is not None else torch.zeros_like(s)
    c = -s * (z - qmin)  # [N, G]: W = s u + c with u = q - qmin
    if w.min is not None:
        c = c + w.min.float()
    scale = _panels(s).transpose(1, 2).contiguous()  # [Nb, G, 16]
    off = _panels(c).transpose(1, 2).contiguous()
    return PackedQuant(mode, n, k, w.group, codes, scale, off, perm)


def linear(x: torch.Tensor, packed: PackedQuant, bias: torch.Tensor | None = None, isa: str = "") -> torch.Tensor:
    """x [M, K] @ W^T (+ bias) -> [M, N] in x's dtype. `isa`: force a path ("scalar", "avx2", ...; tests)."""
    ext = load_extension()
    if packed.mode == "w8a8":
        return ext.linear_a8(x, packed.codes, packed.scale, packed.aux, packed.group, packed.n, packed.perm, bias,
                             isa or _checked_isa())
    bits = 4 if packed.mode == "w4a16" else 8
    return ext.linear_a16(x, packed.codes, packed.scale, packed.aux, bits, packed.group, packed.n, packed.perm,
                          bias, isa)


def quantize_activations(x: torch.Tensor, perm: torch.Tensor | None = None,
                         group: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 x per token and group of `group` columns (0: the whole row), as the w8a8 kernel does:
    (xq int8 [M, K], sx fp32 [M, G]) with sx = max|x| / 127 over the group (1 for an all-zero group) and
    xq = clamp(round_half_even(x / sx), -127, 127)."""
    xf = x.float() if perm is None else x.float()[:, perm]
    m, k = xf.shape
    group = group or k
    xg = xf.view(m, k // group, group)
    sx = xg.abs().amax(2, keepdim=True) / 127
    sx = torch.where(sx == 0, torch.ones_like(sx), sx)
    return torch.round(xg / sx).clamp(-127, 127).to(torch.int8).view(m, k), sx.view(m, k // group)


def dequantized_activations(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """x' = xq * sx in float64 and x's column order: what the w8a8 kernel multiplies W by."""
    xq, sx = quantize_activations(x, w.perm, w.group)
    m, k = xq.shape
    xd = (xq.double().view(m, k // w.group, w.group) * sx.double().unsqueeze(2)).view(m, k)
    if w.perm is None:
        return xd
    out = torch.empty_like(xd)
    out[:, w.perm] = xd
    return out


def reference_linear(x: torch.Tensor, w: QuantWeight, mode: str, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Semantics: y = x' @ dequantize(W)^T (+ bias) in float64, rounded to x's dtype, where x' = x for the
    A16 modes and, for w8a8, x' = xq * sx of quantize_activations (so a comparison isolates the GEMM)."""
    wd = w.dequantize().double()  # [N, K] in the original column order
    xd = dequantized_activations(x, w) if mode == "w8a8" else x.double()
    y = xd @ wd.t()
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype)
