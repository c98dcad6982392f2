"""Triton quantized GEMMs (openlora.kernels.triton_quant: W8A16, W4A16, W8A8) against

(a) a float64 GEMM of the dequantized operands, the CPU path's oracle (quant_gemm.reference_linear; for
    W8A8 x is quantized per token and group by quant_gemm.quantize_activations, so only the GEMM is
    compared):
      fp32 output: normalized MSE sum((y - ref)^2) / sum(ref^2) <= 1e-10;
      bf16 / fp16 output: |y - exact| <= u |exact| + 1e-4 mag elementwise, mag = |x'| @ |W|^T + |b|,
        u = 2^-8 (bf16) or 2^-11 (fp16): one rounding into the output format of fp32 sums whose own
        error (products exact: 16-bit x times small integer codes) stays far below 1e-4 mag;
(b) the unquantized fp32 GEMM x @ W^T, W ~ N(0, 1) quantized by openlora/quant/quantize.py:
      W8A16, W8A8: NMSE <= 5e-4; W4A16: NMSE <= 2.5e-2, since 4-bit round-to-nearest (amax / 7 steps in
      groups of 64/128) alone leaves ~1e-2 of the signal (tests/kernels/test_quant_gemm.py derives it).
Shapes: the SmolLM2-135M projections (K, N) = (576, 576), (576, 192), (576, 1536), (1536, 576), and odd
ones (M = 1, 3, 33; N = 1, 17, 33, 200, not multiples of the 64-wide block; K = 70 with one group that
ends inside a block). Format variants use random codes and parameters: GPTQ (zero points, act-order
perm), GGUF Q4_0 (zero 8) and Q4_1 (min), signed symmetric 4-bit codes, grouped W8A8 with a perm.

Every test runs Triton's CPU interpreter (TRITON_INTERPRET=1 must be set before the kernels are
defined), so test_triton_quant_interpreter re-runs the test_interp_* tests in a fresh process with it
set; test_cuda_* run the same checks compiled on a GPU and skip where there is none.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from openlora.kernels import quant_gemm as qg
from openlora.quant.quantize import quantize_int4_groups, quantize_int8_groups, quantize_int8_per_channel
from openlora.quant.types import QuantWeight

_IN_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
interp_only = pytest.mark.skipif(not _IN_INTERPRETER, reason="runs inside test_triton_quant_interpreter's process")
requires_cuda = pytest.mark.skipif(_IN_INTERPRETER or not torch.cuda.is_available(), reason="needs a CUDA GPU")

MODEL_SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]  # (K, N) of SmolLM2-135M's projections
MODEL_CASES = [("w8a16", "channel"), ("w4a16", "groups"), ("w8a8", "channel"), ("w8a8", "groups")]
# The interpreter runs ~0.3 ms per tile operation: every case at the small shapes, two per large one.
INTERP_MODEL = [pytest.param(*case, id="-".join(map(str, case[:4])) + ("-bf16" if case[4] else ""))
                for case in [(mode, variant, k, n, (torch.bfloat16,)) for mode, variant in MODEL_CASES
                             for k, n in MODEL_SHAPES[:2]]
                + [("w8a16", "channel", 576, 1536, ()), ("w8a8", "groups", 576, 1536, ()),
                   ("w4a16", "groups", 1536, 576, ()), ("w8a8", "channel", 1536, 576, ())]]
ODD_SHAPES = [(1, 96, 200, 32), (3, 70, 33, 70), (33, 160, 17, 32), (5, 64, 1, 64)]  # (M, K, N, group)
ODD_CASES = [("w8a16", "zero"), ("w4a16", "zero"), ("w4a16", "q4_0"), ("w4a16", "q4_1"), ("w4a16", "sym"),
             ("w8a8", "sym")]
UNIT_ROUNDING = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def tq():
    """The module under test, imported only where the kernels may be defined (interpreter or GPU)."""
    from openlora.kernels import triton_quant

    return triton_quant


# --- oracles -----------------------------------------------------------------------------------------------

def exact_operands(x: torch.Tensor, w: QuantWeight, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x', W) in float64 and the original column order: what the kernel multiplies (the CPU path's
    oracle: for W8A8, x' = xq * sx of quant_gemm.quantize_activations per token and group)."""
    wd = w.dequantize().double()
    return (qg.dequantized_activations(x, w) if mode == "w8a8" else x.double()), wd


