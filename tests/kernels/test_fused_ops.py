"""Fused decoder-layer ops (openlora.kernels.fused_ops) vs their torch composites (`*_ref`, the code of
openlora/model/llama.py and rope.py).

Expectation: on an AVX-512 torch build (ATen capability AVX512) with the AVX-512 extension, every op is
bit-identical to its composite in fp32 and bf16 (the kernel replays torch's rounding steps, see
fused_ops_cpu.cpp). Elsewhere: fp32 within 1e-6 relative, bf16 within 1 ulp.
Inputs: random T in {1, 5, 32, 300}, widths 64 / 576 / 1536 plus 100 and 7 (row tails shorter than a
vector), contiguous and strided views (column slices of wider buffers), 1 thread and forced 2 threads.
"""

from __future__ import annotations

import pytest
import torch

from openlora.kernels import fused_ops as fo

pytestmark = pytest.mark.skipif(not fo.available(), reason="C++ fused ops extension not buildable")

DTYPES = [torch.float32, torch.bfloat16]
TS = [1, 5, 32, 300]
WIDTHS = [64, 576, 1536, 100, 7]
EPS = 1e-5


def exact() -> bool:
    """Whether bit-equality is expected (see the module docstring)."""
    return fo.load_extension().has_avx512() and torch.backends.cpu.get_cpu_capability() == "AVX512"


def bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Max distance in bf16 units in the last place between two bf16 tensors (ordered bit patterns)."""
    def ordered(t: torch.Tensor) -> torch.Tensor:
        i = t.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(i < 0, -32768 - i, i)  # negative floats: reverse so that order follows value
    return int((ordered(a) - ordered(b)).abs().max()) if a.numel() else 0


def check(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if exact():
        assert torch.equal(out, ref), f"{(out != ref).sum().item()} of {out.numel()} elements differ"
    elif out.dtype == torch.bfloat16:
        assert bf16_ulps(out, ref) <= 1
    else:
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-30)


@pytest.fixture(params=["1thread", "2threads"])
def threads(request):
    """Run each case serial (threshold max) and with rows forced over 2 threads (threshold 0)."""
    old_t = torch.get_num_threads()
    old = fo.load_extension().get_min_parallel_elems()
    if request.param == "1thread":
        fo.set_min_parallel_elems(1 << 62)
    else:
        torch.set_num_threads(2)
        fo.set_min_parallel_elems(0)
    yield request.param
    fo.set_min_parallel_elems(old)
    torch.set_num_threads(old_t)


def rand(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("h", WIDTHS)
@pytest.mark.parametrize("strided", [False, True])
def test_rms_norm(dtype, T, h, strided, threads):
    x = rand(T, h + 3 if strided else h, dtype=dtype, seed=T * h, scale=3.0)[:, :h]  # [T, h]
    w = rand(h, dtype=dtype, seed=1)
    check(fo.rms_norm(x, w, EPS), fo.rms_norm_ref(x, w, EPS))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("h", WIDTHS)
def test_add_rms_norm_(dtype, T, h, threads):
    hid = rand(T, h, dtype=dtype, seed=T + h, scale=2.0)
    wide = rand(T, 2 * h + 5, dtype=dtype, seed=7)
    delta = wide[:, h + 5:]  # strided view [T, h], last dim contiguous
    w = rand(h, dtype=dtype, seed=2)
    ref_h = hid + delta
    ref = fo.rms_norm_ref(ref_h, w, EPS)
    wide_before = wide.clone()
    out = fo.add_rms_norm_(hid, delta, w, EPS)
    check(hid, ref_h)  # h updated in place, rounded like `h + delta`
    check(out, ref)
    assert torch.equal(wide, wide_before)  # delta untouched


def cos_sin(T: int, d: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [T, d] of random positions, built as openlora.model.rope.rope_cos_sin does."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, 4096, (T,), generator=g)
    inv = 1.0 / (100000.0 ** (torch.arange(0, d, 2).float() / d))
    f = pos.float()[:, None] * inv[None, :]
    emb = torch.cat((f, f), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("heads,kv_heads,d", [(9, 3, 64), (4, 2, 32), (2, 1, 8), (3, 1, 40)])
def test_rope_on_qkv_view(dtype, T, heads, kv_heads, d, threads):
    qkv = rand(T, (heads + 2 * kv_heads) * d, dtype=dtype, seed=T * d, scale=2.0)  # fused [T, q + 2kv]
    before = qkv.clone()
    qk = qkv[:, :(heads + kv_heads) * d].view(T, heads + kv_heads, d)  # rows strided, as in llama.py
    cos, sin = cos_sin(T, d, dtype, seed=T)
    ref = fo.rope_ref(qk, cos, sin)
    assert fo.rope_(qk, cos, sin) is qk
    check(qk, ref)
    v_cols = slice((heads + kv_heads) * d, None)
    assert torch.equal(qkv[:, v_cols], before[:, v_cols])  # the v columns are not touched


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_head_strided(dtype, threads):
    """Heads not adjacent (every other head of a wider view) and cos/sin row-strided."""
    T, d = 32, 64
    buf = rand(T, 8, d, dtype=dtype, seed=3)
    t = buf[:, ::2]  # [T, 4, d], head stride 2d
    cs = rand(T, 2 * d, dtype=dtype, seed=4)
    cos, sin = cs[:, :d], cs[:, d:]
    ref = fo.rope_ref(t, cos, sin)
    fo.rope_(t, cos, sin)
    check(t, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("i", WIDTHS)
@pytest.mark.parametrize("strided", [False, True])
def test_silu_mul(dtype, T, i, strided, threads):
    gu = rand(T, 2 * i + 11 if strided else 2 * i, dtype=dtype, seed=T + i, scale=4.0)[:, :2 * i]
    check(fo.silu_mul(gu), fo.silu_mul_ref(gu))


@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values(dtype):
    """Large magnitudes (exp overflow / underflow), zeros, infinities and NaN propagate like the composites."""
    vals = torch.tensor([0.0, -0.0, 1e-30, 88.0, -88.0, 100.0, -100.0, 1e30, -1e30,
                         float("inf"), float("-inf"), float("nan")])
    gu = vals.repeat(2, 8)[:, :64].to(dtype)  # [2, 64]
    torch.testing.assert_close(fo.silu_mul(gu), fo.silu_mul_ref(gu), rtol=0, atol=0, equal_nan=True)
    t = vals.repeat(2, 3, 2)[:, :, :16].to(dtype).clone()  # [2, 3, 16]
    cos, sin = cos_sin(2, 16, dtype, seed=5)
    ref = fo.rope_ref(t, cos, sin)
    torch.testing.assert_close(fo.rope_(t, cos, sin), ref, rtol=0, atol=0, equal_nan=True)


def test_unsupported_inputs_use_composite():
    """fp16, mixed dtypes, a non-contiguous last dim and 3-D inputs take the composite path and still agree."""
    x16 = rand(5, 64, dtype=torch.float16, seed=1)
    w16 = rand(64, dtype=torch.float16, seed=2)
    assert torch.equal(fo.rms_norm(x16, w16, EPS), fo.rms_norm_ref(x16, w16, EPS))
    xb = rand(5, 64, dtype=torch.bfloat16, seed=3)
    w32 = rand(64, dtype=torch.float32, seed=4)
    out = fo.rms_norm(xb, w32, EPS)  # promotes to fp32 like the composite
    assert out.dtype == torch.float32 and torch.equal(out, fo.rms_norm_ref(xb, w32, EPS))
    gu_t = rand(128, 5, dtype=torch.float32, seed=5).t()  # [5, 128], last dim stride 5
    assert torch.equal(fo.silu_mul(gu_t), fo.silu_mul_ref(gu_t))
    x3 = rand(2, 3, 64, dtype=torch.float32, seed=6)
    w = rand(64, dtype=torch.float32, seed=7)
    assert torch.equal(fo.rms_norm(x3, w, EPS), fo.rms_norm_ref(x3, w, EPS))
    with pytest.raises(RuntimeError):
        fo.rms_norm(rand(5, 64, dtype=torch.float32, seed=8), rand(32, dtype=torch.float32, seed=9), EPS)


def test_fallback_without_extension(monkeypatch):
    """With no extension (fused_ops=off, or none built) the ops run the composites, with the same in-place
    semantics."""
    monkeypatch.setattr(fo, "default_ops", lambda: fo.COMPOSITES)
    assert not fo.COMPOSITES.enabled
    T, h = 5, 64
    hid = rand(T, h, dtype=torch.bfloat16, seed=1)
    delta = rand(T, h, dtype=torch.bfloat16, seed=2)
    w = rand(h, dtype=torch.bfloat16, seed=3)
    ref_h = hid + delta
    out = fo.add_rms_norm_(hid, delta, w, EPS)
    assert torch.equal(hid, ref_h) and torch.equal(out, fo.rms_norm_ref(ref_h, w, EPS))
    t = rand(T, 3, 16, dtype=torch.float32, seed=4)
    cos, sin = cos_sin(T, 16, torch.float32, seed=5)
    ref = fo.rope_ref(t, cos, sin)
    assert torch.equal(fo.rope_(t, cos, sin), ref) and torch.equal(t, ref)
    gu = rand(T, 2 * h, dtype=torch.float32, seed=6)
    assert torch.equal(fo.silu_mul(gu), fo.silu_mul_ref(gu))


def test_autograd_inputs_use_composite():
    """A tensor that requires grad (grad mode on) is not handed to the kernel, so autograd still works."""
    x = rand(4, 64, dtype=torch.float32, seed=1).requires_grad_()
    w = rand(64, dtype=torch.float32, seed=2)
    fo.rms_norm(x, w, EPS).sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [1, 7, 16, 100, 49152])
def test_argmax_equals_torch(dtype, V, threads):
    """Row argmax equals torch.argmax exactly: random rows, ties (lowest index wins), -inf rows, NaN
    (torch: the first NaN), +inf, -0.0 vs 0.0, strided rows."""
    x = rand(12, V, dtype=dtype, seed=V)
    x[1] = 3.0  # all tied
    x[2] = float("-inf")
    if V > 3:
        x[3, V // 2] = float("nan")
        x[3, V - 1] = float("nan")
        x[4, V - 1] = float("inf")
        x[5, 0], x[5, V - 2] = 100.0, 100.0  # tie between first and late index
        x[6] = 0.0
        x[6, V - 1] = -0.0
        x[7, 1:] = float("nan")
    wide = torch.zeros(12, V + 5, dtype=dtype)
    wide[:, :V] = x
    for t in (x, wide[:, :V], x[::2]):
        assert torch.equal(fo.argmax(t), t.argmax(dim=1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [0, 1, 7, 64])
def test_write_kv_equals_index_copy(dtype, T):
    """K/V head views of a fused qkv buffer stored at scattered slots: identical caches to index_copy_."""
    nb, bs, kvh, d, H = 20, 4, 3, 16, 6
    qkv = rand(T, (H + 2 * kvh) * d, dtype=dtype, seed=T)
    k = qkv[:, H * d:(H + kvh) * d].view(T, kvh, d)
    v = qkv[:, (H + kvh) * d:].view(T, kvh, d)
    slots = torch.randperm(nb * bs, generator=torch.Generator().manual_seed(T))[:T]
    kc, vc = rand(nb, bs, kvh, d, dtype=dtype, seed=1), rand(nb, bs, kvh, d, dtype=dtype, seed=2)
    kr, vr = kc.clone(), vc.clone()
    fo.write_kv_(kc, vc, k, v, slots)
    fo.write_kv_ref(kr, vr, k, v, slots)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)


def test_write_kv_bad_slot_writes_nothing():
    """The kernel checks every slot before copying: one out of range declines the call (False) with both
    caches untouched."""
    kc, vc = torch.zeros(2, 4, 1, 8), torch.zeros(2, 4, 1, 8)
    k, v = torch.ones(2, 1, 8), torch.ones(2, 1, 8)
    ext = fo.load_extension()
    for bad in ([3, 8], [-1, 0]):
        assert ext.write_kv_(kc, vc, k, v, torch.tensor(bad)) is False
    assert not kc.any() and not vc.any()
