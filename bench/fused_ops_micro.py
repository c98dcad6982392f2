"""Micro-benchmark of the fused decoder-layer elementwise ops (openlora.kernels.fused_ops); prints JSON.

Per call, on the SmolLM2-135M shape (hidden 576, 9 + 3 heads of 64, intermediate 1536), for T=32 (a
decode step of batch 32) and T=1024 (a prefill chunk), fp32 and bf16, with 2 intra-op threads:
  composite  - the torch ops of openlora/model/llama.py as they are (rms_norm, `h + delta` then rms_norm,
               apply_rope on the q|k head view of the fused qkv buffer, silu(gate) * up)
  fused      - one extension call each (rope_ in place on the same view)
Then the per-step estimate for 30 layers with the integration in the report: per layer 2 add_rms_norm_
(input norm fused with the previous layer's `h + down`, post-attention norm fused with `h + attn_out`),
1 rope_, 1 silu_mul; plus layer 0's rms_norm and the final add_rms_norm_ (replacing the last `h + down`
and the final norm). Composite side: 61 rms_norm + 60 residual adds + 30 RoPE + 30 silu*mul.
`--sweep` also times each fused op at T in 1..64 with the parallel threshold off (always 2 threads) and
at max (always 1 thread), which is how the default threshold in fused_ops_cpu.cpp was chosen.
The machine may be shared: the load average is printed with the results.

    python bench/fused_ops_micro.py [--min-time 0.3] [--sweep]
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

from openlora.kernels import fused_ops as fo  # noqa: E402

HID, H, KVH, D, INTER, LAYERS, EPS = 576, 9, 3, 64, 1536, 30, 1e-5
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def time_us(fn: Callable[[], object], min_time: float) -> float:
    """Median over 5 rounds of the mean per-call time (us), each round running >= min_time / 5 seconds."""
    for _ in range(3):
        fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 0.02:
        fn()
        n += 1
    per = (time.perf_counter() - t0) / n
    reps = max(1, int(min_time / 5 / per))
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        rounds.append((time.perf_counter() - t0) / reps * 1e6)
    return statistics.median(rounds)


def make_inputs(T: int, dt: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(T, (H + 2 * KVH) * D, generator=g).to(dt)
    pos = torch.randint(0, 2048, (T,), generator=g)
    inv = 1.0 / (100000.0 ** (torch.arange(0, D, 2).float() / D))
    fr = pos.float()[:, None] * inv[None, :]
    emb = torch.cat((fr, fr), -1)
    return dict(h=torch.randn(T, HID, generator=g).to(dt), delta=torch.randn(T, HID, generator=g).to(dt),
                w=torch.randn(HID, generator=g).to(dt), qkv=qkv, cos=emb.cos().to(dt), sin=emb.sin().to(dt),
                gu=torch.randn(T, 2 * INTER, generator=g).to(dt))


def ops(x: dict[str, torch.Tensor]) -> dict[str, tuple[Callable[[], object], Callable[[], object]]]:
    """name -> (composite, fused) closures over the same inputs."""
    T = x["h"].shape[0]
    qk = x["qkv"][:, :(H + KVH) * D].view(T, H + KVH, D)
    return {
        "rms_norm": (lambda: fo.rms_norm_ref(x["h"], x["w"], EPS), lambda: fo.rms_norm(x["h"], x["w"], EPS)),
        # composite: the residual add (`h = h + delta`) followed by rms_norm, as llama.py does today
        "add_rms_norm": (lambda: fo.rms_norm_ref(x["h"] + x["delta"], x["w"], EPS),
                         lambda: fo.add_rms_norm_(x["h"], x["delta"], x["w"], EPS)),
        "residual_add": (lambda: x["h"] + x["delta"], lambda: None),
        "rope": (lambda: fo.rope_ref(qk, x["cos"], x["sin"]), lambda: fo.rope_(qk, x["cos"], x["sin"])),
        "silu_mul": (lambda: fo.silu_mul_ref(x["gu"]), lambda: fo.silu_mul(x["gu"])),
    }


def step_estimate(r: dict[str, dict[str, float]]) -> dict[str, float]:
    """Per decode step (30 layers) elementwise time in us, composite vs fused (see the module doc)."""
    comp = (61 * r["rms_norm"]["composite_us"] + 60 * r["residual_add"]["composite_us"]
            + 30 * r["rope"]["composite_us"] + 30 * r["silu_mul"]["composite_us"])
    fused = (r["rms_norm"]["fused_us"] + 60 * r["add_rms_norm"]["fused_us"] + 30 * r["rope"]["fused_us"]
             + 30 * r["silu_mul"]["fused_us"])
    return {"composite_us": round(comp, 1), "fused_us": round(fused, 1), "saved_us": round(comp - fused, 1),
            "speedup": round(comp / fused, 2)}


def sweep(min_time: float) -> dict[str, dict[str, list[float]]]:
    """Fused per-call us at small T with 2 threads forced (threshold 0) vs 1 thread forced (threshold max)."""
    out: dict[str, dict[str, list[float]]] = {}
    default = fo.load_extension().get_min_parallel_elems()
    Ts = [1, 2, 4, 8, 16, 32, 64]
    for name in ("rms_norm", "add_rms_norm", "rope", "silu_mul"):
        row: dict[str, list[float]] = {"T": Ts, "two_threads_us": [], "one_thread_us": []}
        for T in Ts:
            f = ops(make_inputs(T, torch.bfloat16))[name][1]
            for key, thr in (("two_threads_us", 0), ("one_thread_us", 1 << 62)):
                fo.set_min_parallel_elems(thr)
                row[key].append(round(time_us(f, min_time), 2))
        out[name] = row
    fo.set_min_parallel_elems(default)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--min-time", type=float, default=0.3)
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    assert fo.available(), "fused ops extension not available"
    res: dict = {"threads": torch.get_num_threads(), "loadavg": os.getloadavg(),
                 "min_parallel_elems": fo.load_extension().get_min_parallel_elems(), "results": {}}
    with torch.inference_mode():
        for dname, dt in DTYPES.items():
            for T in (32, 1024):
                r: dict[str, dict[str, float]] = {}
                for name, (comp, fused) in ops(make_inputs(T, dt)).items():
                    c = time_us(comp, args.min_time)
                    f = time_us(fused, args.min_time) if name != "residual_add" else 0.0
                    r[name] = {"composite_us": round(c, 2), "fused_us": round(f, 2),
                               "ratio": round(c / f, 2) if f else None}
                r["step_30_layers"] = step_estimate(r)
                res["results"][f"{dname}_T{T}"] = r
        if args.sweep:
            res["threshold_sweep_bf16"] = sweep(args.min_time)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
