"""Micro-benchmark of paged decode attention on the SmolLM2-135M shape (H=9, KVH=3, d=64, block 16); prints JSON.

Compares, per layer call, the C++ kernel reading the paged cache in place (openlora.kernels.attention_cpu)
with the gather + SDPA decode path of openlora/model/attention.py as it was when this bench was written
(copied below as `gather_sdpa`, the mask prebuilt once per step as the model runner does), for N=32
sequences at contexts 64 and 512 (all equal) and a mixed batch (random 1..512, the gather path pads every
row to the longest), fp32 and bf16, with 1 and 2 intra-op threads; plus one prefill chunk of 16 and one of
128 queries on top of a cached context (prefill entry vs the current gather + masked SDPA branch). The
machine may be shared: the load average is printed with the results.

    python bench/attention_micro.py [--min-time 0.3] [--threads 1,2] [--dtypes fp32,bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from openlora.kernels import attention_cpu  # noqa: E402

H, KVH, D, BS, N = 9, 3, 64, 16, 32
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def gather_sdpa(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                mask: torch.Tensor, scale: float) -> torch.Tensor:
    """The decode branch of openlora.model.attention.paged_attention (copied): [nd, H, d] out."""
    nd = q.shape[0]
    kvh, d = k_cache.shape[2], k_cache.shape[3]
    nb = k_cache.shape[0]
    flat = block_table.view(-1)  # [nd * max_blocks]
    kk = k_cache.view(nb, -1).index_select(0, flat).view(nd, -1, kvh, d).transpose(1, 2)  # [nd, KVH, L, d]
    vv = v_cache.view(nb, -1).index_select(0, flat).view(nd, -1, kvh, d).transpose(1, 2)
    qq = q.unsqueeze(2)  # [nd, H, 1, d]
    o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=scale, enable_gqa=kvh != q.shape[1])
    return o.squeeze(2)


def gather_sdpa_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_ids: torch.Tensor,
                        start: int, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """The prefill-with-context branch of openlora.model.attention.paged_attention (copied): [n, H, d]."""
    n = q.shape[0]
    kvh, d = k_cache.shape[2], k_cache.shape[3]
    ctx = start + n
    qq = q.transpose(0, 1).unsqueeze(0)  # [1, H, n, d]
    kk = k_cache[block_ids].view(-1, kvh, d)[:ctx].transpose(0, 1).unsqueeze(0)
    vv = v_cache[block_ids].view(-1, kvh, d)[:ctx].transpose(0, 1).unsqueeze(0)
    o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=scale, enable_gqa=kvh != q.shape[1])
    return o.squeeze(0).transpose(0, 1)


def bench_prefill(dtype: torch.dtype, n: int, start: int, min_time: float) -> dict:
    """One chunk of n queries on top of `start` cached tokens (single sequence)."""
    q, kc, vc, table, _, _ = make_case([start + n], dtype, seed=2)
    q = torch.randn(n, H, D).to(dtype)
    ids = table[0]
    qpos = torch.arange(start, start + n)[:, None]
    mask = torch.arange(start + n)[None, :] <= qpos  # built once per step by the runner
    scale = D ** -0.5
    row = {"case": f"prefill_chunk{n}_start{start}",
           "gather_sdpa_us": round(time_call(lambda: gather_sdpa_prefill(q, kc, vc, ids, start, mask, scale),
                                             min_time), 1)}
    if attention_cpu.available():
        ref = gather_sdpa_prefill(q, kc, vc, ids, start, mask, scale)
        got = attention_cpu.paged_prefill_attention(q, kc, vc, ids, start, scale)
        row["max_abs_diff"] = float((got.float() - ref.float()).abs().max())
        row["kernel_us"] = round(time_call(lambda: attention_cpu.paged_prefill_attention(q, kc, vc, ids, start, scale),
                                           min_time), 1)
        row["speedup_vs_gather_sdpa"] = round(row["gather_sdpa_us"] / row["kernel_us"], 2)
    return row


def make_case(lens: list[int], dtype: torch.dtype, seed: int = 0):
    """Random q (a strided view of a fused qkv row, as in the model), a cache with shuffled block ids."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // BS) for n in lens]
    width = max(need)
    num_blocks = sum(need) + 16
    perm = torch.randperm(num_blocks, generator=g)
    table = torch.zeros(len(lens), width, dtype=torch.long)
    at = 0
    for i, k in enumerate(need):
        table[i, :k] = perm[at:at + k]
        at += k
    k_cache = torch.randn(num_blocks, BS, KVH, D, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, BS, KVH, D, generator=g).to(dtype)
    qkv = torch.randn(len(lens), (H + 2 * KVH) * D, generator=g).to(dtype)
    q = qkv[:, : H * D].view(len(lens), H, D)
    seq_lens = torch.tensor(lens, dtype=torch.long)
    kpos = torch.arange(width * BS)[None, :]
    mask = (kpos < seq_lens[:, None])[:, None, None, :]  # built once per step by the runner
    return q, k_cache, v_cache, table, seq_lens, mask


