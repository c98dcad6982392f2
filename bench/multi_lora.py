"""Mixed-adapter throughput: 32 requests for 32 distinct adapters (32 prompt + 64 new tokens each)
on the SmolLM2-135M shape, in two adapter shapes (r=16 on all seven projections; r=8 on q and v), and
on request DoRA adapters (`dora_r8_qv`: r=8 on q and v with use_dora), which are also measured against
32 plain LoRA adapters of the same shape in alternating rounds (`ratio_vs_lora_same_shape`).

Prints JSON per (dtype, shape): tokens/s, the ratio to this engine's own base-model run, the ratio
to PEFT's mixed-batch `generate(..., adapter_names=...)`, and the roofline ratio counting the
adapters' FLOPs and the distinct adapters' bytes. All measured in the same run; base-only and
mixed-adapter runs alternate round by round and the ratio is the median of the per-round ratios.

Run: python bench/multi_lora.py [--model random|default|PATH] [--dtypes float32,bfloat16]
     [--shapes r16_all,r8_qv,dora_r8_qv] [--skip-peft]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    add_model_arg,
    bench_root,
    decode_roofline_s,
    emit,
    hf_wall_and_step_ms,
    measure_machine,
    median_ratio,
    model_counts,
    paired_runs,
    prompts_32x32,
    resolve_model,
    time_generate,
    write_random_adapter,
)

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHAPES = {"r16_all": (16, ALL), "r8_qv": (8, ("q_proj", "v_proj")), "dora_r8_qv": (8, ("q_proj", "v_proj"))}
LORA_PEER = {"dora_r8_qv": "r8_qv"}  # a DoRA shape -> the plain LoRA shape it is measured against
DT = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DIMS = {"q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192), "o_proj": (576, 576),
        "gate_proj": (576, 1536), "up_proj": (576, 1536), "down_proj": (1536, 576)}


def adapters_for(shape: str, n: int) -> list[Path]:
    r, targets = SHAPES[shape]
    root = bench_root() / f"multi_{shape}"
    return [p if (p := root / f"a{i:02d}").joinpath("adapter_model.safetensors").is_file()
            else write_random_adapter(p, r=r, targets=targets, seed=1000 + i, dora=shape in LORA_PEER)
            for i in range(n)]


def register(llm, shape: str, n: int) -> list[str]:
    """Register `n` adapters of `shape` (once per engine); returns their names."""
    names = []
    for i, p in enumerate(adapters_for(shape, n)):
        name = f"{shape}-{i:02d}"
        if llm.lora.card(name) is None:
            llm.register_adapter(name, str(p))
        names.append(name)
    return names


def peft_numbers(model_dir, paths, prompts, dtype, new: int, runs: int) -> tuple[float, float]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    m = PeftModel.from_pretrained(base, str(paths[0]), adapter_name="a00", autocast_adapter_dtype=False)
    for i, p in enumerate(paths[1:], 1):
        m.load_adapter(str(p), adapter_name=f"a{i:02d}", autocast_adapter_dtype=False)
    m.eval()
    names = [f"a{i:02d}" for i in range(len(paths))]
    return hf_wall_and_step_ms(m, prompts, new, runs, adapter_names=names)


def main() -> None:
    ap = argparse.ArgumentParser()
    add_model_arg(ap)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--shapes", default="r16_all,r8_qv")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--skip-peft", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    from openlora import LLM

    model_dir, model_label = resolve_model(args.model)
    prompts = prompts_32x32()
    n, new = len(prompts), args.new_tokens
    for dname in args.dtypes.split(","):
        dtype = DT[dname]
        elem = torch.empty((), dtype=dtype).element_size()
        machine = measure_machine(dtype)
        # No prefix caching: the timed runs repeat the same prompts (see bench/throughput.py).
        llm = LLM(str(model_dir), dtype=dname, max_model_len=256, kv_cache_memory=256 << 20, max_loras=32,
                  max_cpu_loras=96, lora_pool_rows=32 * 16, enable_prefix_caching=False)
        m = llm.config.model
        counts = model_counts(m)
        lin, total = counts["linear_params"], counts["total_params"]
        kv_tok = 2 * m.num_layers * m.num_kv_heads * m.head_dim * elem
        for shape in args.shapes.split(","):
            paths = adapters_for(shape, n)
            names = register(llm, shape, n)
            # Base-only and mixed-adapter runs alternate round by round (see common.paired_runs).
            pr = paired_runs(lambda k, llm=llm: time_generate(llm, prompts, k),
                             lambda k, llm=llm, names=names: time_generate(llm, prompts, k, names), new, args.runs)
            base_wall, base_step, wall, step = (pr["a_wall_median"], pr["a_step_median"], pr["b_wall_median"],
                                                pr["b_step_median"])
            r, targets = SHAPES[shape]
            per_adapter = sum(r * (DIMS[t][0] + DIMS[t][1]) for t in targets) * m.num_layers  # params
            roof = decode_roofline_s(lin, total, n, 32 + new // 2, kv_tok, elem, machine,
                                     extra_flops=2 * per_adapter * n,  # each token: its own adapter once
                                     extra_bytes=per_adapter * n * elem)  # each distinct adapter read once
            res = {"bench": "multi_lora", "model": model_label, "dtype": dname, "adapters": shape,
                   "distinct_adapters": n,
                   "requests": n, "new_tokens": new, "tokens_per_s": n * new / wall, "decode_step_ms": step,
                   "decode_tokens_per_s": 1e3 * n / step, "base_tokens_per_s": n * new / base_wall,
                   "base_decode_step_ms": base_step, "ratio_vs_own_base": median_ratio(pr["a_wall"], pr["b_wall"]),
                   "ratios_vs_own_base_per_round": [round(a / b, 3) for a, b in zip(pr["a_wall"], pr["b_wall"])],
                   "decode_ratio_vs_own_base": median_ratio(pr["a_step"], pr["b_step"]), **machine, **roof,
                   "roofline_ratio": step / roof["roofline_step_ms"], "kernels": llm.engine.runner.plan.describe()}
            # Upper bound on decode_ratio_vs_own_base: even a LoRA path that only streams each distinct
            # adapter's weights once per step at the measured bandwidth (no FLOPs, no overhead) adds
            # adapter_bytes / bandwidth to the measured base step: the LoRA work runs on the same two
            # threads between the base matmuls, so it cannot hide behind them.
            lora_floor_ms = 1e3 * per_adapter * n * elem / (machine["bandwidth_GBps"] * 1e9)
            res.update({"adapter_bytes_per_step": per_adapter * n * elem, "lora_memory_floor_ms": lora_floor_ms,
                        "decode_ratio_upper_bound": base_step / (base_step + lora_floor_ms)})
            if shape in LORA_PEER:  # DoRA against plain LoRA of the same shape, rounds alternating
                peer = register(llm, LORA_PEER[shape], n)
                pl = paired_runs(lambda k, llm=llm, peer=peer: time_generate(llm, prompts, k, peer),
                                 lambda k, llm=llm, names=names: time_generate(llm, prompts, k, names), new,
                                 args.runs)
                res.update({"ratio_vs_lora_same_shape": median_ratio(pl["a_wall"], pl["b_wall"]),
                            "ratios_vs_lora_same_shape_per_round": [round(a / b, 3) for a, b in
                                                                    zip(pl["a_wall"], pl["b_wall"])],
                            "decode_ratio_vs_lora_same_shape": median_ratio(pl["a_step"], pl["b_step"])})
            if not args.skip_peft and shape in LORA_PEER:
                res["peft"] = "not measured: PEFT refuses DoRA adapters in a mixed-adapter batch"
            elif not args.skip_peft:
                pw, ps = peft_numbers(model_dir, paths, prompts, dtype, new, max(1, args.runs - 2))
                res.update({"peft_tokens_per_s": n * new / pw, "peft_decode_step_ms": ps, "ratio_vs_peft": pw / wall})
            emit(res)
        del llm


if __name__ == "__main__":
    main()
