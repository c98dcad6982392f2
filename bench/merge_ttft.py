"""Time to first token of a merged-adapter request: cold (merge built in the background) and warm
(served from the merge cache), beside a plain adapter request, in one run.

Run: python bench/merge_ttft.py [--dtype float32] [--strategy ties]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_root, emit, smol_model_dir, write_random_adapter  # noqa: E402

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def ttft(llm, prompt, **kw) -> float:
    """Seconds from submission to the first generated token (engine driven step by step)."""
    from openlora import SamplingParams

    eng = llm.engine
    rid = f"ttft-{time.perf_counter_ns()}"
    t0 = time.perf_counter()
    eng.add_request(rid, prompt, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), **kw)
    first = None
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.error:
                raise RuntimeError(out.error)
            if first is None and out.outputs[0].token_ids:
                first = time.perf_counter() - t0
        if first is None and not eng.scheduler.running:
            time.sleep(0.001)  # waiting on the background merge: nothing to compute yet
    return first


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--strategy", default="ties")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(2)
    from openlora import LLM

    root = bench_root() / "merge_adapters"
    paths = [write_random_adapter(root / f"m{i}", r=16, targets=ALL, seed=i) if not (root / f"m{i}").exists()
             else root / f"m{i}" for i in range(2)]
    llm = LLM(str(smol_model_dir()), dtype=args.dtype, max_model_len=256, kv_cache_memory=256 << 20,
              enable_prefix_caching=False)
    for i, p in enumerate(paths):
        llm.register_adapter(f"m{i}", str(p))
    prompt = list(range(100, 132))
    ttft(llm, prompt, adapters="m0")  # warm-up
    plain = [ttft(llm, prompt, adapters="m0") for _ in range(args.runs)]
    cold, warm = [], []
    for run in range(args.runs):
        merge = {"adapters": [{"id": "m0", "weight": 0.6}, {"id": "m1", "weight": 0.4 + run * 1e-3}],
                 "strategy": args.strategy, "density": 0.5}
        cold.append(ttft(llm, prompt, merge=merge))  # new weights: a new merge each run
        warm.append(ttft(llm, prompt, merge=merge))
    med = statistics.median
    emit({"bench": "merge_ttft", "dtype": args.dtype, "strategy": args.strategy, "runs": args.runs,
          "plain_adapter_ttft_ms": 1e3 * med(plain), "merged_cold_ttft_ms": 1e3 * med(cold),
          "merged_warm_ttft_ms": 1e3 * med(warm), "cold_over_plain": med(cold) / med(plain),
          "warm_over_plain": med(warm) / med(plain), "merge_stats": dict(llm.engine.merges.stats)})


if __name__ == "__main__":
    main()
