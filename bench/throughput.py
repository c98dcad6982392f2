"""Base-model throughput: 32 requests x (32 prompt + 64 new tokens) on the SmolLM2-135M shape,
against transformers `generate` on the same model and workload, plus the roofline ratio.

Run: python bench/throughput.py [--dtypes float32,bfloat16] [--skip-hf]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import decode_roofline_s, emit, measure_machine, prompts_32x32, smol_model_dir  # noqa: E402

DT = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def time_engine(llm, prompts, max_tokens: int) -> float:
    from openlora import SamplingParams

    p = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    t = time.perf_counter()
    llm.generate(prompts, p)
    return time.perf_counter() - t


def time_hf(model, prompts, max_tokens: int) -> float:
    ids = torch.tensor(prompts)
    t = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                       min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    return time.perf_counter() - t


def engine_step_ms(llm, prompts, new_tokens: int, runs: int) -> tuple[float, float]:
    """(wall seconds for the full workload, ms per decode step) as medians; decode step from
    T(new_tokens) - T(1) over new_tokens - 1 steps."""
    t_full = sorted(time_engine(llm, prompts, new_tokens) for _ in range(runs))[runs // 2]
    t_one = sorted(time_engine(llm, prompts, 1) for _ in range(runs))[runs // 2]
    return t_full, 1e3 * (t_full - t_one) / (new_tokens - 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    from openlora import LLM

    path = smol_model_dir()
    prompts = prompts_32x32()
    n, new = len(prompts), args.new_tokens
    for dname in args.dtypes.split(","):
        dtype = DT[dname]
        machine = measure_machine(dtype)
        llm = LLM(str(path), dtype=dname, max_num_seqs=64, max_model_len=256, kv_cache_memory=256 << 20)
        time_engine(llm, prompts, new)  # warm-up, full length
        wall, step_ms = engine_step_ms(llm, prompts, new, args.runs)
        m = llm.config.model
        lin = sum(p.numel() for name, p in llm.engine.runner.model.named_parameters() if p.dim() == 2 and name != "embed")
        if m.tie_word_embeddings:
            lin += m.vocab_size * m.hidden_size  # lm_head shares the embedding but is a real matmul
        total = sum(p.numel() for p in llm.engine.runner.model.parameters())
        elem = torch.empty((), dtype=dtype).element_size()
        kv_tok = 2 * m.num_layers * m.num_kv_heads * m.head_dim * elem
        roof = decode_roofline_s(lin, total, n, 32 + new // 2, kv_tok, elem, machine)
        res = {
            "bench": "throughput", "dtype": dname, "requests": n, "prompt_tokens": 32, "new_tokens": new,
            "threads": torch.get_num_threads(), "wall_s": wall, "tokens_per_s": n * new / wall,
            "decode_step_ms": step_ms, "decode_tokens_per_s": 1e3 * n / step_ms, **machine, **roof,
            "roofline_ratio": step_ms / roof["roofline_step_ms"],
        }
        del llm
        if not args.skip_hf:
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype).eval()
            time_hf(hf, prompts, new)
            hf_wall = sorted(time_hf(hf, prompts, new) for _ in range(args.runs))[args.runs // 2]
            hf_one = sorted(time_hf(hf, prompts, 1) for _ in range(args.runs))[args.runs // 2]
            res.update({"hf_wall_s": hf_wall, "hf_tokens_per_s": n * new / hf_wall,
                        "hf_decode_step_ms": 1e3 * (hf_wall - hf_one) / (new - 1),
                        "ratio_vs_hf": hf_wall / wall})
            del hf
        emit(res)


if __name__ == "__main__":
    main()
