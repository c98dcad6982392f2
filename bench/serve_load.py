"""HTTP serving load: N concurrent streaming clients over M adapters against `openlora serve`, compared
with the offline engine (openlora.LLM) on the same workload in the same run.

    python bench/serve_load.py                       # 64 clients, 32 adapters, SmolLM2-135M-shaped model
    python bench/serve_load.py --model DIR --clients 16 --requests 32 --max-tokens 16   # small run

Adapters are written on the fly: random PEFT-format LoRA weights, r=8 on q_proj and v_proj.
Every request streams (SSE) `--max-tokens` tokens (ignore_eos) from a random prompt of
`--prompt-len` token ids, round-robin over the adapters. Prints JSON: requests/s, tokens/s, TTFT and
inter-token latency p50/p99, and `ratio_vs_offline` = HTTP tokens/s / offline tokens/s (target >= 0.85).

Span-level attribution's cost (`--datanet-tokens N --spans-ab`): every adapter gets a manifest whose
dataset holds N tokens of English contributions (Python's reference docs, three contributors), and the
requests alternate between span matching on and opted out (`"attribution": {"spans": false}`) in the same
run; the receipt (matching included) is awaited before a stream's last event, so the end-to-end latency
of the two halves gives the share of a request's time that matching adds (`span_share`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, prompts_32x32, smol_model_dir  # noqa: E402


def make_adapters(model_dir: Path, out: Path, n: int, r: int = 8, seed: int = 0) -> list[Path]:
    """`n` random PEFT LoRA adapters (q_proj, v_proj; A ~ N(0, 0.02), B ~ N(0, 0.02))."""
    from safetensors.torch import save_file

    cfg = json.loads((model_dir / "config.json").read_text())
    hidden, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    head_dim = cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
    outs = {"q_proj": cfg["num_attention_heads"] * head_dim, "v_proj": cfg["num_key_value_heads"] * head_dim}
    g = torch.Generator().manual_seed(seed)
    paths = []
    for k in range(n):
        d = out / f"adapter{k:03d}"
        d.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for i in range(layers):
            for site, o in outs.items():
                p = f"base_model.model.model.layers.{i}.self_attn.{site}"
                tensors[f"{p}.lora_A.weight"] = torch.randn(r, hidden, generator=g) * 0.02
                tensors[f"{p}.lora_B.weight"] = torch.randn(o, r, generator=g) * 0.02
        save_file(tensors, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
        (d / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(model_dir), "r": r,
            "lora_alpha": 2 * r, "lora_dropout": 0.0, "bias": "none", "target_modules": list(outs),
            "fan_in_fan_out": False, "use_rslora": False, "use_dora": False}))
        paths.append(d)
    return paths


def workload(args, vocab: int) -> list[tuple[list[int], str]]:
    prompts = prompts_32x32(args.requests, args.prompt_len, seed=1)
    prompts = [[t % vocab for t in p] for p in prompts]
    return [(p, f"adapter{i % args.adapters:03d}") for i, p in enumerate(prompts)]


def engine_options(args) -> dict:
    return dict(max_num_seqs=args.max_num_seqs, max_loras=args.adapters, kv_cache_memory=args.kv_cache_memory,
                dtype=args.dtype)


def offline_engine(args, model: Path, adapters: list[Path], work):
    """openlora.LLM with every adapter registered and loaded (one warm-up request per adapter)."""
    from openlora import LLM, SamplingParams

    llm = LLM(str(model), **engine_options(args))
    for p in adapters:
        llm.register_adapter(p.name, str(p))
    warm = work[:args.adapters]
    llm.generate([w[0] for w in warm], SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True),
                 adapters=[w[1] for w in warm])
    return llm


def run_offline(args, llm, work) -> dict:
    """The same requests through openlora.LLM (all submitted at once): the ceiling HTTP is compared to."""
    from openlora import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    t, c = time.perf_counter(), time.process_time()
    outs = llm.generate([w[0] for w in work], sp, adapters=[w[1] for w in work])
    dt, cpu = time.perf_counter() - t, time.process_time() - c
    toks = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return {"seconds": dt, "cpu_s": cpu, "tokens": toks, "tokens_per_s": toks / dt, "requests_per_s": len(work) / dt}


async def run_http(args, url: str, work, server_pid: int, warm_up: bool) -> dict:
    """`args.clients` concurrent streaming clients (aiohttp: a C-accelerated HTTP parser, so the load
    generator, which shares the machine's cores with the server, costs as little CPU as it can)."""
    import aiohttp

    sem = asyncio.Semaphore(args.clients)
    ttft, itl, tokens = [], [], [0]
    e2e: dict[bool, list[float]] = {True: [], False: []}  # end-to-end seconds, span matching on / off

    async def one(session: aiohttp.ClientSession, prompt: list[int], adapter: str, spans: bool = True) -> None:
        body = {"model": adapter, "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0.0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        if not spans:
            body["attribution"] = {"spans": False}
        async with sem:
            t0 = time.perf_counter()
            last = None
            async with session.post(url + "/v1/completions", json=body) as r:
                r.raise_for_status()
                async for raw in r.content:  # one SSE line per iteration
                    line = raw.strip()
                    if not line.startswith(b"data: ") or line == b"data: [DONE]":
                        continue
                    d = json.loads(line[6:])
                    if "error" in d:
                        raise RuntimeError(d["error"])
                    if d.get("usage"):
                        tokens[0] += d["usage"]["completion_tokens"]
                    if d["choices"] and d["choices"][0]["text"]:
                        now = time.perf_counter()
                        if last is None:
                            ttft.append(now - t0)
                        else:
                            itl.append(now - last)
                        last = now
            e2e[spans].append(time.perf_counter() - t0)

    async def span_metrics(session: aiohttp.ClientSession) -> tuple[float, float]:
        """(count, sum of seconds) of the server's span matching so far (its /metrics summary)."""
        async with session.get(url + "/metrics") as r:
            text = await r.text()
        vals = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                if line.startswith("openlora_span_attribution_seconds_")}
        key = "openlora_span_attribution_seconds_"
        return vals.get(key + "count", 0.0), vals.get(key + "sum", 0.0)

    conn = aiohttp.TCPConnector(limit=args.clients + 8)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=600)) as session:
        if warm_up:  # every adapter once
            await asyncio.gather(*(one(session, p, a) for p, a in work[:args.adapters]))
            ttft.clear(), itl.clear()
            tokens[0] = 0
        sp0 = await span_metrics(session) if args.datanet_tokens else (0.0, 0.0)
        t, own, srv = time.perf_counter(), time.process_time(), _proc_cpu_s(server_pid)
        await asyncio.gather(*(one(session, p, a, not (args.spans_ab and i % 2)) for i, (p, a) in enumerate(work)))
        dt = time.perf_counter() - t
        srv, own = _proc_cpu_s(server_pid) - srv, time.process_time() - own
        sp1 = await span_metrics(session) if args.datanet_tokens else (0.0, 0.0)
    matched = {}
    if sp1[0] > sp0[0]:  # the server's own measure of matching, against the requests' mean end-to-end time
        per = (sp1[1] - sp0[1]) / (sp1[0] - sp0[0])
        on = e2e[True] or e2e[False]
        matched = {"span_matched_requests": int(sp1[0] - sp0[0]), "span_ms_per_request": round(1e3 * per, 2),
                   "span_share_of_e2e": round(per / (sum(on) / len(on)), 5)}
    # CPU seconds of the server process and of this load generator over the timed part (2 cores:
    # at most 2 * seconds between them); the offline run's CPU seconds are its ceiling.
    return {"seconds": dt, "server_cpu_s": srv, "client_cpu_s": own, "tokens": tokens[0],
            "tokens_per_s": tokens[0] / dt, "requests_per_s": len(work) / dt, "ttft_ms": _pcts(ttft),
            "itl_ms": _pcts(itl), **_span_share(e2e), **matched}