def time_call(fn, min_time: float) -> float:
    """Median microseconds per call over 5 rounds, each at least min_time/5 seconds, after warm-up."""
    fn()
    n = 1
    while True:  # calibrate the calls per round
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t0
        if dt >= min_time / 5:
            break
        n *= 2
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        rounds.append((time.perf_counter() - t0) / n)
    return statistics.median(rounds) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--min-time", type=float, default=0.5)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--dtypes", default="fp32,bf16")
    args = ap.parse_args()
    ext_ok = attention_cpu.available()
    g = torch.Generator().manual_seed(1)
    cases = {"ctx64": [64] * N, "ctx512": [512] * N,
             "mixed1-512": torch.randint(1, 513, (N,), generator=g).tolist()}
    scale = D ** -0.5
    results = []
    load_before = os.getloadavg()
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for dname in args.dtypes.split(","):
            dtype = DTYPES[dname]
            for cname, lens in cases.items():
                q, kc, vc, table, sl, mask = make_case(lens, dtype)
                row = {"threads": threads, "dtype": dname, "case": cname, "N": N,
                       "kv_bytes": 2 * sum(lens) * KVH * D * kc.element_size()}
                row["gather_sdpa_us"] = round(time_call(lambda: gather_sdpa(q, kc, vc, table, mask, scale),
                                                        args.min_time), 1)
                if ext_ok:
                    out = torch.empty(N, H, D, dtype=dtype)
                    ref = gather_sdpa(q, kc, vc, table, mask, scale)
                    got = attention_cpu.paged_decode_attention(q, kc, vc, table, sl, scale, out=out)
                    row["max_abs_diff"] = float((got.float() - ref.float()).abs().max())
                    row["kernel_us"] = round(time_call(
                        lambda: attention_cpu.paged_decode_attention(q, kc, vc, table, sl, scale, out=out),
                        args.min_time), 1)
                    row["kernel_portable_us"] = round(time_call(
                        lambda: attention_cpu.paged_decode_attention(q, kc, vc, table, sl, scale, out=out,
                                                                     portable=True), args.min_time), 1)
                    row["speedup_vs_gather_sdpa"] = round(row["gather_sdpa_us"] / row["kernel_us"], 2)
                    row["kernel_GBps"] = round(row["kv_bytes"] / row["kernel_us"] / 1e3, 2)
                results.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
            for n, start in ((16, 496), (128, 384)):
                row = {"threads": threads, "dtype": dname, **bench_prefill(dtype, n, start, args.min_time)}
                results.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    print(json.dumps({
        "bench": "attention_micro", "shape": {"H": H, "KVH": KVH, "d": D, "block_size": BS, "N": N},
        "torch": torch.__version__, "extension": ext_ok,
        "has_avx512": bool(attention_cpu.load_extension().has_avx512()) if ext_ok else False,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "results": results,
    }, indent=1))


if __name__ == "__main__":
    main()
