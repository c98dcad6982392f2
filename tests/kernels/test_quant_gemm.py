"""Quantized linear kernels (openlora.kernels.quant_gemm: W8A16, W4A16, W8A8) against

(a) a float64 GEMM of the dequantized operands (reference_linear; for W8A8 x is quantized exactly as the
    kernel does, so only the GEMM is compared):
      fp32 output: normalized MSE sum((y - ref)^2) / sum(ref^2) <= 1e-10 (fp32 sums and the per-block
        scale epilogue round; the integer W8A8 sums are exact);
      bf16 output: |y - exact| <= 2^-8 |exact| + 1e-4 mag elementwise, mag = |x'| @ |W|^T + |b|: one bf16
        rounding (8 significant bits) of a value whose fp32 sums carry far less error than 1e-4 mag;
(b) the unquantized fp32 GEMM x @ W^T on Gaussian data (W ~ N(0, 1), x ~ N(0, 1)):
      W8A16 and W8A8: NMSE <= 5e-4 (llama.cpp's MUL_MAT bound). Per-channel RTN int8 has a step of about
        6.4 sigma / 254, so its noise is step^2 / 12 ~ 5e-5 of the signal, twice that with int8 x (less
        with W8A8's per-group weight and activation scales).
      W4A16: NMSE <= 2.5e-2. Round-to-nearest with 16 levels per group has a step of about range / 15
        (0.35 sigma for min/max groups of 128, 0.27 sigma for Q4_0's amax / 8 in groups of 32), i.e. noise
        step^2 / 12 ~ 1e-2 of the signal: the bound holds that with 2.5x margin; 4-bit RTN cannot do better.
Shapes: the SmolLM2-135M projections (K, N) = (576, 576), (576, 192), (576, 3072), (1536, 576) and a
4096-row slice of the (576, 49152) LM head, M in {1, 3, 33}; odd shapes (N not a multiple of the 16-wide
panel, K not a multiple of 4 for per-channel modes, groups cut into several k blocks). W4 cases cover
zero points (asymmetric groups of 128, or 64 where K = 576 is not a multiple of 128, and GGUF Q4_0), the
min term (GGUF Q4_1), signed codes and a permutation.
"""

from __future__ import annotations

import pytest
import torch

from openlora.kernels import quant_gemm as qg
from openlora.quant.types import QuantWeight

pytestmark = pytest.mark.skipif(not qg.available(), reason="quantized GEMM extension does not build")

SHAPES = [(576, 576), (576, 192), (576, 3072), (1536, 576), (576, 4096)]  # (K, N); the last: LM head slice
MS = [1, 3, 33]


# --- a small quantizer for the tests (round to nearest) ---------------------------------------------------

def q8_channel(w: torch.Tensor) -> QuantWeight:
    """Symmetric int8, one scale per output row (our W8 and compressed-tensors' int8)."""
    s = w.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
    q = torch.round(w / s).clamp(-127, 127).to(torch.int8)
    return QuantWeight(q=q, scale=s.float(), zero=None, bits=8, group=w.shape[1])