def _span_share(e2e: dict[bool, list[float]]) -> dict:
    """Mean end-to-end ms with span matching on and off, and the share of the on-requests' time it adds."""
    if not (e2e[True] and e2e[False]):
        return {}
    on, off = (1e3 * sum(v) / len(v) for v in (e2e[True], e2e[False]))
    return {"e2e_ms_spans_on": round(on, 1), "e2e_ms_spans_off": round(off, 1), "span_share": round((on - off) / on, 4)}


def write_datanet(adapters: list[Path], tokens: int, tokenizer_dir: Path) -> None:
    """Give every adapter a manifest whose dataset holds about `tokens` tokens of English contributions."""
    import pydoc_data.topics

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    owners = ["0x" + f"{i + 1:040x}" for i in range(4)]
    texts, n = [], 0
    for i, text in enumerate(pydoc_data.topics.topics.values()):
        if n >= tokens:
            break
        texts.append({"contributor": owners[1 + i % 3], "text": text})
        n += len(tok(text, add_special_tokens=False)["input_ids"])
    rows = "".join(json.dumps(t) + "\n" for t in texts)
    from openlora.server.app import model_id_for

    manifest = {"owner": owners[0], "version": "1", "base_model": model_id_for(str(tokenizer_dir)),
                "datasets": [{"id": "docs", "contributors": [{"address": a, "weight": 1} for a in owners[1:]],
                              "contributions": "contributions.jsonl"}],
                "price_per_1k_prompt_tokens": 1000, "price_per_1k_completion_tokens": 3000,
                "split": {"operator": 2000, "owner": 5000, "data": 3000}}
    for a in adapters:
        (a / "contributions.jsonl").write_text(rows)
        (a / "attribution.json").write_text(json.dumps(manifest))


