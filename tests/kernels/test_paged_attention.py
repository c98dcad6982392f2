"""Paged attention kernel (openlora.kernels.attention_cpu) vs two references: torch SDPA on gathered K/V
and a plain float64 loop (small sizes).

Tolerances (output vs a reference computed in fp32/fp64 from the same, already-rounded inputs):
  fp32: atol 1e-5, rtol 1e-5
  bf16: atol 2e-3, rtol 8e-3 (the kernel accumulates in fp32 and rounds once to bf16: one bf16 ulp is
        2^-8 relative; the reference is rounded to bf16 the same way before comparing)
"""

from __future__ import annotations

import math

import pytest
import torch

from openlora.kernels import attention_cpu as pa

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-3, rtol=8e-3)}

pytestmark = pytest.mark.skipif(not pa.available(), reason="C++ paged attention extension not buildable")


def make_case(n_seq: int, lens: list[int], bs: int, kvh: int, h: int, d: int, dtype: torch.dtype, seed: int = 0,
              pad_id: int = 0):
    """Random q and cache; each sequence owns distinct, shuffled (non-contiguous) blocks.

    Returns q [N, H, d], k_cache/v_cache [num_blocks, bs, KVH, d], block_table int64 [N, width] padded
    with `pad_id`, seq_lens int64 [N]."""
    g = torch.Generator().manual_seed(seed)
    need = [math.ceil(n / bs) for n in lens]
    width = max(need)
    num_blocks = sum(need) + 7  # spare blocks hold garbage nobody may read
    perm = torch.randperm(num_blocks, generator=g)
    table = torch.full((n_seq, width), pad_id, dtype=torch.long)
    at = 0
    for i, k in enumerate(need):
        table[i, :k] = perm[at:at + k]
        at += k
    k_cache = torch.randn(num_blocks, bs, kvh, d, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, bs, kvh, d, generator=g).to(dtype)
    q = torch.randn(n_seq, h, d, generator=g).to(dtype)
    return q, k_cache, v_cache, table, torch.tensor(lens, dtype=torch.long)


