"""SGMV backends vs the plain-loop reference over many batch compositions."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from openlora.kernels import sgmv_reference
from openlora.kernels.backend import LoRABackend
from openlora.lora.batch import LoRABatch, SiteRows

# Tolerances vs the reference, keyed by dtype.
# fp32: both sides compute in fp32 and differ only in summation order over in_features (<= 576 here)
#   and rank (<= 64*3): a few fp32 ulps of the partial sums, far below 1e-5 for O(1) values.
# bf16 / fp16: both sides accumulate in fp32 and round the sum once into y; a different summation order
#   can land the fp32 sum on the other side of a rounding boundary, i.e. 1 ulp of the output format
#   (bf16: 2^-8 relative, fp16: 2^-11), plus the input rounding is shared so nothing else differs.
TOL: dict[torch.dtype, dict[str, float]] = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-2, rtol=8e-3),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}

IN_F, OUT_F, WIDE = 96, 80, 3  # small shapes (tails: 96 = 3*32, 80 = 5*16 + 0); y lives in a 3x wider tensor


@dataclass
class Pool:
    a: torch.Tensor  # [pool_rows, in]
    bt: torch.Tensor  # [pool_rows, out]
    rows: list[torch.Tensor]  # adapter i -> its r_i pool rows (arbitrary, non-contiguous)
    scaling: list[float]  # adapter i -> alpha / r


def make_pool(ranks: list[int], in_f: int, out_f: int, dtype: torch.dtype, gen: torch.Generator,
              spare_rows: int = 7) -> Pool:
    """A random pool where adapter i owns ranks[i] rows scattered over the pool (plus unused rows)."""
    pool_rows = sum(ranks) + spare_rows
    perm = torch.randperm(pool_rows, generator=gen)
    rows, start = [], 0
    for r in ranks:
        rows.append(perm[start : start + r].clone())
        start += r
    a = (torch.randn(pool_rows, in_f, generator=gen) / in_f**0.5).to(dtype)
    bt = (torch.randn(pool_rows, out_f, generator=gen) * 0.5).to(dtype)
    scaling = [16.0 / r for r in ranks]  # lora_alpha = 16
    return Pool(a, bt, rows, scaling)


def make_batch(pool: Pool, segments: list[tuple[list[int], list[tuple[int, float]]]], num_tokens: int,
               site: str = "q_proj") -> LoRABatch:
    """segments: (token indices, [(adapter, weight), ...]); a segment's rows are its adapters' rows
    concatenated, each row scaled by weight * alpha / r of its adapter."""
    token_idx, seg_indptr, row_idx, row_scale, row_indptr = [], [0], [], [], [0]
    for toks, mix in segments:
        token_idx += toks
        seg_indptr.append(len(token_idx))
        for adapter, weight in mix:
            row_idx += pool.rows[adapter].tolist()
            row_scale += [weight * pool.scaling[adapter]] * len(pool.rows[adapter])
        row_indptr.append(len(row_idx))
    sites = {}
    if segments:
        sites[site] = SiteRows(
            row_idx=torch.tensor(row_idx, dtype=torch.long),
            row_indptr=torch.tensor(row_indptr, dtype=torch.long),
            row_scale=torch.tensor(row_scale, dtype=torch.float32),
            row_indptr_list=row_indptr,
        )
    return LoRABatch(torch.tensor(token_idx, dtype=torch.long), torch.tensor(seg_indptr, dtype=torch.long),
                     seg_indptr, sites, num_tokens)


def composition(name: str, gen: torch.Generator) -> tuple[list[int], list, int]:
    """(adapter ranks, segments, num_tokens) for a named batch composition."""
    def perm(n: int) -> list[int]:
        return torch.randperm(n, generator=gen).tolist()

    if name == "all_distinct":  # decode: 32 requests, 32 adapters, 1 token each
        return [16] * 32, [([t], [(t, 1.0)]) for t in range(32)], 32
    if name == "all_same_one_segment":  # 24 decode tokens of one adapter grouped in one segment
        return [16], [(perm(24), [(0, 1.0)])], 24
    if name == "all_same_many_segments":  # same adapter, one segment per request
        return [8], [([t], [(0, 1.0)]) for t in perm(12)], 12
    if name == "zipf":  # 40 requests; adapter popularity ~ 1/k; segments group tokens by adapter
        probs = torch.tensor([1.0 / k for k in range(1, 9)])
        choice = torch.multinomial(probs, 40, replacement=True, generator=gen).tolist()
        order = perm(40)
        segs = [([t for t in order if choice[t] == ad], [(ad, 1.0)]) for ad in range(8)]
        return [4, 8, 16, 16, 8, 32, 2, 16], [s for s in segs if s[0]], 40
    if name == "mixed_base":  # 20 tokens, 9 of them base-only (in no segment)
        toks = perm(20)
        return [8, 16, 4], [(toks[0:5], [(0, 1.0)]), ([toks[5]], [(1, 1.0)]), (toks[6:11], [(2, 1.0)])], 20
    if name == "prefill_long":  # a 200-token prefill chunk + 13-token chunk + decode tokens
        toks = perm(220)
        return [16, 8, 4], [(toks[:200], [(0, 1.0)]), (toks[200:213], [(1, 1.0)]),
                            ([toks[213]], [(2, 1.0)]), ([toks[214]], [(0, 1.0)])], 220
    if name == "weighted":  # compositions of 2-3 adapters with different weights
        return [8, 16, 4], [([0, 1, 2], [(0, 0.7), (1, 0.3)]), ([4], [(0, 0.25), (1, 0.5), (2, -1.5)]),
                            (list(range(5, 25)), [(2, 2.0), (1, 0.1)])], 26
    if name == "ranks_1_to_64":  # heterogeneous ranks, mixed segment lengths
        ranks = [1, 2, 3, 7, 16, 31, 64]
        toks = perm(30)
        return ranks, [([toks[i]], [(i, 1.0)]) for i in range(7)] + [(toks[7:17], [(6, 1.0)]),
                                                                     (toks[17:30], [(0, 0.5), (5, 1.0)])], 32
    if name == "empty":
        return [8], [], 6
    raise ValueError(name)


COMPOSITIONS = ["all_distinct", "all_same_one_segment", "all_same_many_segments", "zipf", "mixed_base",
                "prefill_long", "weighted", "ranks_1_to_64", "empty"]


def add_dora(batch: LoRABatch, gen: torch.Generator, shift: bool = True, layers: int = 2, entries: int = 3) -> None:
    """Make every segment but each third one DoRA: row-scale tables [layers, entries, OUT_F] with the
    identity at entry 0 and random g in [0.5, 1.5] (and shifts) elsewhere."""
    rows = batch.sites.get("q_proj")
    if rows is None:
        return
    g = torch.empty(layers, entries, OUT_F).uniform_(0.5, 1.5, generator=gen)
    g[:, 0] = 1.0
    sh = torch.randn(layers, entries, OUT_F, generator=gen) * 0.1 if shift else None
    if sh is not None:
        sh[:, 0] = 0.0
    seg = [(i % entries) for i in range(batch.num_segments)]
    rows.seg_dora, rows.seg_dora_list, rows.g_table, rows.shift_table = torch.tensor(seg), seg, g, sh


def run_case(backend: LoRABackend, name: str, dtype: torch.dtype, seed: int = 0, dora: str = "") -> None:
    """Run `backend` and the reference on the same composition; y is a strided column slice. `dora`:
    "" (plain LoRA), "g" (DoRA row scales) or "g+shift" (row scales and bias shifts), at layer 1."""
    gen = torch.Generator().manual_seed(seed)
    ranks, segments, num_tokens = composition(name, gen)
    pool = make_pool(ranks, IN_F, OUT_F, dtype, gen)
    batch = make_batch(pool, segments, num_tokens)
    if dora:
        add_dora(batch, gen, shift=dora == "g+shift")
    x = torch.randn(num_tokens, IN_F, generator=gen).to(dtype)
    wide = torch.randn(num_tokens, WIDE * OUT_F, generator=gen).to(dtype)  # a fused output, e.g. qkv
    sl = slice(OUT_F, 2 * OUT_F)
    y_ref, y_out = wide.clone(), wide.clone()
    sgmv_reference(y_ref[:, sl], x, pool.a, pool.bt, batch, "q_proj", layer=1)
    backend.sgmv(y_out[:, sl], x, pool.a, pool.bt, batch, "q_proj", layer=1)

    # Other columns of the wide tensor, and base-only tokens, are untouched bit for bit.
    assert torch.equal(y_out[:, : OUT_F], wide[:, : OUT_F]) and torch.equal(y_out[:, 2 * OUT_F :], wide[:, 2 * OUT_F :])
    lora_tokens = set(batch.token_idx.tolist())
    for t in range(num_tokens):
        if t not in lora_tokens:
            assert torch.equal(y_out[t], wide[t]), f"base-only token {t} changed"
    if segments:  # the case really adds something (guards against a no-op backend passing)
        assert not torch.equal(y_ref, wide)
    torch.testing.assert_close(y_out, y_ref, **TOL[dtype])


def _cpp(mm_min_tokens: int | None = None) -> LoRABackend:
    from openlora.kernels.cpu import CppBackend

    try:
        return CppBackend() if mm_min_tokens is None else CppBackend(mm_min_tokens=mm_min_tokens)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"C++ extension does not build here: {e}")


CPU_BACKENDS = {
    "torch": lambda: __import__("openlora.kernels.cpu", fromlist=["TorchBackend"]).TorchBackend(),
    "cpp": lambda: _cpp(),
    "cpp_gemm_only": lambda: _cpp(mm_min_tokens=1),  # every segment through at::mm
    "cpp_stream_only": lambda: _cpp(mm_min_tokens=1 << 30),  # every segment through the streaming kernel
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", COMPOSITIONS)
@pytest.mark.parametrize("backend_name", list(CPU_BACKENDS))
def test_cpu_backends_match_reference(backend_name: str, name: str, dtype: torch.dtype) -> None:
    run_case(CPU_BACKENDS[backend_name](), name, dtype)


def test_cpp_fp16_and_odd_shapes() -> None:
    """fp16 and in/out sizes that are not multiples of the 16-lane vectors (masked tails)."""
    backend = _cpp(mm_min_tokens=1 << 30)
    gen = torch.Generator().manual_seed(3)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for in_f, out_f in ((1, 1), (17, 33), (600, 1030)):
            pool = make_pool([5, 16], in_f, out_f, dtype, gen)
            batch = make_batch(pool, [([0, 3, 4], [(0, 1.0)]), ([2], [(1, 0.5), (0, 1.0)])], 5)
            x = torch.randn(5, in_f, generator=gen).to(dtype)
            y0 = torch.randn(5, out_f, generator=gen).to(dtype)
            y_ref, y_out = y0.clone(), y0.clone()
            sgmv_reference(y_ref, x, pool.a, pool.bt, batch, "q_proj")
            backend.sgmv(y_out, x, pool.a, pool.bt, batch, "q_proj")
            torch.testing.assert_close(y_out, y_ref, **TOL[dtype])
            assert torch.equal(y_out[1], y0[1])


@pytest.mark.parametrize("backend_name", list(CPU_BACKENDS))
def test_absent_site_is_noop(backend_name: str) -> None:
    backend = CPU_BACKENDS[backend_name]()
    gen = torch.Generator().manual_seed(1)
    pool = make_pool([8], IN_F, OUT_F, torch.float32, gen)
    batch = make_batch(pool, [([0, 1], [(0, 1.0)])], 3, site="k_proj")
    y = torch.randn(3, OUT_F, generator=gen)
    y0 = y.clone()
    backend.sgmv(y, torch.randn(3, IN_F, generator=gen), pool.a, pool.bt, batch, "q_proj")
    assert torch.equal(y, y0)


def test_cpp_rejects_bad_metadata() -> None:
    """Out-of-range indices and duplicated tokens are errors, not memory corruption or races."""
    backend = _cpp()
    gen = torch.Generator().manual_seed(2)
    pool = make_pool([4], IN_F, OUT_F, torch.float32, gen)
    x, y = torch.randn(4, IN_F), torch.zeros(4, OUT_F)
    for segments in ([([0, 9], [(0, 1.0)])], [([1], [(0, 1.0)]), ([1], [(0, 1.0)])]):
        with pytest.raises(RuntimeError):
            backend.sgmv(y, x, pool.a, pool.bt, make_batch(pool, segments, 4), "q_proj")
    batch = make_batch(pool, [([0], [(0, 1.0)])], 4)
    batch.sites["q_proj"].row_idx[0] = 10_000
    with pytest.raises(RuntimeError):
        backend.sgmv(y, x, pool.a, pool.bt, batch, "q_proj")



DORA_CASES = ["all_distinct", "zipf", "mixed_base", "prefill_long", "all_same_many_segments"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dora", ["g", "g+shift"])
@pytest.mark.parametrize("name", DORA_CASES)
@pytest.mark.parametrize("backend_name", list(CPU_BACKENDS))
def test_cpu_backends_match_reference_with_dora(backend_name: str, name: str, dora: str, dtype: torch.dtype) -> None:
    """DoRA's epilogue (y = g * (y + delta) + shift, one rounding) in the streaming kernel, the GEMM
    path and the torch backend, against the reference; plain segments in the same batch as well."""
    run_case(CPU_BACKENDS[backend_name](), name, dtype, dora=dora)


# ---- Triton, through its CPU interpreter ----------------------------------------------------------------
# TRITON_INTERPRET=1 must be set before triton compiles anything, so the outer test re-runs this file's
# triton_interp tests in a fresh interpreter process with the variable set.

TRITON_CASES = ["all_distinct", "prefill_long", "weighted", "ranks_1_to_64", "mixed_base", "empty"]
_IN_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(not _IN_INTERPRETER, reason="runs inside test_triton_interpreter's subprocess")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name", TRITON_CASES)
def test_triton_interp(name: str, dtype: torch.dtype) -> None:
    pytest.importorskip("triton")
    from openlora.kernels.triton_lora import TritonBackend

    run_case(TritonBackend(), name, dtype)
    if name in DORA_CASES:
        run_case(TritonBackend(), name, dtype, dora="g+shift")


@pytest.mark.slow
@pytest.mark.skipif(_IN_INTERPRETER, reason="the triton_interp tests run directly")
def test_triton_interpreter() -> None:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", f"{Path(__file__)}::test_triton_interp"],
        # 540 s: under pytest-timeout's 600 s (pyproject), so the subprocess's own timeout reports first.
        env=env, capture_output=True, text=True, timeout=540, cwd=Path(__file__).parents[2],
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "passed" in proc.stdout and "skipped" not in proc.stdout.split("\n")[-2], proc.stdout[-2000:]