def _proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pcts(xs: list[float]) -> dict:
    if not xs:
        return {}
    s = sorted(xs)
    return {"p50": 1e3 * s[len(s) // 2], "p99": 1e3 * s[min(len(s) - 1, int(len(s) * 0.99))]}


def start_server(args, model: Path, adapter_dir: Path, tmp: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "openlora.cli", "--log-level", "WARNING", "serve", "--model", str(model),
           "--adapter-dir", str(adapter_dir), "--port", str(port), "--max-num-seqs", str(args.max_num_seqs),
           "--max-loras", str(args.adapters), "--kv-cache-memory", str(args.kv_cache_memory), "--dtype", args.dtype,
           "--max-waiting", str(args.requests + 16), "--ledger", str(tmp / "ledger.sqlite"),
           "--node-key", str(tmp / "node_key.json")]
    if not args.attribution:
        cmd.append("--no-attribution")
    env = dict(os.environ, OPENLORA_NODE_KEY_PASSWORD=os.environ.get("OPENLORA_NODE_KEY_PASSWORD", "bench"))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp / "server.log", "wb"))
    url = f"http://127.0.0.1:{port}"
    import httpx

    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError((tmp / "server.log").read_text()[-3000:])
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder (default: the SmolLM2-135M-shaped bench model)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--kv-cache-memory", type=int, default=1 << 30)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--rounds", type=int, default=3, help="offline/HTTP round pairs (median ratio reported)")
    ap.add_argument("--attribution", action="store_true", help="serve with receipts (default off: engine vs engine)")
    ap.add_argument("--datanet-tokens", type=int, default=0, help="give every adapter a datanet of about N tokens")
    ap.add_argument("--spans-ab", action="store_true", help="alternate span matching on and off (module docstring)")
    args = ap.parse_args()
    args.attribution |= bool(args.datanet_tokens)
    model = Path(args.model) if args.model else smol_model_dir()
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    with tempfile.TemporaryDirectory(prefix="serve_load_") as td:
        tmp = Path(td)
        adapters = make_adapters(model, tmp / "adapters", args.adapters)
        if args.datanet_tokens:
            write_datanet(adapters, args.datanet_tokens, model)
        work = workload(args, vocab)
        # Rounds alternate offline and HTTP so both see the same machine (this VM's speed drifts by
        # 20-30% over minutes); the ratio reported is the median of the per-round ratios.
        llm = offline_engine(args, model, adapters, work)
        proc, url = start_server(args, model, tmp / "adapters", tmp)
        rounds = []
        try:
            for i in range(args.rounds):
                off = run_offline(args, llm, work)
                http = asyncio.run(run_http(args, url, work, proc.pid, warm_up=i == 0))
                rounds.append({"offline": off, "http": http, "ratio": http["tokens_per_s"] / off["tokens_per_s"]})
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
            llm.lora.shutdown()
    mid = sorted(rounds, key=lambda r: r["ratio"])[len(rounds) // 2]
    http = mid["http"]
    emit({"bench": "serve_load", "model": str(model), "clients": args.clients, "adapters": args.adapters,
          "requests": args.requests, "prompt_len": args.prompt_len, "max_tokens": args.max_tokens,
          "dtype": args.dtype, "attribution": args.attribution, "rounds": args.rounds,
          "requests_per_s": http["requests_per_s"], "tokens_per_s": http["tokens_per_s"],
          "ttft_ms": http["ttft_ms"], "itl_ms": http["itl_ms"], "datanet_tokens": args.datanet_tokens,
          **{k: http[k] for k in ("e2e_ms_spans_on", "e2e_ms_spans_off", "span_share", "span_matched_requests",
                                  "span_ms_per_request", "span_share_of_e2e") if k in http},
          "offline_tokens_per_s": mid["offline"]["tokens_per_s"], "ratio_vs_offline": mid["ratio"],
          "ratios": [round(r["ratio"], 3) for r in rounds], "target_ratio": 0.85, "median_round": mid,
          "all_rounds": rounds})


if __name__ == "__main__":
    main()
