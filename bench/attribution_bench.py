"""Attribution throughput: receipts/s written through AttributionService.record (one thread and
several threads sharing group commits) and receipts/s verified by Ledger.verify. Prints JSON.

    python bench/attribution_bench.py [--n 2000] [--threads 4]

The serving-throughput-with-ledger-on-vs-off ratio needs the engine and lives with its bench.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time

from eth_account import Account

from openlora.attribution import AttributionService, DefaultPolicy, NodeIdentity
from openlora.outputs import AdapterUsage, UsageEvent

ADDRS = [Account.from_key(bytes([i + 1]) * 32).address for i in range(6)]
MANIFEST = {
    "owner": ADDRS[0], "version": "1.0.0", "base_model": "bench-base",
    "datasets": [
        {"id": "d1", "hash": "sha256:aa", "contributors": [
            {"address": ADDRS[1], "weight": 3}, {"address": ADDRS[2], "weight": 1}]},
        {"id": "d2", "uri": "s3://b/d2", "contributors": [{"address": ADDRS[3], "weight": 1}]},
    ],
    "price_per_1k_prompt_tokens": 1000, "price_per_1k_completion_tokens": 4000,
    "split": {"operator": 2000, "owner": 5000, "data": 3000}, "access": "public",
}


def _event(i: int, tag: str) -> UsageEvent:
    """A realistic mix: 1/4 base-only, 1/2 single adapter, 1/4 two-adapter composition."""
    kind = i % 4
    adapters: tuple[AdapterUsage, ...] = ()
    if kind in (1, 2):
        adapters = (AdapterUsage(f"ad{i % 50}", "sha256:x", 1.0),)
    elif kind == 3:
        adapters = (AdapterUsage("ad1", "sha256:x", 0.7), AdapterUsage("ad2", "sha256:y", 0.3))
    return UsageEvent(f"{tag}-{i}", "tenant-1", "bench-base", "0xbase", adapters, 200 + i % 100, 32,
                      64 + i % 50, "finished", "stop", finish_time=time.time())


def run(n: int, threads: int) -> dict:
    tmp = tempfile.mkdtemp(prefix="attr-bench-")
    svc = AttributionService(
        os.path.join(tmp, "ledger.db"), NodeIdentity.create(),
        manifests={f"ad{k}": MANIFEST for k in range(50)}, base_model_id="bench-base",
        default_policy=DefaultPolicy(100, 200), epoch_size=1000,
    )
    for i in range(20):  # warm caches (manifest parse, type hashes)
        svc.record(_event(i, "warm"))

    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(n):
        svc.record(_event(i, "seq"))
    t_single, c_single = time.perf_counter() - t0, time.process_time() - c0

    per = n // threads

    def work(k: int) -> None:
        for i in range(per):
            svc.record(_event(i, f"thr{k}"))

    ths = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    t0 = time.perf_counter()
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    t_multi = time.perf_counter() - t0

    total = len(svc.ledger)
    t0, c0 = time.perf_counter(), time.process_time()
    bad = svc.ledger.verify()
    t_verify, c_verify = time.perf_counter() - t0, time.process_time() - c0
    svc.close()
    return {
        "bench": "attribution",
        "receipts_written": total,
        "write_receipts_per_s_1_thread": round(n / t_single, 1),
        "write_ms_per_receipt_1_thread": round(1000 * t_single / n, 3),
        # CPU time (not wall): what record() takes away from serving on a loaded machine.
        "write_cpu_ms_per_receipt": round(1000 * c_single / n, 3),
        f"write_receipts_per_s_{threads}_threads": round(per * threads / t_multi, 1),
        "verify_receipts_per_s": round(total / t_verify, 1),
        "verify_cpu_ms_per_receipt": round(1000 * c_verify / total, 3),
        "verify_ok": bad is None,
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "python": sys.version.split()[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=2000, help="receipts per phase")
    ap.add_argument("--threads", type=int, default=4)
    args = ap.parse_args()
    print(json.dumps(run(args.n, args.threads)))


if __name__ == "__main__":
    main()
