"""Base-model throughput: 32 requests x (32 prompt + 64 new tokens) on the SmolLM2-135M shape,
against transformers `generate` on the same model and workload (the two alternate round by round;
the ratio is the median of the per-round ratios), plus the roofline ratio, the step's dense matmuls
timed alone, and the step's reads timed as cold torch.sum reads of the same sizes (`cold_chunk_reads_ms`:
what memory costs when a step reads ~150 separate weight matrices and K/V slabs from cold caches).

Run: python bench/throughput.py [--model random|default|PATH] [--dtypes float32,bfloat16] [--skip-hf]
(`--model default`: the real demo model, SmolLM2-135M-Instruct; the JSON names the model used.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    add_model_arg,
    cold_chunk_reads_ms,
    decode_roofline_s,
    dense_floor_ms,
    emit,
    hf_generate_fn,
    measure_machine,
    median_ratio,
    model_counts,
    paired_runs,
    prompts_32x32,
    resolve_model,
    step_read_chunks,
    time_generate,
    wall_and_step_ms,
)

DT = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def main() -> None:
    ap = argparse.ArgumentParser()
    add_model_arg(ap)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--kernels", default="", help="force kernel choices, as serve --kernels (e.g. layer_loop=python)")
    ap.add_argument("--no-scrub", action="store_true", help="do not zero freed KV blocks (as serve --no-scrub)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    from openlora import LLM

    path, model_label = resolve_model(args.model)
    prompts = prompts_32x32()
    n, new = len(prompts), args.new_tokens
    for dname in args.dtypes.split(","):
        dtype = DT[dname]
        machine = measure_machine(dtype)
        # No prefix caching: every timed run repeats the same prompts, and cached blocks from the previous
        # run would skip half of each prefill (measured: 0.41 -> 0.65 s for the 1-token run in bf16);
        # transformers recomputes everything, and so must we for a fair ratio.
        llm = LLM(str(path), dtype=dname, max_num_seqs=64, max_model_len=256, kv_cache_memory=256 << 20,
                  enable_prefix_caching=False, kernels=args.kernels, scrub_freed_memory=not args.no_scrub)
        ours = lambda k, llm=llm: time_generate(llm, prompts, k)  # noqa: E731
        hf = None
        if not args.skip_hf:
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
            # Ours and transformers alternate round by round (see common.paired_runs).
            pr = paired_runs(ours, hf_generate_fn(hf, prompts), new, args.runs)
            wall, step_ms = pr["a_wall_median"], pr["a_step_median"]
        else:
            wall, step_ms = wall_and_step_ms(llm, prompts, new, args.runs)
        m = llm.config.model
        counts = model_counts(m)
        lin, total = counts["linear_params"], counts["total_params"]
        floor = dense_floor_ms(llm, n)
        elem = torch.empty((), dtype=dtype).element_size()
        kv_tok = 2 * m.num_layers * m.num_kv_heads * m.head_dim * elem
        roof = decode_roofline_s(lin, total, n, 32 + new // 2, kv_tok, elem, machine)
        cold = cold_chunk_reads_ms(step_read_chunks(m, n, 32 + new // 2, elem))
        res = {
            "bench": "throughput", "model": model_label, "dtype": dname, "requests": n,
            "prompt_tokens": 32, "new_tokens": new,
            "threads": torch.get_num_threads(), "wall_s": wall, "tokens_per_s": n * new / wall,
            "decode_step_ms": step_ms, "decode_tokens_per_s": 1e3 * n / step_ms, **machine, **roof,
            "roofline_ratio": step_ms / roof["roofline_step_ms"],
            "dense_matmuls_only_ms": floor, "dense_matmuls_roofline_ratio": floor / roof["roofline_step_ms"],
            **cold, "cold_chunk_reads_roofline_ratio": cold["cold_chunk_reads_ms"] / roof["roofline_step_ms"],
            "kernels": llm.engine.runner.plan.describe(), "scrub_freed_memory": not args.no_scrub,
        }
        if hf is not None:
            hf_wall = pr["b_wall_median"]
            res.update({"hf_wall_s": hf_wall, "hf_tokens_per_s": n * new / hf_wall,
                        "hf_decode_step_ms": pr["b_step_median"],
                        "ratio_vs_hf": median_ratio(pr["b_wall"], pr["a_wall"]),
                        "ratios_vs_hf_per_round": [round(b / a, 3) for a, b in zip(pr["a_wall"], pr["b_wall"])]})
            del hf
        del llm
        emit(res)


if __name__ == "__main__":
    main()
