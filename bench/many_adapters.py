"""Many adapters on one machine: throughput with thousands of adapters (uniform and Zipf draws) relative
to the same workload on a single adapter, cold-load latency (disk -> resident) and time to first token.

    python bench/many_adapters.py                       # 2,000 adapters, 4,000 requests, pool 128, host 512
    python bench/many_adapters.py --adapters 200 --requests 400 --max-loras 16 --max-cpu-loras 64

Prints one JSON object. The SmolLM2-135M-shaped random model comes from bench/common.py; the adapters
(r=8 on q and v, random weights, PEFT format) are generated once under bench_root()/adapters_<n>.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_root, smol_model_dir  # noqa: E402


def write_adapters(model: Path, n: int, rank: int = 8) -> Path:
    """n PEFT adapters (q_proj, v_proj) written directly with safetensors; cached across runs."""
    from safetensors.numpy import save_file

    from openlora.config import ModelConfig

    root = bench_root() / f"adapters_{n}"
    if (root / ".complete").is_file():
        return root
    s = ModelConfig.from_pretrained(model).shape
    for i in range(n):
        rng = np.random.default_rng(i)
        t = {}
        for layer in range(s.num_layers):
            for site in ("q_proj", "v_proj"):
                fin, fout = s.site_dims(site)
                pre = f"base_model.model.model.layers.{layer}.self_attn.{site}"
                t[f"{pre}.lora_A.weight"] = (rng.standard_normal((rank, fin)) * 0.02).astype(np.float32)
                t[f"{pre}.lora_B.weight"] = (rng.standard_normal((fout, rank)) * 0.02).astype(np.float32)
        d = root / f"a{i:05d}"
        d.mkdir(parents=True, exist_ok=True)
        save_file(t, str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": rank, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
             "bias": "none", "task_type": "CAUSAL_LM"}))
    (root / ".complete").write_text(str(n))
    return root


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def run(model: Path, root: Path, names: list[str], draw: str, args) -> dict:
    """Submit every request up front, step the engine to completion; tokens/s, TTFT, cold loads."""
    from openlora import LLM, SamplingParams

    llm = LLM(str(model), max_loras=args.max_loras, max_cpu_loras=args.max_cpu_loras, dtype=args.dtype,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_batched_tokens,
              max_model_len=256, num_threads=args.threads)
    lora = llm.lora
    lora.register_dir(root)
    rng = random.Random(1)
    if draw == "single":
        ads = [names[0]] * args.requests
    elif draw == "uniform":
        ads = [rng.choice(names) for _ in range(args.requests)]
    else:  # Zipf(1.0) over a random permutation of the adapters
        perm = names[:]
        rng.shuffle(perm)
        w = [1.0 / (k + 1) for k in range(len(perm))]
        ads = rng.choices(perm, w, k=args.requests)
    prompts = [[rng.randint(3, 30000) for _ in range(args.prompt)] for _ in range(args.requests)]
    sp = SamplingParams(temperature=0, max_tokens=args.new, ignore_eos=True)
    eng = llm.engine
    t0 = time.perf_counter()
    submit, cold = {}, {}
    for i, (ad, p) in enumerate(zip(ads, prompts)):
        rid = f"r{i}"
        cold[rid] = lora.card(ad)["state"] not in ("resident", "host", "loading")
        submit[rid] = time.perf_counter()
        eng.add_request(rid, p, sp, adapters=ad)
    ttft: dict[str, float] = {}
    tokens = 0
    max_res = 0
    while eng.has_unfinished_requests():
        outs = eng.step()
        now = time.perf_counter()
        for o in outs:
            tokens += 1
            if o.request_id not in ttft:
                ttft[o.request_id] = now - submit[o.request_id]
        max_res = max(max_res, lora.num_resident())
        if not outs:
            time.sleep(0.001)  # everything runnable waits for loads
    wall = time.perf_counter() - t0
    cold_lat = [ld + cp for _, ld, cp in lora.cold_starts]
    copies = [cp for _, _, cp in lora.cold_starts]
    tc = [v for k, v in ttft.items() if cold[k]]
    tw = [v for k, v in ttft.items() if not cold[k]]
    lora.shutdown()
    return {
        "draw": draw, "wall_s": round(wall, 2), "gen_tokens_per_s": round(tokens / wall, 1),
        "distinct_adapters": len(set(ads)), "max_resident": max_res, "loads": lora.stats["loads"],
        "evictions": lora.stats["evictions"], "host_evictions": lora.stats["host_evictions"],
        "cold_load_ms_p50": _ms(pct(cold_lat, 50)), "cold_load_ms_p99": _ms(pct(cold_lat, 99)),
        "pool_copy_ms_p50": _ms(pct(copies, 50)),
        "ttft_cold_ms_p50": _ms(pct(tc, 50)), "ttft_cold_ms_p99": _ms(pct(tc, 99)), "n_cold": len(tc),
        "ttft_warm_ms_p50": _ms(pct(tw, 50)), "ttft_warm_ms_p99": _ms(pct(tw, 99)), "n_warm": len(tw),
        "steps": eng.stats["steps"],
    }


def _ms(x: float | None) -> float | None:
    return None if x is None else round(1e3 * x, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapters", type=int, default=2000)
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--max-loras", type=int, default=128)
    ap.add_argument("--max-cpu-loras", type=int, default=512)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-batched-tokens", type=int, default=2048)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    model = smol_model_dir()
    root = write_adapters(model, args.adapters)
    names = sorted(p.name for p in root.iterdir() if p.is_dir())[: args.adapters]
    res = {d: run(model, root, names, d, args) for d in ("single", "uniform", "zipf")}
    base = res["single"]["gen_tokens_per_s"]
    out = {
        "bench": "many_adapters", "config": vars(args),
        "uniform_vs_single": round(res["uniform"]["gen_tokens_per_s"] / base, 3),
        "zipf_vs_single": round(res["zipf"]["gen_tokens_per_s"] / base, 3),
        "targets": {"uniform_vs_single": 0.5, "zipf_vs_single": 0.8},
        "runs": res,
        "note": "shared 2-core CPU machine, other jobs running: absolute numbers are noisy; ratios are "
                "measured in the same process one after another",
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