def loop_reference(q, k_cache, v_cache, table, lens, scale, window=None) -> torch.Tensor:
    """Plain float64 loops over sequences and heads, key by key through the block table."""
    n_seq, h, d = q.shape
    bs, kvh = k_cache.shape[1], k_cache.shape[2]
    grp = h // kvh
    out = torch.zeros(n_seq, h, d, dtype=torch.float64)
    for n in range(n_seq):
        L = int(lens[n])
        lo = max(0, L - window) if window else 0
        for hh in range(h):
            g = hh // grp
            scores, vals = [], []
            for pos in range(lo, L):
                blk = int(table[n, pos // bs])
                k = k_cache[blk, pos % bs, g].double()
                scores.append(float(q[n, hh].double() @ k) * scale)
                vals.append(v_cache[blk, pos % bs, g].double())
            m = max(scores)
            w = [math.exp(s - m) for s in scores]
            tot = sum(w)
            out[n, hh] = sum(wi / tot * v for wi, v in zip(w, vals))
    return out


def check(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == dtype
    torch.testing.assert_close(got, ref.to(dtype), **TOL[dtype])


def sdpa_reference(q, k_cache, v_cache, table, lens, scale, window=None) -> torch.Tensor:
    """torch SDPA on gathered K/V, in fp32 from the (possibly bf16) inputs."""
    return pa.decode_sdpa(q.float(), k_cache.float(), v_cache.float(), table, lens, scale, window)


LONG_LENS = [1, 2, 3, 4, 5, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257, 299, 300]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("d", [24, 64, 128])
@pytest.mark.parametrize("ratio", [1, 3, 4])
@pytest.mark.parametrize("bs", [4, 16])
def test_decode_n64_vs_sdpa(bs: int, ratio: int, d: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(bs * 1000 + ratio * 100 + d)
    lens = LONG_LENS + torch.randint(1, 301, (64 - len(LONG_LENS),), generator=g).tolist()
    kvh = 2
    q, kc, vc, table, sl = make_case(64, lens, bs, kvh, kvh * ratio, d, dtype, seed=d + ratio)
    scale = d ** -0.5
    got = pa.paged_decode_attention(q, kc, vc, table, sl, scale)
    check(got, sdpa_reference(q, kc, vc, table, sl, scale), dtype)


@pytest.mark.parametrize("portable", [False, True], ids=["avx512", "portable"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("ratio,d", [(1, 24), (3, 64), (4, 128), (12, 16)])  # 12: more than one 8-head group
def test_decode_small_vs_loop(ratio: int, d: int, dtype: torch.dtype, portable: bool) -> None:
    lens = [1, 3, 4, 5, 16, 33, 40]
    kvh = 2
    # pad_id=-1: padding entries past a sequence's blocks must never be read (SDPA could not even run).
    q, kc, vc, table, sl = make_case(len(lens), lens, 4, kvh, kvh * ratio, d, dtype, seed=ratio, pad_id=-1)
    scale = 0.3
    got = pa.paged_decode_attention(q, kc, vc, table, sl, scale, portable=portable)
    check(got, loop_reference(q, kc, vc, table, sl, scale), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("window", [1, 7, 50])
@pytest.mark.parametrize("bs", [4, 16])
def test_decode_sliding_window(bs: int, window: int, dtype: torch.dtype) -> None:
    lens = [1, 6, 7, 8, 49, 50, 51, 100, 300] + list(range(10, 300, 23))
    q, kc, vc, table, sl = make_case(len(lens), lens, bs, 3, 9, 64, dtype, seed=window)
    got = pa.paged_decode_attention(q, kc, vc, table, sl, 0.125, window=window)
    check(got, sdpa_reference(q, kc, vc, table, sl, 0.125, window), dtype)
    small = slice(0, 5)
    check(got[small], loop_reference(q[small], kc, vc, table[small], sl[small], 0.125, window), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_strided_q_view(dtype: torch.dtype) -> None:
    """q as a slice of a fused qkv projection output: [N, (H + 2 KVH) * d] -> [N, H, d] view."""
    lens = [5, 17, 130, 300]
    h, kvh, d = 9, 3, 64
    _, kc, vc, table, sl = make_case(len(lens), lens, 16, kvh, h, d, dtype, seed=3)
    qkv = torch.randn(len(lens), (h + 2 * kvh) * d).to(dtype)
    q = qkv[:, : h * d].view(len(lens), h, d)
    assert not q.is_contiguous()
    got = pa.paged_decode_attention(q, kc, vc, table, sl, 0.125)
    check(got, sdpa_reference(q.contiguous(), kc, vc, table, sl, 0.125), dtype)
    qt = torch.randn(h, len(lens), d).to(dtype).transpose(0, 1)  # head-major storage, strides (d, N*d, 1)
    got = pa.paged_decode_attention(qt, kc, vc, table, sl, 0.125)
    check(got, sdpa_reference(qt.contiguous(), kc, vc, table, sl, 0.125), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("length", [1, 16, 17, 300])
def test_decode_single_sequence(length: int, dtype: torch.dtype) -> None:
    q, kc, vc, table, sl = make_case(1, [length], 16, 3, 9, 64, dtype, seed=length)
    got = pa.paged_decode_attention(q, kc, vc, table, sl, 0.125)
    check(got, loop_reference(q, kc, vc, table, sl, 0.125), dtype)


def test_decode_writes_into_out_slice() -> None:
    """out= a contiguous row range of the layer's [T, H, d] buffer; the rows after it stay untouched."""
    lens = [3, 20, 77]
    q, kc, vc, table, sl = make_case(3, lens, 16, 3, 9, 64, torch.float32)
    buf = torch.full((5, 9, 64), 7.0)
    res = pa.paged_decode_attention(q, kc, vc, table, sl, 0.125, out=buf[:3])
    assert res.data_ptr() == buf.data_ptr()
    check(buf[:3], sdpa_reference(q, kc, vc, table, sl, 0.125), torch.float32)
    assert bool((buf[3:] == 7.0).all())


def test_large_scores_are_stable() -> None:
    """Scores of several hundred (online max subtraction), and one key that dominates."""
    q, kc, vc, table, sl = make_case(4, [40, 100, 200, 300], 16, 1, 4, 64, torch.float32, seed=9)
    q = q * 30
    got = pa.paged_decode_attention(q, kc, vc, table, sl, 1.0)
    assert torch.isfinite(got).all()
    check(got, loop_reference(q, kc, vc, table, sl, 1.0), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("start,n,window", [(0, 9, None), (5, 1, None), (37, 20, None), (100, 33, 40), (0, 50, 16)])
@pytest.mark.parametrize("bs", [4, 16])
def test_prefill_with_context(bs: int, start: int, n: int, window: int | None, dtype: torch.dtype) -> None:
    h, kvh, d = 8, 2, 64
    ctx = start + n
    _, kc, vc, table, _ = make_case(1, [ctx], bs, kvh, h, d, dtype, seed=start + n)
    q = torch.randn(n, h, d).to(dtype)
    ids = table[0]
    got = pa.paged_prefill_attention(q, kc, vc, ids, start, 0.125, window)
    ref = pa.prefill_sdpa(q.float(), kc.float(), vc.float(), ids, start, 0.125, window)
    check(got, ref, dtype)
    # the same rows as n decode queries of lengths start+1 .. start+n (loop reference)
    rows = slice(0, min(n, 4))
    lens = torch.arange(start + 1, ctx + 1)[rows]
    loop = loop_reference(q[rows], kc, vc, ids.expand(len(lens), -1), lens, 0.125, window)
    check(got[rows], loop, dtype)


def test_fallback_matches_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDPA fallback (used when the extension cannot be built) gives the same answers."""
    lens = [1, 17, 64, 299]
    q, kc, vc, table, sl = make_case(4, lens, 16, 3, 9, 64, torch.float32, seed=5)
    fast = pa.paged_decode_attention(q, kc, vc, table, sl, 0.125, window=30)
    monkeypatch.setattr(pa, "available", lambda: False)
    slow = pa.paged_decode_attention(q, kc, vc, table, sl, 0.125, window=30)
    check(fast, slow.double(), torch.float32)
    check(slow, loop_reference(q, kc, vc, table, sl, 0.125, 30), torch.float32)
    pre_fast_ids = table[3]
    monkeypatch.undo()
    fast_p = pa.paged_prefill_attention(q[:3], kc, vc, pre_fast_ids, 200, 0.125)
    monkeypatch.setattr(pa, "available", lambda: False)
    slow_p = pa.paged_prefill_attention(q[:3], kc, vc, pre_fast_ids, 200, 0.125)
    check(fast_p, slow_p.double(), torch.float32)


def test_rejects_bad_block_ids_and_lengths() -> None:
    q, kc, vc, table, sl = make_case(2, [5, 20], 4, 1, 2, 16, torch.float32)
    bad = table.clone()
    bad[1, 2] = kc.shape[0]  # out of range, inside the used blocks
    with pytest.raises(RuntimeError, match="block id"):
        pa.paged_decode_attention(q, kc, vc, bad, sl, 1.0)
    with pytest.raises(RuntimeError, match="exceeds"):
        pa.paged_decode_attention(q, kc, vc, table, torch.tensor([5, 21]), 1.0)
