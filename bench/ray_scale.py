"""Ray Serve scale-out vs one node on the same cores: throughput, TTFT p50/p99, and the per-request
overhead of the Serve path (HTTP proxy -> Ingress -> replica).

- one node: `openlora serve --num-threads T` (a subprocess);
- Ray: `openlora.scale` with R replicas of `--num-threads T/R` each, on a one-machine cluster on 127.0.0.1.
Both serve the same model and adapters; rounds alternate (one node first on even rounds, Ray first on odd),
each round sends the same streamed workload (adapters round-robin, fixed length: ignore_eos). The proxy
overhead is the difference of the p50 (and p99) latency of sequential GET /health on each.

On two cores, expect no speed-up: the point is that it runs, and what the extra hops cost.

    python bench/ray_scale.py --requests 32 --concurrency 8 --max-tokens 16 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests"), str(HERE.parent / "tests" / "server")]


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


async def one(client, url: str, model: str, max_tokens: int) -> tuple[float, int]:
    """(TTFT seconds, chunks with text) of one streamed completion."""
    t0 = time.perf_counter()
    ttft, n = None, 0
    body = {"model": model, "prompt": "The quick brown fox", "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True}
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {") and '"text":"' in line.replace(" ", "") and '"text":""' not in line:
                n += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
    return (ttft if ttft is not None else time.perf_counter() - t0), n


async def load(url: str, models: list[str], requests: int, concurrency: int, max_tokens: int) -> dict:
    import httpx

    sem = asyncio.Semaphore(concurrency)

    async def job(i: int):
        async with sem:
            return await one(client, url, models[i % len(models)], max_tokens)

    async with httpx.AsyncClient(timeout=300) as client:
        await asyncio.gather(*(job(i) for i in range(concurrency)))  # warm-up: adapters loaded, caches hot
        t0 = time.perf_counter()
        res = await asyncio.gather(*(job(i) for i in range(requests)))
        wall = time.perf_counter() - t0
    ttfts = [r[0] * 1e3 for r in res]
    return {"tokens_per_s": sum(r[1] for r in res) / wall, "requests_per_s": requests / wall,
            "ttft_ms_p50": pct(ttfts, 50), "ttft_ms_p99": pct(ttfts, 99)}


def health_latency(url: str, n: int) -> list[float]:
    import httpx

    out = []
    with httpx.Client(timeout=30) as c:
        for _ in range(10):
            c.get(url + "/health")
        for _ in range(n):
            t0 = time.perf_counter()
            assert c.get(url + "/health").status_code == 200
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def assets(root: Path, model_kind: str, n_adapters: int) -> tuple[Path, Path, str]:
    from helpers import make_peft_adapter

    if model_kind == "smol":
        from common import smol_model_dir

        model = smol_model_dir()
    else:
        from tiny_models import make_tiny_model

        model = root / "tiny"
        model.mkdir()
        make_tiny_model(model, max_position_embeddings=2048)
    adir = root / "adapters"
    for i in range(n_adapters):
        make_peft_adapter(model, adir / f"lora-{i}", seed=i)
    return model, adir, model.name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("tiny", "smol"), default="tiny")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="cores for each side")
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--health-requests", type=int, default=200)
    args = ap.parse_args()

    from helpers import ServerProcess, free_port

    from openlora.scale.deploy import deploy, start_ray, stop
    from openlora.server.app import ServeOptions

    tmp = Path(tempfile.mkdtemp(prefix="ray-scale-"))
    model, adir, model_id = assets(tmp, args.model, args.adapters)
    models = [f"lora-{i}" for i in range(args.adapters)] + [model_id]
    engine = dict(max_num_seqs=max(8, args.concurrency), kv_cache_memory=64 << 20, max_loras=args.adapters,
                  max_cpu_loras=args.adapters, max_model_len=2048)
    single = ServerProcess(["--model", str(model), "--adapter-dir", str(adir), "--num-threads", str(args.threads),
                            "--max-num-seqs", str(engine["max_num_seqs"]), "--max-loras", str(args.adapters),
                            "--kv-cache-memory", "64MiB", "--max-model-len", "2048"], tmp, log_level="WARNING")
    os.environ.setdefault("OPENLORA_NODE_KEY_PASSWORD", "bench")
    start_ray(None)
    app = None
    try:
        per = max(1, args.threads // args.replicas)
        opts = ServeOptions(model=str(model), adapter_dirs=[str(adir)], engine={**engine, "num_threads": per},
                            ledger=str(tmp / "ray-ledger.sqlite"), node_key=str(tmp / "ray_node_key.json"))
        t0 = time.perf_counter()
        app = deploy(opts, args.replicas, "127.0.0.1", free_port())
        startup_s = time.perf_counter() - t0
        sides = {"one_node": single.url, "ray": app.url}
        runs: dict[str, list[dict]] = {k: [] for k in sides}
        health: dict[str, list[float]] = {k: [] for k in sides}
        for rnd in range(args.rounds):
            order = list(sides) if rnd % 2 == 0 else list(reversed(sides))
            for side in order:
                runs[side].append(asyncio.run(load(sides[side], models, args.requests, args.concurrency,
                                                   args.max_tokens)))
                health[side] += health_latency(sides[side], args.health_requests // args.rounds)
        result = {"bench": "ray_scale", "model": args.model, "replicas": args.replicas, "threads": args.threads,
                  "threads_per_replica": per, "requests": args.requests, "concurrency": args.concurrency,
                  "max_tokens": args.max_tokens, "rounds": args.rounds, "ray_startup_s": round(startup_s, 1)}
        for side in sides:
            result[side] = {k: round(statistics.median(r[k] for r in runs[side]), 2) for k in runs[side][0]}
        tps = result["ray"]["tokens_per_s"], result["one_node"]["tokens_per_s"]
        result["ray_vs_one_node_throughput"] = round(tps[0] / tps[1], 3)
        result["proxy_overhead_ms"] = {"p50": round(pct(health["ray"], 50) - pct(health["one_node"], 50), 2),
                                       "p99": round(pct(health["ray"], 99) - pct(health["one_node"], 99), 2),
                                       "one_node_health_ms_p50": round(pct(health["one_node"], 50), 2),
                                       "ray_health_ms_p50": round(pct(health["ray"], 50), 2)}
        from common import emit

        emit(result)
    finally:
        if app is not None:
            stop(app)
        from ray import serve

        serve.shutdown()
        import ray

        ray.shutdown()
        single.stop()


if __name__ == "__main__":
    main()