def q8_groups(w: torch.Tensor, group: int) -> QuantWeight:
    """GGUF Q8_0: symmetric int8 in groups."""
    n, k = w.shape
    wg = w.view(n, k // group, group)
    s = wg.abs().amax(2).clamp_min(1e-12) / 127
    q = torch.round(wg / s[..., None]).clamp(-127, 127).to(torch.int8).view(n, k)
    return QuantWeight(q=q, scale=s.float(), zero=None, bits=8, group=group)


def q4(w: torch.Tensor, group: int, kind: str, perm: torch.Tensor | None = None) -> QuantWeight:
    """4-bit codes in groups. kind: "asym" (codes 0..15, integer zero, GPTQ/AWQ), "q4_0" (zero 8),
    "q4_1" (codes 0..15, min term, no zero), "sym" (signed codes -8..7, zero None). With `perm` the stored
    columns are w[:, perm] (GPTQ act-order)."""
    n, k = w.shape
    ws = w[:, perm] if perm is not None else w
    wg = ws.reshape(n, k // group, group)
    lo, hi = wg.amin(2), wg.amax(2)
    zero = mn = None
    if kind == "asym":
        s = ((hi - lo) / 15).clamp_min(1e-12)
        zero = torch.round(-lo / s).clamp(0, 15)
        q = torch.round(wg / s[..., None] + zero[..., None]).clamp(0, 15)
        zero = zero.to(torch.int32)
    elif kind == "q4_0":
        amax = torch.where(hi.abs() > lo.abs(), hi, lo)  # signed value of largest magnitude, as ggml does
        s = amax / -8
        s = torch.where(s == 0, torch.full_like(s, 1e-12), s)
        q = torch.round(wg / s[..., None] + 8).clamp(0, 15)
        zero = torch.full_like(s, 8).to(torch.int8)
    elif kind == "q4_1":
        s = ((hi - lo) / 15).clamp_min(1e-12)
        q = torch.round((wg - lo[..., None]) / s[..., None]).clamp(0, 15)
        mn = lo.float()
    else:
        s = (wg.abs().amax(2) / 7).clamp_min(1e-12)
        q = torch.round(wg / s[..., None]).clamp(-8, 7)
    return QuantWeight(q=q.to(torch.int8).view(n, k), scale=s.float(), zero=zero, bits=4, group=group, min=mn,
                       perm=perm)


def quantize(w: torch.Tensor, mode: str, variant: str = "", group: int = 128,
             perm: torch.Tensor | None = None) -> QuantWeight:
    if mode == "w4a16":
        return q4(w, group, variant or "asym", perm)
    if variant == "groups":
        return q8_groups(w, group)
    return q8_channel(w)


# --- checks ------------------------------------------------------------------------------------------------

def nmse(got: torch.Tensor, ref: torch.Tensor) -> float:
    g, r = got.double(), ref.double()
    return float(((g - r) ** 2).sum() / (r ** 2).sum().clamp_min(1e-300))


def exact_operands(x: torch.Tensor, w: QuantWeight, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x', W) in float64, original column order: what the kernel multiplies."""
    if mode != "w8a8":
        return x.double(), w.dequantize().double()
    return qg.dequantized_activations(x, w), w.dequantize().double()


def check_against_dequantized(got: torch.Tensor, x: torch.Tensor, w: QuantWeight, mode: str,
                              bias: torch.Tensor | None) -> None:
    assert got.dtype == x.dtype and got.shape == (x.shape[0], w.shape[0])
    xd, wd = exact_operands(x, w, mode)
    exact = xd @ wd.t() + (bias.double() if bias is not None else 0.0)
    if x.dtype == torch.float32:
        assert nmse(got, exact) <= 1e-10, nmse(got, exact)
        assert nmse(got, qg.reference_linear(x, w, mode, bias)) <= 1e-10
    else:
        mag = xd.abs() @ wd.abs().t() + (bias.double().abs() if bias is not None else 0.0)
        err = (got.double() - exact).abs()
        bound = 2.0 ** -8 * exact.abs() + 1e-4 * mag
        assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3g}"


def data(m: int, k: int, n: int, seed: int, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    return w, x, b


# --- tests -------------------------------------------------------------------------------------------------

CASES = [("w8a16", ""), ("w8a16", "groups"), ("w4a16", "asym"), ("w4a16", "q4_1"), ("w8a8", ""),
         ("w8a8", "groups")]


@pytest.mark.parametrize("mode,variant", CASES)
@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("m", MS)
def test_model_shapes(mode: str, variant: str, k: int, n: int, m: int) -> None:
    w, x, b = data(m, k, n, seed=k + n + m)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(n)) if variant == "asym" else None
    group = 32 if variant == "q4_1" else 128 if k % 128 == 0 else 64  # 576 = 4.5 x 128
    qw = quantize(w, mode, variant, group=group, perm=perm)
    packed = qg.pack(qw, mode)
    y = qg.linear(x, packed, b)
    check_against_dequantized(y, x, qw, mode, b)
    bound = 2.5e-2 if mode == "w4a16" else 5e-4
    assert nmse(y, x @ w.t() + b) <= bound
    yb = qg.linear(x.bfloat16(), packed, b.bfloat16())
    check_against_dequantized(yb, x.bfloat16(), qw, mode, b.bfloat16())


ODD = [(1, 96, 200, 32), (3, 70, 33, 70), (33, 512, 17, 512), (7, 1024, 50, 512), (64, 160, 48, 32),
       (5, 64, 1, 64), (4, 120, 20, 12)]  # (M, K, N, group): N % 16 != 0; K % 4 != 0; groups of 2 k blocks;
# N = 1; W8A8 groups of 12 (3 k steps of 4)


@pytest.mark.parametrize("m,k,n,group", ODD)
@pytest.mark.parametrize("mode,variant", [("w8a16", "groups"), ("w4a16", "asym"), ("w4a16", "q4_0"),
                                          ("w4a16", "q4_1"), ("w4a16", "sym"), ("w8a8", ""), ("w8a8", "groups")])
@pytest.mark.parametrize("isa", ["", "scalar"])
def test_odd_shapes_and_paths(m: int, k: int, n: int, group: int, mode: str, variant: str, isa: str) -> None:
    if mode == "w4a16" and group % 32:  # 4-bit groups are multiples of 32: the nearest such shape
        k, group = 96, 32
    if mode == "w8a8" and variant == "groups" and group % 4:  # W8A8 groups are whole k steps of 4 (or K)
        k, group = 72, 36
    w, x, b = data(m, k, n, seed=m * 7 + k + n)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(k)) if variant in ("q4_0", "") else None
    if mode == "w8a8":
        qw = q8_groups(w, group) if variant == "groups" else q8_channel(w)
        qw = QuantWeight(q=qw.q, scale=qw.scale, zero=None, bits=8, group=qw.group, perm=perm)
    else:
        qw = quantize(w, mode, variant, group=group, perm=perm)
    packed = qg.pack(qw, mode)
    for dtype in (torch.float32, torch.bfloat16):
        xb, bb = x.to(dtype), b.to(dtype)
        check_against_dequantized(qg.linear(xb, packed, bb, isa=isa), xb, qw, mode, bb)
        check_against_dequantized(qg.linear(xb, packed, None, isa=isa), xb, qw, mode, None)


@pytest.mark.parametrize("mode", ["w8a16", "w4a16", "w8a8"])
def test_paths_agree_and_threads(mode: str) -> None:
    """The SIMD path against the scalar one (W8A8: identical integers; A16: fp32 rounding), and 1 vs 2
    threads bit for bit (each output is computed by one thread in a fixed order)."""
    w, x, b = data(9, 576, 100, seed=3)
    qw = quantize(w, mode, "groups" if mode == "w8a8" else "", group=64)
    packed = qg.pack(qw, mode)
    fast = qg.linear(x, packed, b)
    slow = qg.linear(x, packed, b, isa="scalar")
    if mode == "w8a8":
        assert torch.equal(fast, slow)
    else:
        assert nmse(fast, slow) <= 1e-12
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = qg.linear(x, packed, b)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, fast)


