"""AMX bf16 linear (openlora.kernels.gemm_amx) against an fp32 reference.

Tolerance: the kernel sums bf16 products in fp32 and rounds once to bf16, so each output is within half
a bf16 ulp (at most 2^-8 relative: 8 significant bits) of the exact fp32 sum, plus the fp32 summation error (bounded here by
1e-5 x sum |x_k w_k|, far above K * 2^-24 for K <= 1536). Reference: the same bf16 inputs widened to
fp32 and multiplied in float64.
Shapes: M in {1, 5, 16, 17, 32, 33, 300} (row tiles and the 256-row chunking), N and K both multiples
and non-multiples of the 32-wide blocks, with and without bias, row-strided x, 1 and 2 threads.
"""

from __future__ import annotations

import pytest
import torch

from openlora.kernels import gemm_amx

pytestmark = pytest.mark.skipif(not gemm_amx.available(), reason="no AMX-BF16 on this CPU (or OS refused tiles)")

MS = [1, 5, 16, 17, 32, 33, 300]
NKS = [(7, 40), (48, 64), (960, 576), (576, 1536), (100, 1000)]


def reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(exact x @ w^T + b in float64, sum |x_k w_k| per output) from the bf16 inputs."""
    xd, wd = x.double(), w.double()
    y = xd @ wd.t() + (b.double() if b is not None else 0.0)
    return y, xd.abs() @ wd.abs().t()


def check(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    assert got.dtype == torch.bfloat16 and got.shape == (x.shape[0], w.shape[0])
    ref, mag = reference(x, w, b)
    err = (got.double() - ref).abs()
    bound = ref.abs() * 2.0 ** -8 + 1e-5 * mag + 1e-30
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3g}"


@pytest.mark.parametrize("n,k", NKS)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_reference(m: int, n: int, k: int, bias: bool) -> None:
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    w = torch.randn(n, k, generator=g).bfloat16()
    b = torch.randn(n, generator=g).bfloat16() if bias else None
    x = torch.randn(m, k, generator=g).bfloat16()
    check(gemm_amx.linear(x, gemm_amx.pack(w), b, n), x, w, b)


@pytest.mark.parametrize("threads", [1, 2])
def test_strided_rows_and_threads(threads: int) -> None:
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(7)
        w = torch.randn(960, 576, generator=g).bfloat16()
        wide = torch.randn(32, 700, generator=g).bfloat16()
        x = wide[:, 50:626]  # row stride 700, not a multiple of the tile rows' 64 bytes
        check(gemm_amx.linear(x, gemm_amx.pack(w), None, 960), x, w, None)
        x2 = torch.randn(32, 1152, generator=g).bfloat16()[:, :576]  # stride 1152: read in place
        check(gemm_amx.linear(x2, gemm_amx.pack(w), None, 960), x2, w, None)
    finally:
        torch.set_num_threads(old)


def test_packed_layout() -> None:
    """P[nb, kb, t, p, 2c + j] = W[32 nb + 16 t + c, 32 kb + 2 p + j], zero padded."""
    w = torch.arange(40 * 70, dtype=torch.float32).view(40, 70).bfloat16()
    p = gemm_amx.pack(w)
    assert p.shape == (2, 3, 2, 16, 32)
    for nb, kb, t, pp, c, j in [(0, 0, 0, 0, 0, 0), (0, 1, 1, 5, 3, 1), (1, 2, 0, 2, 7, 1), (1, 0, 0, 15, 7, 1)]:
        n, k = 32 * nb + 16 * t + c, 32 * kb + 2 * pp + j
        assert p[nb, kb, t, pp, 2 * c + j] == w[n, k]
    assert p[1, 2, 0, 3, 0] == 0  # k = 70: padding
    assert p[1, 0, 1, 0, 0] == 0  # n = 48: padding


def test_empty_batch_and_bad_inputs() -> None:
    w = torch.randn(48, 64).bfloat16()
    p = gemm_amx.pack(w)
    assert gemm_amx.linear(torch.empty(0, 64, dtype=torch.bfloat16), p, None, 48).shape == (0, 48)
    with pytest.raises(RuntimeError, match="features"):
        gemm_amx.linear(torch.randn(4, 100).bfloat16(), p, None, 48)
    with pytest.raises(RuntimeError, match="bf16"):
        gemm_amx.linear(torch.randn(4, 64), p, None, 48)
    with pytest.raises(RuntimeError, match="bias"):
        gemm_amx.linear(torch.randn(4, 64).bfloat16(), p, torch.randn(47).bfloat16(), 48)
