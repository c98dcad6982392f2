"""Quantized base weights end to end: decode throughput of the demo model (SmolLM2-135M-Instruct) kept in
w8a16 / w4a16 / w8a8 against the same model unquantized, in one process, rounds alternating between the
engines, medians. Prints JSON: tokens/s per mode and batch, the ratio to the unquantized engine measured
in the same rounds, and the resident bytes of the base projections per mode relative to bf16.

    python bench/quant.py [--rounds 3] [--max-tokens 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from openlora import LLM, SamplingParams

MODES = (None, "w8a16", "w4a16", "w8a8", "gguf")  # gguf: the demo file's own Q4_1 codes


def projection_bytes(llm: LLM) -> tuple[int, int]:
    """(resident bytes of the layers' base projections, their bytes in bf16)."""
    got = bf16 = 0
    for layer in llm.engine.runner.model.layers:
        for lin in (layer.qkv, layer.o, layer.gate_up, layer.down):
            n = lin.out_features * lin.in_features
            bf16 += 2 * n
            got += getattr(lin, "nbytes", None) or n * torch.finfo(llm.engine.runner.dtype).bits // 8
    return got, bf16


def run(llm: LLM, batch: int, max_tokens: int) -> float:
    """Generated tokens per second for `batch` prompts of 16 tokens."""
    prompts = [[(37 * i + j) % 20000 + 100 for j in range(16)] for i in range(batch)]
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    dt = time.perf_counter() - t0
    return sum(len(o.outputs[0].token_ids) for o in outs) / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    engines = {m: LLM(num_threads=args.threads, quantization=m, enable_prefix_caching=False) for m in MODES}
    for llm in engines.values():  # warm up: kernels loaded, first-step allocations done
        run(llm, 2, 4)
    rates: dict[tuple[str, int], list[float]] = {}
    ratios: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        for batch in (1, 32):
            base = None
            for m in MODES:  # alternating: every mode once per round, the unquantized engine first
                r = run(engines[m], batch, args.max_tokens)
                rates.setdefault((m or "float", batch), []).append(r)
                base = r if m is None else base
                ratios.setdefault((m or "float", batch), []).append(r / base)
    from openlora.kernels import quant_gemm

    out = {"bench": "quant", "model": "SmolLM2-135M-Instruct (demo)", "threads": args.threads,
           "dtype": engines[None].config.dtype, "float_linear": engines[None].engine.runner.plan.linear,
           "quant_isa": quant_gemm.isa(), "rounds": args.rounds, "max_tokens": args.max_tokens,
           "decode_tokens_per_s": {f"{m}@{b}": round(statistics.median(v), 1) for (m, b), v in rates.items()},
           "ratio_vs_float": {f"{m}@{b}": round(statistics.median(v), 3) for (m, b), v in ratios.items()},
           "resident_bytes_vs_bf16": {m or "float": round(a / b, 3)
                                      for m, (a, b) in ((m, projection_bytes(e)) for m, e in engines.items())}}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
