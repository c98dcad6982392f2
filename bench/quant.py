"""Quantized base weights, every figure of issue 21 in one run, rounds alternating, medians of per-round
ratios against the unquantized engine (or GEMM) measured in the same round. Prints JSON:

    gemm            one pass over the 30 layers' projections of the SmolLM2-135M shape (each layer its own
                    weights, as a decode step streams them) at M = 1 and 32: each quantized kernel against
                    the float linear the engine uses (bench/quant_gemm.py's set, the weights quantized by
                    quantize_for as served)
    decode          the demo model (SmolLM2-135M-Instruct) decoding 32 tokens at batch 1 and 32, unquantized
                    and in w8a16 / w4a16 / w8a8 / gguf (the demo file's own Q4_1 codes)
    mixed_adapters  32 requests for 32 distinct r=16 all-projection adapters (bench/multi_lora.py's), on a
                    w8a8 base against the unquantized base
    resident_bytes_vs_bf16  the base projections' resident bytes per mode over their bf16 bytes
    targets         each of the issue's targets: the measured ratio, the bound, met or not

The baseline is the engine's default float dtype here ("float_dtype"; fp32 where the CPU has no native
bf16 matmul). The machine drifts 20-50% within minutes: only the same-round ratios are meaningful.

    python bench/quant.py [--rounds 3] [--max-tokens 32] [--threads 2] [--skip-mixed]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from multi_lora import register  # noqa: E402
from quant_gemm import LAYERS, SHAPES, fp32_backend, run_set  # noqa: E402

from openlora import LLM, SamplingParams  # noqa: E402
from openlora.kernels import quant_gemm as qg  # noqa: E402
from openlora.model.linear import Linear  # noqa: E402
from openlora.model.quant_linear import quantize_for  # noqa: E402

MODES = (None, "w8a16", "w4a16", "w8a8", "gguf")  # None: unquantized; gguf: the demo file's own Q4_1 codes
# (name, section, key, bound): ratios to the unquantized run of the same round, from issue 21's Build 2/Done.
TARGETS = [("w8a8 GEMM at M=32 >= 1.4x", "gemm", "w8a8@32", 1.4),
           ("w8a8 batch-32 decode >= 1.3x", "decode", "w8a8@32", 1.3),
           ("w8 batch-1 decode >= 1.5x", "decode", "w8a16@1", 1.5),
           ("w4 batch-1 decode >= 1.8x (goal 2.4x)", "decode", "w4a16@1", 1.8),
           ("w4 batch-32 decode >= 1.0x", "decode", "w4a16@32", 1.0),
           ("32-adapter mixed run on a w8a8 base >= 1.2x", "mixed_adapters", "w8a8@32", 1.2)]


def projection_bytes(llm: LLM) -> tuple[int, int]:
    """(resident bytes of the layers' base projections, their bytes in bf16)."""
    got = bf16 = 0
    for layer in llm.engine.runner.model.layers:
        for lin in (layer.qkv, layer.o, layer.gate_up, layer.down):
            n = lin.out_features * lin.in_features
            bf16 += 2 * n
            got += getattr(lin, "nbytes", None) or n * torch.finfo(llm.engine.runner.dtype).bits // 8
    return got, bf16


def decode(llm: LLM, batch: int, max_tokens: int, adapters=None) -> float:
    """Generated tokens per second for `batch` prompts of 16 tokens."""
    prompts = [[(37 * i + j) % 20000 + 100 for j in range(16)] for i in range(batch)]
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, adapters=adapters)
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t0)


def gemm_sets() -> dict[str, list]:
    """mode -> one callable per projection of the 30-layer set (float: the engine's fp32 linear)."""
    backend, g = fp32_backend(), torch.Generator().manual_seed(0)
    calls: dict[str, list] = {m: [] for m in ("float", "w8a16", "w4a16", "w8a8")}
    for _ in range(LAYERS):
        for n, k in SHAPES.values():
            w = torch.randn(n, k, generator=g) * 0.02
            calls["float"].append(Linear(w, None, backend))
            for m in ("w8a16", "w4a16", "w8a8"):
                calls[m].append(lambda x, p=qg.pack(quantize_for(m, w), m): qg.linear(x, p))
    return calls


def rounds(fns: dict[str, callable], n: int) -> dict[str, float]:
    """Median over `n` rounds of each fn's rate relative to "float" (higher is faster), the order rotating."""
    names = list(fns)
    for f in fns.values():  # warm up
        f()
    ratios: dict[str, list[float]] = {k: [] for k in names}
    for r in range(n):
        got = {k: fns[k]() for k in names[r % len(names):] + names[:r % len(names)]}
        for k in names:
            ratios[k].append(got[k] / got["float"])
    return {k: round(statistics.median(v), 3) for k, v in ratios.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-mixed", action="store_true", help="leave out the 32-adapter run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out: dict = {"bench": "quant", "model": "SmolLM2-135M-Instruct (demo)", "threads": args.threads,
                 "quant_isa": qg.isa(), "rounds": args.rounds, "max_tokens": args.max_tokens}

    calls = gemm_sets()
    out["gemm"] = {}
    for m in (1, 32):
        xs = {k: torch.randn(m, k) for k in {k for _, k in SHAPES.values()}}
        rates = rounds({v: (lambda fs=fs: 1.0 / run_set(fs, xs)) for v, fs in calls.items()}, 3 * args.rounds)
        out["gemm"].update({f"{v}@{m}": r for v, r in rates.items() if v != "float"})
    del calls

    engines = {m or "float": LLM(num_threads=args.threads, quantization=m, enable_prefix_caching=False,
                                 max_loras=32, max_cpu_loras=64, lora_pool_rows=32 * 16) for m in MODES}
    out["float_dtype"] = engines["float"].config.dtype
    out["float_linear"] = engines["float"].engine.runner.plan.linear
    out["decode"] = {}
    for batch in (1, 32):
        rates = rounds({m: (lambda e=e: decode(e, batch, args.max_tokens)) for m, e in engines.items()}, args.rounds)
        out["decode"].update({f"{m}@{batch}": r for m, r in rates.items() if m != "float"})
    out["resident_bytes_vs_bf16"] = {m: round(a / b, 3) for m, (a, b) in
                                     ((m, projection_bytes(e)) for m, e in engines.items())}
    if not args.skip_mixed:
        pair = {"float": engines["float"], "w8a8": engines["w8a8"]}
        names = {m: register(e, "r16_all", 32) for m, e in pair.items()}
        rates = rounds({m: (lambda e=e, m=m: decode(e, 32, args.max_tokens, names[m])) for m, e in pair.items()},
                       args.rounds)
        out["mixed_adapters"] = {"w8a8@32": rates["w8a8"]}
    out["targets"] = [{"target": name, "ratio": out[sec][key], "bound": bound, "met": out[sec][key] >= bound}
                      for name, sec, key, bound in TARGETS if key in out.get(sec, {})]
    out["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