def nmse(got: torch.Tensor, ref: torch.Tensor) -> float:
    g, r = got.double().cpu(), ref.double().cpu()
    return float(((g - r) ** 2).sum() / (r**2).sum().clamp_min(1e-300))


def check_against_dequantized(got: torch.Tensor, x: torch.Tensor, w: QuantWeight, mode: str,
                              bias: torch.Tensor | None) -> float:
    """The bounds of (a) in the module docstring; returns the normalized MSE."""
    assert got.dtype == x.dtype and got.shape == (x.shape[0], w.shape[0])
    xd, wd = exact_operands(x.cpu(), w, mode)
    bd = bias.double().cpu() if bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    exact = xd @ wd.t() + bd
    err = nmse(got, exact)
    if x.dtype == torch.float32:
        assert err <= 1e-10, err
        assert nmse(got, qg.reference_linear(x.cpu(), w, mode, None if bias is None else bias.cpu())) <= 1e-10
    else:
        mag = xd.abs() @ wd.abs().t() + bd.abs()
        excess = (got.double().cpu() - exact).abs() - (UNIT_ROUNDING[x.dtype] * exact.abs() + 1e-4 * mag)
        assert bool((excess <= 0).all()), f"max excess {excess.max().item():.3g}"
    return err


# --- weights -----------------------------------------------------------------------------------------------

