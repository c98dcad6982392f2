"""Serving throughput with the attribution ledger on versus off, in the same run.

The engine serves the same workload twice per round (32 requests x (32 prompt + 64 new tokens),
SmolLM2-135M shape, 32 distinct r=8 q,v adapters plus base-only rows): once with no usage listener,
once with every finished request recorded through AttributionService (signed receipt, hash chain,
SQLite commit) on a worker thread, as the server does. Rounds alternate on/off to cancel drift.

Run: python bench/attribution_overhead.py [--dtype float32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_root, emit, prompts_32x32, smol_model_dir, write_random_adapter  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(2)
    from openlora import LLM, SamplingParams
    from openlora.attribution import AttributionService, DefaultPolicy, NodeIdentity

    llm = LLM(str(smol_model_dir()), dtype=args.dtype, max_model_len=256, kv_cache_memory=256 << 20)
    root = bench_root() / "multi_r8_qv"
    for i in range(32):
        p = root / f"a{i:02d}"
        if not (p / "adapter_model.safetensors").is_file():
            write_random_adapter(p, r=8, targets=("q_proj", "v_proj"), seed=1000 + i)
        llm.register_adapter(f"a{i:02d}", str(p))
    prompts = prompts_32x32()
    adapters = [f"a{i:02d}" if i % 4 else None for i in range(32)]
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    tmp = tempfile.mkdtemp(prefix="attr-overhead-")
    svc = AttributionService(f"{tmp}/ledger.sqlite", NodeIdentity.create(), base_model_id="bench",
                             base_model_hash=llm.engine.base_model_hash, default_policy=DefaultPolicy(100, 200))
    pool = ThreadPoolExecutor(2, thread_name_prefix="receipts")
    futures = []

    def listener(ev):  # the server's pattern: the engine thread only hands the event over
        futures.append(pool.submit(svc.record, ev))

    def run(on: bool) -> float:
        if on:
            llm.engine.usage_listeners.append(listener)
        t = time.perf_counter()
        llm.generate(prompts, params, adapters=adapters)
        for f in futures:
            f.result()  # every receipt committed before the clock stops
        dt = time.perf_counter() - t
        futures.clear()
        if on:
            llm.engine.usage_listeners.remove(listener)
        return dt

    run(False)
    run(True)  # warm-up both paths
    off, on = [], []
    for r in range(args.rounds):
        for flag in ((False, True) if r % 2 == 0 else (True, False)):
            (on if flag else off).append(run(flag))
    n_tok = len(prompts) * args.new_tokens
    receipts = sum(1 for _ in svc.ledger.iter())
    bad = svc.ledger.verify()
    emit({"bench": "attribution_overhead", "dtype": args.dtype, "rounds": args.rounds,
          "tokens_per_s_ledger_off": n_tok / statistics.median(off),
          "tokens_per_s_ledger_on": n_tok / statistics.median(on),
          "slowdown_pct": 100 * (statistics.median(on) / statistics.median(off) - 1),
          "receipts_written": receipts, "ledger_verifies": bad is None})


if __name__ == "__main__":
    main()
