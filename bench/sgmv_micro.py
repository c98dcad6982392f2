"""Micro-benchmark of the CPU SGMV backends on SmolLM2-135M shapes; prints JSON.

A simulated decode step is 30 layers x 7 sites = 210 sgmv calls, each layer with its own pool (so the
adapter weights stream from memory as in a real model, 32 distinct r=16 adapters = ~156M weights).
For context the same 210 calls are timed for the base projection `F.linear(x, W)` of each site.

    python bench/sgmv_micro.py [--steps 5] [--dtypes fp32,bf16] [--backends cpp,torch]
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

from openlora.config import LORA_SITES, ModelShape  # noqa: E402
from openlora.lora.batch import LoRABatch, SiteRows  # noqa: E402

SHAPE = ModelShape(num_layers=30, hidden_size=576, q_size=576, kv_size=192, intermediate_size=1536,
                   vocab_size=49152)
NUM_ADAPTERS, RANK, BATCH = 32, 16, 32
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_batch(groups: list[list[int]], adapter_of_group: list[int], num_tokens: int) -> LoRABatch:
    """One segment per token group; adapter k owns the contiguous pool rows k*RANK .. k*RANK+RANK-1."""
    token_idx = [t for grp in groups for t in grp]
    seg = [0]
    for grp in groups:
        seg.append(seg[-1] + len(grp))
    row_idx = [adapter_of_group[g] * RANK + j for g in range(len(groups)) for j in range(RANK)]
    rptr = [g * RANK for g in range(len(groups) + 1)]
    rows = SiteRows(torch.tensor(row_idx), torch.tensor(rptr), torch.full((len(row_idx),), 2.0), rptr)
    return LoRABatch(torch.tensor(token_idx), torch.tensor(seg), seg, {s: rows for s in LORA_SITES}, num_tokens)


def time_step(fn, steps: int) -> float:
    """Median seconds of `fn()` over `steps` runs after one warm-up."""
    fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_dtype(dtype: torch.dtype, backends: dict, steps: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    pool_rows = NUM_ADAPTERS * RANK
    dims = {s: SHAPE.site_dims(s) for s in LORA_SITES}
    # Per layer, per site: LoRA pool (A, Bt) and base weight W [out, in].
    layers = [{s: (torch.randn(pool_rows, i, generator=gen).to(dtype) * 0.02,
                   torch.randn(pool_rows, o, generator=gen).to(dtype) * 0.02,
                   torch.randn(o, i, generator=gen).to(dtype) * 0.02) for s, (i, o) in dims.items()}
              for _ in range(SHAPE.num_layers)]
    xs = {s: torch.randn(BATCH, i, generator=gen).to(dtype) for s, (i, o) in dims.items()}
    ys = {s: torch.zeros(BATCH, o, dtype=dtype) for s, (i, o) in dims.items()}
    weight_bytes = sum(a.numel() * a.element_size() + b.numel() * b.element_size()
                       for lay in layers for a, b, _ in lay.values())

    cases = {
        "distinct32_decode": make_batch([[t] for t in range(BATCH)], list(range(BATCH)), BATCH),
        "same1_one_segment": make_batch([list(range(BATCH))], [0], BATCH),
    }

    def base_step() -> None:
        for lay in layers:
            for s in LORA_SITES:
                F.linear(xs[s], lay[s][2])

    out: dict = {"base_linear_step_ms": 1e3 * time_step(base_step, steps),
                 "lora_weight_mb_per_step_distinct32": weight_bytes / 1e6}
    for bname, backend in backends.items():
        for cname, batch in cases.items():
            def lora_step(backend=backend, batch=batch) -> None:
                for lay in layers:
                    for s in LORA_SITES:
                        a, bt, _ = lay[s]
                        backend.sgmv(ys[s], xs[s], a, bt, batch, s)

            step = time_step(lora_step, steps)
            out[f"{bname}/{cname}"] = {
                "step_ms": 1e3 * step,
                "per_call_us": 1e6 * step / (SHAPE.num_layers * len(LORA_SITES)),
                "vs_base_linears": step / (out["base_linear_step_ms"] / 1e3),
            }
            if cname == "distinct32_decode":
                out[f"{bname}/{cname}"]["weight_GBps"] = weight_bytes / step / 1e9
    # The no-adapter path: a batch with no LoRA sites.
    empty = LoRABatch(torch.zeros(0, dtype=torch.long), torch.zeros(1, dtype=torch.long), [0], {}, BATCH)
    for bname, backend in backends.items():
        a, bt, _ = layers[0]["q_proj"]
        n = 20000
        t0 = time.perf_counter()
        for _ in range(n):
            backend.sgmv(ys["q_proj"], xs["q_proj"], a, bt, empty, "q_proj")
        out[f"{bname}/no_adapter_call_ns"] = 1e9 * (time.perf_counter() - t0) / n
    return out


def bench_prefill(dtype: torch.dtype, steps: int) -> dict:
    """One q_proj-shaped call: a 256-token prefill segment through at::mm vs the streaming kernel."""
    from openlora.kernels.cpu import CppBackend

    gen = torch.Generator().manual_seed(1)
    a = torch.randn(NUM_ADAPTERS * RANK, 576, generator=gen).to(dtype)
    bt = torch.randn(NUM_ADAPTERS * RANK, 1536, generator=gen).to(dtype)
    out = {}
    for n in (8, 16, 32, 64, 128, 256):
        x = torch.randn(n, 576, generator=gen).to(dtype)
        y = torch.zeros(n, 1536, dtype=dtype)
        batch = make_batch([list(range(n))], [3], n)
        for label, mm_min in (("gemm", 1), ("stream", 1 << 30)):
            be = CppBackend(mm_min_tokens=mm_min)
            out[f"segment{n}_{label}_us"] = 1e6 * time_step(lambda: be.sgmv(y, x, a, bt, batch, "gate_proj"),
                                                            steps * 10)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--backends", default="cpp,torch")
    ap.add_argument("--threads", type=int, default=0, help="torch/OpenMP threads (0: leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from openlora.kernels.cpu import CppBackend, TorchBackend

    makers = {"cpp": CppBackend, "torch": TorchBackend}
    backends = {b: makers[b]() for b in args.backends.split(",")}
    result = {"threads": torch.get_num_threads(), "load_avg_1min_before": os.getloadavg()[0], "batch": BATCH,
              "adapters": NUM_ADAPTERS, "rank": RANK,
              "calls_per_step": SHAPE.num_layers * len(LORA_SITES)}
    with torch.inference_mode():
        for name in args.dtypes.split(","):
            result[name] = bench_dtype(DTYPES[name], backends, args.steps)
            if "cpp" in backends:
                result[name]["cpp_segment_paths"] = bench_prefill(DTYPES[name], args.steps)
    result["load_avg_1min_after"] = os.getloadavg()[0]  # other processes on the box skew the numbers
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
