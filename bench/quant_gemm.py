"""Quantized linear kernels (openlora.kernels.quant_gemm) against the fp32 path this machine serves with;
prints JSON.

One "set" is every projection of the 30 layers of the SmolLM2-135M shape, each layer with its own
weights (so they stream from memory as in a decode step): qkv 576->960, o 576->576, gate_up 576->3072,
down 1536->576 (106 M weights). For M in {1, 32} rows of x, each round times one pass over the set for
every variant in turn (the order rotates each round), and the report gives the median per-set time and
the median of per-round ratios against the fp32 baseline of the same round:
    fp32        the linear backend openlora.kernels.select picks for fp32 here (on AVX2: oneDNN's packed
                linear, torch.ops.mkldnn._linear_pointwise over _reorder_linear_weight)
    bf16-dnnl   oneDNN's packed linear in bf16, where the probe passes
    w8a16       int8 per-channel codes, fp32 x
    w4a16       4-bit codes, groups of 64 (K 576) / 128 (K 1536), zero points, fp32 x
    w8a8        int8 per-channel weights, per-token dynamic int8 x, fp32 x in and out (bench/quant.py times
                the grouped w8a8 that is served)
Resident weight bytes per variant are reported relative to bf16 (2 bytes per weight).
The machine may be shared: the load average is printed with the results.

    python bench/quant_gemm.py [--rounds 9] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from openlora.kernels import quant_gemm as qg  # noqa: E402
from openlora.kernels.select import linear_usable  # noqa: E402
from openlora.model.linear import Linear  # noqa: E402
from openlora.quant.types import QuantWeight  # noqa: E402

LAYERS = 30
SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}  # (N, K)


def q8_channel(w: torch.Tensor) -> QuantWeight:
    s = w.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
    return QuantWeight(q=torch.round(w / s).clamp(-127, 127).to(torch.int8), scale=s, zero=None, bits=8,
                       group=w.shape[1])


def q4_asym(w: torch.Tensor) -> QuantWeight:
    n, k = w.shape
    group = 128 if k % 128 == 0 else 64
    wg = w.view(n, k // group, group)
    lo, hi = wg.amin(2), wg.amax(2)
    s = ((hi - lo) / 15).clamp_min(1e-12)
    z = torch.round(-lo / s).clamp(0, 15)
    q = torch.round(wg / s[..., None] + z[..., None]).clamp(0, 15).to(torch.int8).view(n, k)
    return QuantWeight(q=q, scale=s, zero=z.to(torch.int8), bits=4, group=group)


def fp32_backend() -> str:
    cpu = torch.device("cpu")
    for name in ("f32-panels", "dnnl-packed"):
        if linear_usable(name, cpu, torch.float32) is None:
            return name
    return "torch"


def build(variants: list[str], backend: str) -> tuple[dict[str, list[Callable]], dict[str, int]]:
    """variant -> one callable per projection (x -> y) over its own weights; variant -> resident bytes."""
    calls: dict[str, list[Callable]] = {v: [] for v in variants}
    nbytes = dict.fromkeys(variants, 0)
    g = torch.Generator().manual_seed(0)
    for _ in range(LAYERS):
        for n, k in SHAPES.values():
            w = torch.randn(n, k, generator=g) * 0.02
            for v in variants:
                if v == "fp32":
                    lin = Linear(w, None, backend)
                    calls[v].append(lin)
                    nbytes[v] += n * k * 4
                elif v == "bf16-dnnl":
                    lin = Linear(w.bfloat16(), None, "dnnl-packed")
                    calls[v].append(lin)
                    nbytes[v] += n * k * 2
                else:
                    p = qg.pack(q4_asym(w) if v == "w4a16" else q8_channel(w), v)
                    calls[v].append(lambda x, p=p: qg.linear(x, p))
                    nbytes[v] += p.nbytes
    return calls, nbytes


def run_set(fns: list[Callable], xs: dict[int, torch.Tensor]) -> float:
    """Seconds for one pass over the set (x of the projection's K)."""
    t0 = time.perf_counter()
    for i, fn in enumerate(fns):
        fn(xs[list(SHAPES.values())[i % len(SHAPES)][1]])
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="intra-op threads (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    backend = fp32_backend()
    bf16_ok = linear_usable("dnnl-packed", torch.device("cpu"), torch.bfloat16) is None
    variants = ["fp32"] + (["bf16-dnnl"] if bf16_ok else []) + ["w8a16", "w4a16", "w8a8"]
    calls, nbytes = build(variants, backend)
    weights = LAYERS * sum(n * k for n, k in SHAPES.values())
    result: dict = {"bench": "quant_gemm", "isa": qg.isa(), "fp32_backend": backend, "threads": torch.get_num_threads(),
                    "layers": LAYERS, "weights": weights, "rounds": args.rounds,
                    "resident_bytes_vs_bf16": {v: round(nbytes[v] / (weights * 2), 4) for v in variants},
                    "runs": {}}
    for m in (1, 32):
        g = torch.Generator().manual_seed(m)
        xs32 = {k: torch.randn(m, k, generator=g) for k in {k for _, k in SHAPES.values()}}
        xs = {v: {k: x.bfloat16() for k, x in xs32.items()} if v == "bf16-dnnl" else xs32 for v in variants}
        for v in variants:  # warm up (first-call allocations, page faults)
            run_set(calls[v], xs[v])
        times: dict[str, list[float]] = {v: [] for v in variants}
        ratios: dict[str, list[float]] = {v: [] for v in variants}
        for r in range(args.rounds):
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            got = {v: run_set(calls[v], xs[v]) for v in order}
            for v in variants:
                times[v].append(got[v])
                ratios[v].append(got["fp32"] / got[v])
        result["runs"][f"M={m}"] = {
            v: {"ms_per_set": round(statistics.median(times[v]) * 1e3, 2),
                "speedup_vs_fp32": round(statistics.median(ratios[v]), 2),
                "GOP/s": round(2 * m * weights / statistics.median(times[v]) / 1e9, 1)}
            for v in variants}
    result["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