def random_weight(n: int, k: int, group: int, mode: str, kind: str, seed: int) -> QuantWeight:
    """Random codes and parameters in one format's shape. kind: "zero" (GPTQ: unsigned codes, integer
    zero points, act-order perm), "q4_0" (zero 8), "q4_1" (min, no zero), "sym" (signed codes; for W8A8
    in [-127, 127] with a perm)."""
    g = torch.Generator().manual_seed(seed)
    bits = 4 if mode == "w4a16" else 8
    top = 2**bits - 1
    shape = (n, k // group)
    scale = torch.rand(shape, generator=g) * 0.05 + 0.005
    zero = mn = perm = None
    if kind == "sym":
        lim = 127 if bits == 8 else 8
        q = torch.randint(-lim, min(lim, top // 2) + 1, (n, k), generator=g)
        perm = torch.randperm(k, generator=g) if mode == "w8a8" else None
    else:
        q = torch.randint(0, top + 1, (n, k), generator=g)
        if kind == "zero":
            zero = torch.randint(0, top + 1, shape, generator=g, dtype=torch.int32)
            perm = torch.randperm(k, generator=g)
        elif kind == "q4_0":
            zero = torch.full(shape, 8, dtype=torch.int8)
        else:
            mn = -torch.rand(shape, generator=g) * 0.4
    if bits == 8 and kind != "sym":
        q = q - 128  # int8 storage of unsigned 8-bit codes: shift codes and zero points alike
        zero = zero - 128 if zero is not None else None
    return QuantWeight(q=q.to(torch.int8), scale=scale, zero=zero, bits=bits, group=group, min=mn, perm=perm)


def quantized_gaussian(mode: str, variant: str, k: int, n: int) -> tuple[torch.Tensor, QuantWeight]:
    """(W ~ N(0, 1) [N, K], W quantized by openlora/quant/quantize.py)."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(k * 7 + n))
    group = 128 if k % 128 == 0 else 64  # 576 = 4.5 x 128
    if mode == "w4a16":
        return w, quantize_int4_groups(w, group)
    return w, quantize_int8_groups(w, group) if variant == "groups" else quantize_int8_per_channel(w)


def inputs(m: int, k: int, n: int, seed: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g).to(device), torch.randn(n, generator=g).to(device)


# --- the checks (shared by the interpreter and the GPU) -------------------------------------------------------

def run_model_case(mode: str, variant: str, k: int, n: int, m: int, device: str,
                   dtypes: tuple[torch.dtype, ...] = (torch.bfloat16,)) -> tuple[float, float]:
    """fp32 with bias against (a) and (b), then each of `dtypes` without bias against (a).
    Returns (NMSE against the dequantized GEMM, NMSE against the float GEMM), both fp32."""
    w, qw = quantized_gaussian(mode, variant, k, n)
    x, b = inputs(m, k, n, seed=m + k + n, device=device)
    packed = tq().pack(qw, mode, device)
    y = tq().linear(x, packed, b)
    err_deq = check_against_dequantized(y, x, qw, mode, b)
    err_float = nmse(y, x.cpu() @ w.t() + b.cpu())
    assert err_float <= (2.5e-2 if mode == "w4a16" else 5e-4), err_float
    for dtype in dtypes:
        xh = x.to(dtype)
        check_against_dequantized(tq().linear(xh, packed), xh, qw, mode, None)
    return err_deq, err_float


def run_odd_case(mode: str, kind: str, m: int, k: int, n: int, group: int, device: str,
                 dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16), both: bool = True) -> None:
    """Random-code formats at an odd shape, each dtype with bias and (`both`, else the first dtype only)
    without, against (a); one group of token 0 is all zeros (W8A8's sx = 1 branch)."""
    qw = random_weight(n, k, group, mode, kind, seed=m * 31 + k + n)
    x, b = inputs(m, k, n, seed=k + n, device=device)
    x[0, qw.perm[:group] if qw.perm is not None else slice(0, group)] = 0.0  # stored group 0
    packed = tq().pack(qw, mode, device)
    for i, dtype in enumerate(dtypes):
        xh, bh = x.to(dtype), b.to(dtype)
        check_against_dequantized(tq().linear(xh, packed, bh), xh, qw, mode, bh)
        if both or i == 0:
            check_against_dequantized(tq().linear(xh, packed), xh, qw, mode, None)


def run_activation_case(device: str) -> None:
    """The kernel's per-token-group quantization is bit-exact against the oracle, half-way cases included
    (x / sx = +-0.5, 1.5, 2.5 round to even), with a perm."""
    k, group = 96, 32
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, k, generator=g) * torch.tensor([1.0, 1e-3, 30.0, 1.0])[:, None]
    x[3, :6] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5])  # sx = 1 on its group: the exact halves
    x[3, 6:group] = 0.25
    x[0, group : 2 * group] = 0.0
    perm = torch.cat([torch.arange(group), torch.randperm(k - group, generator=g) + group])  # group 0 fixed
    qw = QuantWeight(q=torch.ones(8, k, dtype=torch.int8), scale=torch.ones(8, k // group), zero=None, bits=8,
                     group=group, perm=perm)
    packed = tq().pack(qw, "w8a8", device)
    for dtype in (torch.float32, torch.bfloat16):
        xh = x.to(dtype)
        xq, sx = tq().quantize_activations(xh.to(device), packed)
        want_q, want_s = qg.quantize_activations(xh, perm, group)
        assert torch.equal(xq.cpu(), want_q) and torch.equal(sx.cpu(), want_s)
    assert want_q[3, :6].tolist() == [127, 0, 2, 2, 0, -2]


# --- interpreter tests ---------------------------------------------------------------------------------------

@interp_only
@pytest.mark.parametrize("mode,variant,k,n,dtypes", INTERP_MODEL)
def test_interp_model_shapes(mode: str, variant: str, k: int, n: int, dtypes: tuple[torch.dtype, ...]) -> None:
    run_model_case(mode, variant, k, n, m=3, device="cpu", dtypes=dtypes)


@interp_only
@pytest.mark.parametrize("m", [1, 33])
@pytest.mark.parametrize("mode,variant", MODEL_CASES)
def test_interp_model_batch_sizes(mode: str, variant: str, m: int) -> None:
    run_model_case(mode, variant, 576, 192, m=m, device="cpu", dtypes=())


@interp_only
@pytest.mark.parametrize("m,k,n,group", ODD_SHAPES)
@pytest.mark.parametrize("mode,kind", ODD_CASES)
def test_interp_odd_shapes_and_formats(mode: str, kind: str, m: int, k: int, n: int, group: int) -> None:
    run_odd_case(mode, kind, m, k, n, group, device="cpu", both=False)


@interp_only
def test_interp_fp16_and_leading_dims() -> None:
    """fp16 activations, and x [B, T, K] -> y [B, T, N]."""
    run_odd_case("w4a16", "zero", 3, 96, 40, 32, device="cpu", dtypes=(torch.float16,))
    qw = random_weight(40, 96, 32, "w8a8", "sym", seed=1)
    x = torch.randn(2, 3, 96)
    y = tq().linear(x, tq().pack(qw, "w8a8", "cpu"))
    assert y.shape == (2, 3, 40)
    check_against_dequantized(y.view(6, 40), x.view(6, 96), qw, "w8a8", None)


@interp_only
def test_interp_activation_quantization() -> None:
    run_activation_case("cpu")


# --- layout checks (no kernel launch) --------------------------------------------------------------------------

def test_pack_layout_and_refusals() -> None:
    from openlora.kernels import triton_quant_pack as tp

    qw = random_weight(10, 64, 32, "w4a16", "sym", seed=2)
    p = tp.pack(qw, "w4a16", "cpu")
    assert p.codes.shape == (10, 32) and p.codes.dtype == torch.uint8 and p.scale.shape == (2, 10)
    u = (qw.q.to(torch.int16) + 8).to(torch.uint8)
    assert torch.equal(p.codes & 15, u[:, 0::2]) and torch.equal(p.codes >> 4, u[:, 1::2])
    assert p.zero is not None and bool((p.zero == 8).all())  # signed codes: stored u = q + 8, zero 8
    assert p.nbytes == 10 * 32 + 2 * (2 * 10 * 4)  # half a byte per code, fp32 scale and zero per group
    w8 = random_weight(10, 64, 64, "w8a8", "sym", seed=3)
    assert tp.pack(w8, "w8a8", "cpu").nbytes == 10 * 64 + 10 * 4 + 64 * 8  # codes, scales, perm
    with pytest.raises(ValueError, match="symmetric"):
        tp.pack(random_weight(10, 64, 32, "w8a16", "zero", seed=4), "w8a8", "cpu")
    bad = QuantWeight(q=torch.full((2, 32), -128, dtype=torch.int8), scale=torch.ones(2, 1), zero=None, bits=8,
                      group=32)
    with pytest.raises(ValueError, match="-127"):
        tp.pack(bad, "w8a8", "cpu")
    with pytest.raises(ValueError, match="4-bit"):
        tp.pack(w8, "w4a16", "cpu")
    with pytest.raises(ValueError, match="unknown mode"):
        tp.pack(w8, "w2a16", "cpu")


@pytest.mark.skipif(_IN_INTERPRETER, reason="the test_interp_* tests run directly")
def test_triton_quant_interpreter() -> None:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(Path(__file__)),
         "-k", "test_interp_"],
        env=env, capture_output=True, text=True, timeout=540, cwd=Path(__file__).parents[2],
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "passed" in proc.stdout and "skipped" not in proc.stdout.split("\n")[-2], proc.stdout[-2000:]


# --- the same checks compiled for a GPU --------------------------------------------------------------------------

@requires_cuda
@pytest.mark.parametrize("mode,variant", MODEL_CASES)
@pytest.mark.parametrize("k,n", MODEL_SHAPES)
def test_cuda_model_shapes(mode: str, variant: str, k: int, n: int) -> None:
    for m in (1, 3, 33, 200):
        run_model_case(mode, variant, k, n, m, device="cuda", dtypes=(torch.bfloat16, torch.float16))


@requires_cuda
@pytest.mark.parametrize("m,k,n,group", ODD_SHAPES)
@pytest.mark.parametrize("mode,kind", ODD_CASES)
def test_cuda_odd_shapes_and_formats(mode: str, kind: str, m: int, k: int, n: int, group: int) -> None:
    run_odd_case(mode, kind, m, k, n, group, device="cuda",
                 dtypes=(torch.float32, torch.bfloat16, torch.float16))


@requires_cuda
def test_cuda_activation_quantization() -> None:
    run_activation_case("cuda")


@requires_cuda
@pytest.mark.parametrize("mode", ["w8a16", "w4a16", "w8a8"])
def test_cuda_quant_linear_takes_the_triton_path(mode: str) -> None:
    """A base projection quantized on a CUDA device (openlora.model.quant_linear.QuantLinear) runs these
    kernels and equals the oracle on the same QuantWeight."""
    from openlora.kernels.quant_gemm import reference_linear
    from openlora.model.quant_linear import QuantLinear, quantize_for

    g = torch.Generator().manual_seed(7)
    w, x, b = torch.randn(192, 576, generator=g), torch.randn(5, 576, generator=g), torch.randn(192, generator=g)
    qw = quantize_for(mode, w.cuda())
    lin = QuantLinear(qw, b.cuda(), mode)
    assert lin.backend == f"triton-{mode}" and lin.nbytes < w.numel() * 2
    cpu = type(qw)(q=qw.q.cpu(), scale=qw.scale.cpu(), zero=None, bits=qw.bits, group=qw.group)
    want = reference_linear(x, cpu, mode, b).double()
    got = lin(x.cuda()).cpu().double()
    assert float(((got - want) ** 2).sum() / (want ** 2).sum()) <= 1e-10
