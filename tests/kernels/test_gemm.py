"""Packed-weight linear kernels (openlora.kernels.gemm: AMX bf16, AVX-512 fp32, AVX512-BF16 bf16) against
float64.

Tolerances (each output vs the exact sum of the same inputs, `mag` = sum_k |x_k w_k| + |b|):
  * bf16 (AMX and AVX512-BF16): fp32 products and sums, then one rounding to bf16: |err| <= 2^-8 |exact|
    (8 significant bits) + 1e-5 mag (the fp32 sum, far above K 2^-24 for K <= 1536).
  * fp32: the textbook bound of a recursive fp32 sum with FMAs plus the bias add: (K + 1) 2^-24 mag.
Shapes: M in {1, 5, 12, 13, 16, 17, 32, 33, 49, 300} (AMX row tiles of 16 and chunks of 256; fp32
register blocks of 8 and chunks of 48), N and K both multiples and non-multiples of the 32/48-wide blocks,
odd K (the AVX512-BF16 kernel works on k pairs), with and without bias, row-strided x, 1 and 2 threads.
"""

from __future__ import annotations

import pytest
import torch

from openlora.kernels.gemm import AMX, BF16, F32, PackedGemm

KERNELS = [pytest.param(k, id=f"{k.stem}-{str(k.dtype)[6:]}",
                        marks=pytest.mark.skipif(not k.available(), reason=f"{k.label} unavailable here"))
           for k in (AMX, F32, BF16)]
MS = [1, 5, 12, 13, 16, 17, 32, 33, 49, 300]
NKS = [(7, 40), (48, 64), (960, 576), (576, 1536), (100, 1000), (40, 70), (50, 77)]


def check(kern: PackedGemm, got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    assert got.dtype == kern.dtype and got.shape == (x.shape[0], w.shape[0])
    xd, wd = x.double(), w.double()
    ref = xd @ wd.t() + (b.double() if b is not None else 0.0)
    mag = xd.abs() @ wd.abs().t() + (b.double().abs() if b is not None else 0.0)
    if kern.dtype == torch.bfloat16:
        bound = ref.abs() * 2.0 ** -8 + 1e-5 * mag
    else:
        bound = (x.shape[1] + 1) * 2.0 ** -24 * mag
    err = (got.double() - ref).abs()
    assert bool((err <= bound + 1e-30).all()), f"max excess {(err - bound).max().item():.3g}"


@pytest.mark.parametrize("kern", KERNELS)
@pytest.mark.parametrize("n,k", NKS)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_reference(kern: PackedGemm, m: int, n: int, k: int, bias: bool) -> None:
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    w = torch.randn(n, k, generator=g).to(kern.dtype)
    b = torch.randn(n, generator=g).to(kern.dtype) if bias else None
    x = torch.randn(m, k, generator=g).to(kern.dtype)
    check(kern, kern.linear(x, kern.pack(w), b, n), x, w, b)


@pytest.mark.parametrize("kern", KERNELS)
@pytest.mark.parametrize("threads", [1, 2])
def test_strided_rows_and_threads(kern: PackedGemm, threads: int) -> None:
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(7)
        w = torch.randn(960, 576, generator=g).to(kern.dtype)
        x = torch.randn(32, 700, generator=g).to(kern.dtype)[:, 50:626]  # row stride 700: AMX pads a copy
        check(kern, kern.linear(x, kern.pack(w), None, 960), x, w, None)
        x2 = torch.randn(32, 1152, generator=g).to(kern.dtype)[:, :576]  # stride 1152: read in place
        check(kern, kern.linear(x2, kern.pack(w), None, 960), x2, w, None)
    finally:
        torch.set_num_threads(old)


@pytest.mark.skipif(not AMX.available(), reason="AMX GEMM unavailable here")
def test_amx_packed_layout() -> None:
    """P[nb, kb, t, p, 2c + j] = W[32 nb + 16 t + c, 32 kb + 2 p + j], zero padded."""
    w = torch.arange(40 * 70, dtype=torch.float32).view(40, 70).bfloat16()
    p = AMX.pack(w)
    assert p.shape == (2, 3, 2, 16, 32)
    for nb, kb, t, pp, c, j in [(0, 0, 0, 0, 0, 0), (0, 1, 1, 5, 3, 1), (1, 2, 0, 2, 7, 1), (1, 0, 0, 15, 7, 1)]:
        assert p[nb, kb, t, pp, 2 * c + j] == w[32 * nb + 16 * t + c, 32 * kb + 2 * pp + j]
    assert p[1, 2, 0, 3, 0] == 0  # k = 70: padding
    assert p[1, 0, 1, 0, 0] == 0  # n = 48: padding


@pytest.mark.skipif(not F32.available(), reason="fp32 GEMM unavailable here")
def test_f32_packed_layout() -> None:
    """P[nb, k, c] = W[48 nb + c, k], zero padded."""
    w = torch.arange(60 * 70, dtype=torch.float32).view(60, 70)
    p = F32.pack(w)
    assert p.shape == (2, 70, 48)
    assert p[0, 5, 3] == w[3, 5] and p[1, 69, 11] == w[59, 69] and p[1, 0, 12] == 0


@pytest.mark.skipif(not BF16.available(), reason="AVX512-BF16 GEMM unavailable here")
def test_bf16_packed_layout() -> None:
    """P[nb, s, 2c + j] = W[48 nb + c, 2s + j], zero padded (odd K gets a zero k)."""
    w = torch.arange(60 * 71, dtype=torch.float32).view(60, 71).bfloat16()
    p = BF16.pack(w)
    assert p.shape == (2, 36, 96) and p.dtype == torch.bfloat16
    assert p[0, 2, 2 * 3 + 1] == w[3, 5] and p[1, 34, 2 * 11 + 1] == w[59, 69] and p[1, 35, 2 * 11] == w[59, 70]
    assert p[1, 35, 2 * 11 + 1] == 0 and p[1, 0, 2 * 12] == 0


@pytest.mark.parametrize("kern", KERNELS)
def test_empty_batch_and_bad_inputs(kern: PackedGemm) -> None:
    other = torch.float32 if kern.dtype == torch.bfloat16 else torch.bfloat16
    p = kern.pack(torch.randn(48, 64).to(kern.dtype))
    assert kern.linear(torch.empty(0, 64, dtype=kern.dtype), p, None, 48).shape == (0, 48)
    with pytest.raises(RuntimeError, match="features"):
        kern.linear(torch.randn(4, 100).to(kern.dtype), p, None, 48)
    with pytest.raises(RuntimeError, match="must be a 2-D"):
        kern.linear(torch.randn(4, 64).to(other), p, None, 48)
    with pytest.raises(RuntimeError, match="bias"):
        kern.linear(torch.randn(4, 64).to(kern.dtype), p, torch.randn(47).to(kern.dtype), 48)
