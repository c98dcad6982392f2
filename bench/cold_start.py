"""Cold-adapter time to first token on one node: sequential streamed requests, each for an adapter used
for the first time (cold: read from disk, packed, copied in), then the same adapter again (warm).

    python bench/cold_start.py [--adapters 30]

Setup as bench/routing.py (the tiny model and its r=4 q/v PEFT adapters, `--max-loras 8`, one node
process on 127.0.0.1). Prints JSON: median and p90 TTFT of cold and warm requests and their ratio, cold
and warm measured in alternation (cold a_i, warm a_i, cold a_i+1, ...). The client opens a connection
per request, so both include its set-up alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests"), str(HERE.parent / "tests" / "server")]
from common import emit  # noqa: E402
from helpers import ServerProcess  # noqa: E402
from routing import WARMUP_ADAPTER, adapter_names, prepare  # noqa: E402


def ttft_ms(url: str, model: str) -> float:
    body = {"model": model, "prompt": "t5 t6 t7 t8 t9", "max_tokens": 4, "ignore_eos": True, "stream": True}
    t0 = time.perf_counter()
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {") and '"text":"' in line and '"text":""' not in line:
                break
    return (time.perf_counter() - t0) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapters", type=int, default=30)
    args = ap.parse_args()
    model, adir = prepare(max(args.adapters, 1))
    srv = ServerProcess(["--model", str(model), "--adapter-dir", str(adir), "--max-loras", "8",
                         "--max-cpu-loras", "32", "--max-num-seqs", "8"], Path(tempfile.mkdtemp()))
    try:
        for m in (model.name, WARMUP_ADAPTER, WARMUP_ADAPTER):  # one-off costs of a fresh process
            ttft_ms(srv.url, m)
        cold, warm = [], []
        for a in adapter_names(args.adapters):
            cold.append(ttft_ms(srv.url, a))
            warm.append(ttft_ms(srv.url, a))
    finally:
        srv.stop()

    def p90(xs: list[float]) -> float:
        return sorted(xs)[int(0.9 * (len(xs) - 1))]

    emit({"bench": "cold_start", "adapters": args.adapters,
          "cold_ttft_ms_median": statistics.median(cold), "cold_ttft_ms_p90": p90(cold),
          "warm_ttft_ms_median": statistics.median(warm), "warm_ttft_ms_p90": p90(warm),
          "cold_vs_warm_median": statistics.median(cold) / statistics.median(warm)})


if __name__ == "__main__":
    main()