def test_activation_quantization_matches_torch() -> None:
    """The kernel's per-token (and per-group) quantization equals quantize_activations bit for bit, ties to
    even, zero rows."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 77, generator=g) * torch.tensor([[1.0], [1e-3], [30.0], [0.0]])
    x[0, :5] = torch.tensor([127.0, 2.5, -3.5, 0.5, -126.5])  # row scale 1: exact halves round to even
    perm = torch.randperm(77, generator=g)
    for p in (None, perm):
        for group in (0, 11, 7):  # the whole row, 7 groups of 11, 11 groups of 7
            xq, sx = qg.load_extension().quantize_activations(x, p, group)
            rq, rs = qg.quantize_activations(x, p, group)
            assert torch.equal(xq, rq) and torch.equal(sx, rs) and sx.shape == (4, 77 // (group or 77))
    x[1, 11:22] = 0  # an all-zero group: scale 1, codes 0
    assert qg.quantize_activations(x, None, 11)[1][1, 1] == 1
    assert qg.quantize_activations(x)[0][0, :5].tolist() == [127, 2, -4, 0, -126]
    w = torch.randn(20, 77, generator=g)
    packed = qg.pack(q8_channel(w), "w8a8")
    assert torch.equal(qg.linear(x[3:], packed), torch.zeros(1, 20))  # all-zero row: scale 1, y = 0


def test_isa_and_packing() -> None:
    assert qg.isa() in ("avx512_vnni", "avx2", "scalar")
    w = torch.randn(40, 64)
    qw = q4(w, 32, "sym")
    p = qg.pack(qw, "w4a16")
    assert p.codes.shape == (3, 64, 8) and p.codes.dtype == torch.uint8
    u = qw.q.to(torch.int16) + 8  # signed codes are stored as u = q + 8
    assert int(p.codes[1, 5, 2]) == int(u[18, 5]) | int(u[26, 5]) << 4
    assert int(p.codes[2, 0, 7]) == int(u[39, 0])  # column 47 is padding: high nibble 0
    p8 = qg.pack(q8_channel(w), "w8a8")
    assert p8.codes.shape == (3, 16, 16, 4) and int(p8.codes[1, 2, 3, 1]) == int(q8_channel(w).q[19, 9])
    qg8 = q8_groups(w, 16)
    pg = qg.pack(qg8, "w8a8")  # 4 groups: scales and 128 * group sums per (panel, group, column)
    assert pg.scale.shape == pg.aux.shape == (3, 4, 16) and pg.scale[1, 2, 3] == qg8.scale[19, 2]
    assert int(pg.aux[1, 2, 3]) == 128 * int(qg8.q[19, 32:48].int().sum())
    assert p.nbytes < p8.nbytes < w.numel() * 2


def test_bad_inputs() -> None:
    w = torch.randn(32, 64)
    with pytest.raises(ValueError, match="4-bit"):
        qg.pack(q8_channel(w), "w4a16")
    with pytest.raises(ValueError, match="symmetric"):
        qg.pack(q4(w, 32, "asym"), "w8a8")
    with pytest.raises(ValueError, match="multiple of 4"):
        q = q8_channel(w)
        qg.pack(QuantWeight(q=q.q, scale=q.scale.expand(32, 32).contiguous(), zero=None, bits=8, group=2), "w8a8")
    with pytest.raises(ValueError, match="-127"):
        q = q8_channel(w)
        qg.pack(QuantWeight(q=q.q.clone().fill_(-128), scale=q.scale, zero=None, bits=8, group=64), "w8a8")
    packed = qg.pack(q8_channel(w), "w8a16")
    assert qg.linear(torch.empty(0, 64), packed).shape == (0, 32)
    with pytest.raises(RuntimeError, match="features"):
        qg.linear(torch.randn(2, 96), packed)
    with pytest.raises(RuntimeError, match="bias"):
        qg.linear(torch.randn(2, 64), packed, torch.randn(31))
    with pytest.raises(RuntimeError, match="2-D fp32 or bf16"):
        qg.linear(torch.randn(2, 64).half(), packed)


@pytest.mark.parametrize("mode", ["w8a16", "w4a16", "w8a8"])
@pytest.mark.parametrize("isa", ["", "scalar"])
def test_a_row_is_bit_identical_alone_or_in_any_batch(mode: str, isa: str) -> None:
    """Batch invariance: each output row's sums run in one fixed order, whatever M is."""
    w, x, b = data(13, 576, 200, seed=5)
    qw = q8_channel(w) if mode == "w8a16" else q8_groups(w, 64) if mode == "w8a8" else q4(w, 64, "asym")
    packed = qg.pack(qw, mode)
    full = qg.linear(x, packed, b, isa=isa)
    for lo, hi in ((0, 1), (3, 4), (2, 7), (5, 13)):
        assert torch.equal(full[lo:hi], qg.linear(x[lo:hi].contiguous(), packed, b, isa=isa)), (lo, hi)
