"""Routing across nodes: `openlora gateway` with its own policy ("ours") against round-robin and
least-loaded, all three over the same four real `openlora serve` processes on 127.0.0.1.

    python bench/routing.py                  # 2 rounds x 3 policies, 40 s each, then the failure phase (~10 min)
    python bench/routing.py --quick          # 1 round, 10 s each (~3 min): a smoke test, p99 of ~240 requests
    python bench/routing.py --rate 15 --duration 60 --rounds 3 --adapters 400

Setup: a tiny random Llama (tests/tiny_models.py) and `--adapters` random PEFT adapters (r=4 on q_proj and
v_proj, made with PEFT by tests/server/helpers.make_peft_adapter), both cached under bench_root()/routing.
Every node lists every adapter (`--adapter-dir`) but holds few at once (`--max-loras 8`, `--max-cpu-loras
32`), so where a request goes decides how often adapters are loaded.

Workload (identical for every policy): open-loop Poisson arrivals at `--rate` requests/s for `--duration`
s; each request names an adapter drawn from Zipf(s=1.0) over the adapters and a random 16-word prompt;
`/v1/completions`, streamed, greedy, exactly `--max-tokens` tokens (ignore_eos). Time to first token
(TTFT) is measured by the client (first SSE event carrying text).

NOTE (fairness): the policies run in alternating rounds (RR, LL, ours, RR, ...) because this VM's speed
drifts over minutes; before every run the four nodes are restarted and warmed the same way (one
base-model request and one for an adapter outside the workload), so each policy starts from cold nodes
and the gateway from zero counters. Ratios are medians of the per-round ratios. A restart costs ~30 s
here (four processes importing torch on two cores), which is why the default is two rounds.

NOTE (this machine): the four nodes, the gateway and the client share two cores, so spreading load over
more nodes adds no compute; what a policy can win is fewer adapter loads and shorter waits for a device
slot. `cpu_s.other` per run shows when something else on the machine competed for the cores.

Prints one JSON document: per policy TTFT p50/p99, throughput, success rate, adapter loads (sum over nodes
of the `openlora_adapter_loads{event="loads"}` delta), routing decision time (from the gateway's
`openlora_gateway_decision_seconds` histogram: a bucket-interpolated estimate; plus `policy.rank`
timed in-process on a synthetic fleet of 4 nodes x `--adapters` adapters); the ratios ours / peer; and a
failure phase (policy ours; halfway through, the busiest node is SIGKILLed while the gateway has requests
in flight on it): success rate and time until `/v1/nodes` showed it unhealthy. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent / "tests" / "server"))
from common import bench_root, emit  # noqa: E402
from helpers import ROOT, ServerProcess, free_port, make_peft_adapter, stop_process  # noqa: E402

POLICIES = ("round-robin", "least-loaded", "ours")
WARMUP_ADAPTER = "warmup"  # in the adapter folder, never in the workload: warms the LoRA path only
PROMPT_WORDS = 16
STARTED: list[subprocess.Popen] = []  # every process this run started, checked for leaks at the end


def log(msg: str) -> None:
    print(f"[routing {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ model, adapters

def prepare(n_adapters: int) -> tuple[Path, Path]:
    """(model folder, adapter folder) under bench_root()/routing, built once and reused. Each piece is
    written under a temporary (hidden) name and renamed, so an interrupted run leaves nothing half made."""
    from tiny_models import make_tiny_model
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per adapter otherwise
    root = bench_root() / "routing"
    model = root / "tiny"
    if not (model / "config.json").is_file():
        tmp = root / ".tiny.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        make_tiny_model(tmp)
        os.replace(tmp, model)
    adir = root / "adapters_r4_qv"
    names = [WARMUP_ADAPTER, *adapter_names(n_adapters)]
    todo = [n for n in names if not (adir / n / "adapter_model.safetensors").is_file()]
    if todo:
        log(f"making {len(todo)} PEFT adapters in {adir} (cached for later runs)")
    for i, name in enumerate(todo):
        tmp = adir / f".{name}.tmp"  # hidden: scan_adapter_dir skips it
        shutil.rmtree(tmp, ignore_errors=True)
        make_peft_adapter(model, tmp, seed=1000 + names.index(name), r=4, targets=["q_proj", "v_proj"])
        os.replace(tmp, adir / name)
        if (i + 1) % 50 == 0:
            log(f"  {i + 1}/{len(todo)} adapters")
    return model, adir


def adapter_names(n: int) -> list[str]:
    return [f"a{i:03d}" for i in range(n)]


# ------------------------------------------------------------------------------------------ processes

class Cluster:
    """`n` node processes (tests/server/helpers.ServerProcess), restartable as a whole. Each node keeps
    its folder (node key, ledgers) across restarts; ports are new each time (the gateway is new too)."""

    def __init__(self, n: int, model: Path, adir: Path, tmp: Path, opts: list[str]) -> None:
        self.args = ["--model", str(model), "--adapter-dir", str(adir), *opts]
        self.dirs = [tmp / f"node{i}" for i in range(n)]
        for d in self.dirs:
            d.mkdir(parents=True, exist_ok=True)
        self.nodes: list[ServerProcess] = []
        self.model_id = model.name

    def start(self) -> None:
        """Start every node (in parallel: ~7 s of imports and set-up each, overlapping on the cores) and
        warm it."""
        self.stop()
        with ThreadPoolExecutor(len(self.dirs)) as ex:
            futs = [ex.submit(ServerProcess, self.args, d) for d in self.dirs]
            errors = []
            for f in futs:
                try:
                    self.nodes.append(f.result())
                    STARTED.append(self.nodes[-1].proc)
                except Exception as e:  # the others are stopped by the caller's stop()
                    errors.append(e)
        if errors:
            raise errors[0]
        for n in self.nodes:
            # NOTE: the first step of a fresh process pays one-off costs (allocator, first LoRA kernel
            # call); paid here, outside the measurement, identically for every policy.
            for model in (self.model_id, WARMUP_ADAPTER):
                r = httpx.post(n.url + "/v1/completions", timeout=60,
                               json={"model": model, "prompt": "t5 t6 t7", "max_tokens": 2, "ignore_eos": True})
                r.raise_for_status()

    def stop(self) -> None:
        """SIGTERM every node at once (each takes a second or two to shut down), SIGKILL after 20 s."""
        if self.nodes:
            with ThreadPoolExecutor(len(self.nodes)) as ex:
                list(ex.map(lambda n: n.stop(timeout=20), self.nodes))
        self.nodes = []

    def loads(self) -> dict[str, float | None]:
        """`openlora_adapter_loads{event="loads"}` per node url (None: the node does not answer)."""
        out: dict[str, float | None] = {}
        for n in self.nodes:
            try:
                out[n.url] = n.metrics().get('openlora_adapter_loads{event="loads"}')
            except httpx.HTTPError:
                out[n.url] = None
        return out


class GatewayProcess:
    """`python -m openlora.cli gateway` over the cluster's nodes with one policy."""

    def __init__(self, urls: list[str], policy: str, seed: int, log_path: Path, poll_s: float = 0.5) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(log_path, "ab")
        nodes = [a for u in urls for a in ("--node", u)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "openlora.cli", "gateway", "--port", str(self.port), "--policy", policy,
             "--poll-interval", str(poll_s), "--seed", str(seed), *nodes],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)
        STARTED.append(self.proc)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:  # the log lives in a temporary folder: quote it
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{_tail(log_path)}")
            try:  # up, and every node polled healthy (the first poll runs before it serves)
                seen = self.nodes()
                if len(seen) == len(urls) and all(n["healthy"] for n in seen):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"gateway did not see every node healthy in 60 s:\n{_tail(log_path)}")

    def nodes(self) -> list[dict]:
        return httpx.get(self.url + "/v1/nodes", timeout=5).json()["data"]

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics", timeout=5).text

    def stop(self) -> None:
        stop_process(self.proc, timeout=20)
        self._log.close()


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:]


# ------------------------------------------------------------------------------------------ workload

@dataclass(frozen=True)
class Job:
    """One request of the workload."""

    at: float  # seconds after the run's start (Poisson arrivals)
    adapter: str
    prompt: str


@dataclass
class Outcome:
    """What the client saw for one request. Times are seconds after the run's start."""

    adapter: str
    start: float
    end: float = 0.0
    ttft: float | None = None  # send -> first SSE event with text
    tokens: int = 0
    node: str | None = None  # x-openlora-node
    state: str | None = None  # x-openlora-adapter-state: the adapter's tier on that node on arrival
    ok: bool = False  # 200, text, no error event, [DONE]
    error: str | None = None


def make_workload(names: list[str], rate: float, duration: float, seed: int, s: float = 1.0) -> list[Job]:
    """Poisson arrivals at `rate`/s for `duration` s; adapter k (0-based rank) with probability
    proportional to 1 / (k + 1)^s; random word prompts the tiny tokenizer knows (t3 .. t255)."""
    rng = random.Random(seed)
    weights = [1.0 / (k + 1) ** s for k in range(len(names))]
    jobs, t = [], rng.expovariate(rate)
    while t < duration:
        prompt = " ".join(f"t{rng.randrange(3, 256)}" for _ in range(PROMPT_WORDS))
        jobs.append(Job(t, rng.choices(names, weights)[0], prompt))
        t += rng.expovariate(rate)
    return jobs


async def one(client: httpx.AsyncClient, url: str, job: Job, t0: float, max_tokens: int) -> Outcome:
    """Send one job through the gateway and read its stream to the end."""
    body = {"model": job.adapter, "prompt": job.prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    out = Outcome(job.adapter, sent - t0)
    done = False
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            out.node = r.headers.get("x-openlora-node")
            out.state = r.headers.get("x-openlora-adapter-state")
            if r.status_code != 200:
                out.error = f"http {r.status_code}: {(await r.aread())[:200]!r}"
            else:
                chunks = 0
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        break
                    ev = json.loads(line[6:])
                    if "error" in ev:
                        out.error = str(ev["error"].get("message"))
                        break
                    if any(c.get("text") for c in ev.get("choices") or ()):
                        chunks += 1
                        if out.ttft is None:
                            out.ttft = time.perf_counter() - sent
                    if ev.get("usage"):
                        out.tokens = ev["usage"]["completion_tokens"]
                out.tokens = out.tokens or chunks
    except (httpx.HTTPError, ValueError) as e:
        out.error = f"{type(e).__name__}: {e}"
    out.end = time.perf_counter() - t0
    out.ok = done and out.error is None and out.ttft is not None
    if not out.ok and out.error is None:
        out.error = "stream ended without [DONE]" if not done else "no text"
    return out


async def drive(url: str, jobs: list[Job], max_tokens: int,
                during: Callable[[float, list[asyncio.Task]], Awaitable[None]] | None = None) -> list[Outcome]:
    """Send `jobs` open-loop (each at its arrival time, whatever the earlier ones are doing). `during(t0,
    tasks so far)` runs alongside (the failure phase kills a node from it)."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0, connect=10.0), limits=limits) as client:
        t0 = time.perf_counter()
        tasks: list[asyncio.Task] = []
        side = asyncio.create_task(during(t0, tasks)) if during else None
        for j in jobs:
            delay = t0 + j.at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(client, url, j, t0, max_tokens)))
        outs = list(await asyncio.gather(*tasks))
        if side is not None:
            await side
    return outs


# ------------------------------------------------------------------------------------------ statistics

def pct(xs: list[float], q: float) -> float | None:
    """q-th percentile, linear interpolation between order statistics."""
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def prom_samples(text: str) -> dict[str, float]:
    """Prometheus exposition text as {'name{labels}': value}."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            k, _, v = line.rpartition(" ")
            out[k] = float(v)
    return out


def histogram_quantile(samples: dict[str, float], name: str, q: float) -> float | None:
    """Prometheus-style estimate from cumulative buckets: linear inside the bucket holding the q-th
    observation (0 as the first bucket's lower edge); in the +Inf bucket: the highest finite edge."""
    buckets = sorted((float(k.split('le="')[1].split('"')[0]), v) for k, v in samples.items()
                     if k.startswith(name + "_bucket{"))
    if not buckets or buckets[-1][1] == 0:
        return None
    rank = q * buckets[-1][1]
    prev_le, prev_n = 0.0, 0.0
    for le, n in buckets:
        if n >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_n) / max(n - prev_n, 1e-12)
        prev_le, prev_n = le, n
    return prev_le


def summarize(outs: list[Outcome]) -> dict:
    ok = [o for o in outs if o.ok]
    ttft = [o.ttft * 1e3 for o in ok]
    span = (max(o.end for o in ok) - min(o.start for o in outs)) if ok else float("nan")
    per_node: dict[str, int] = {}
    for o in ok:
        per_node[o.node or "?"] = per_node.get(o.node or "?", 0) + 1
    errors: dict[str, int] = {}
    for o in outs:
        if not o.ok:
            errors[o.error or "?"] = errors.get(o.error or "?", 0) + 1
    by_state: dict[str, list[float]] = {}
    for o in ok:
        by_state.setdefault(o.state or "?", []).append(o.ttft * 1e3)
    return {"requests": len(outs), "succeeded": len(ok), "success_rate": len(ok) / max(1, len(outs)),
            "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p99": pct(ttft, 99),
            "requests_per_s": len(ok) / span, "output_tokens_per_s": sum(o.tokens for o in ok) / span,
            "requests_per_node": sorted(per_node.values(), reverse=True),
            # Where the adapter was when the request reached its node: what the policy's choice bought.
            "adapter_state_on_arrival": {k: len(v) for k, v in sorted(by_state.items())},
            "ttft_ms_p50_by_state": {k: round(pct(v, 50), 1) for k, v in sorted(by_state.items())}, "errors": errors}


# ------------------------------------------------------------------------------------------ runs

def run_one(cluster: Cluster, policy: str, jobs: list[Job], args: argparse.Namespace, tmp: Path,
            kill: bool = False) -> dict:
    """Fresh nodes, a fresh gateway with `policy`, the workload; with `kill`, SIGKILL of the busiest
    node halfway through."""
    t = time.monotonic()
    cluster.start()
    before = cluster.loads()
    gw = GatewayProcess([n.url for n in cluster.nodes], policy, args.seed, tmp / "gateway.log")
    start_s = time.monotonic() - t
    fail: dict = {}

    async def killer(t0: float, tasks: list[asyncio.Task]) -> None:
        fail.update(await kill_midway(gw.url, cluster, t0, tasks, args.duration / 2))

    pids = [n.proc.pid for n in cluster.nodes] + [gw.proc.pid, os.getpid()]
    try:
        cpu0 = cpu_seconds(pids)
        outs = asyncio.run(drive(gw.url, jobs, args.max_tokens, killer if kill else None))
        cpu1 = cpu_seconds(pids)
        gm = prom_samples(gw.metrics())
        seen = [{"served": n["served"], "latency_ms": n["latency_ms"], "healthy": n["healthy"]} for n in gw.nodes()]
    finally:
        gw.stop()
    after = cluster.loads()
    # A killed node's loads are lost with it: the sum is over the nodes that still answer.
    loads = sum(after[u] - before[u] for u in after if after[u] is not None and before.get(u) is not None)
    res = {"policy": policy, **summarize(outs), "adapter_loads": loads,
           "distinct_adapters": len({j.adapter for j in jobs}),
           "decision_us_p50_hist": _us(histogram_quantile(gm, "openlora_gateway_decision_seconds", 0.5)),
           "decision_us_p99_hist": _us(histogram_quantile(gm, "openlora_gateway_decision_seconds", 0.99)),
           "gateway_retries": gm.get("openlora_gateway_retries_total", 0.0),
           "gateway_resumed": gm.get("openlora_gateway_resumed_total", 0.0), "gateway_nodes": seen,
           "startup_s": round(start_s, 1),
           # CPU seconds during the workload: ours (nodes, gateway, client), the rest of the machine (other
           # tenants: a run with much of it is disturbed), stolen by the hypervisor. With `kill`, the
           # victim's CPU before the kill counts as other.
           "cpu_s": {"ours": round(cpu1[1] - cpu0[1], 1), "other": round(cpu1[0] - cpu0[0] - (cpu1[1] - cpu0[1]), 1),
                     "steal": round(cpu1[2] - cpu0[2], 1)}}
    if kill:
        k = fail.get("kill_at_s", float("inf"))
        vid = fail.get("victim_id")
        res["failure"] = {
            **fail,
            # Requests answered by the victim that were open at the kill: streams it had begun answering
            # are continued on another node (gateway_resumed, network/resume.py; `o.node` is the first
            # node's, from the header); those still before their first byte were retried (gateway_retries).
            "in_flight_on_victim_at_kill": sum(1 for o in outs if o.node == vid and o.start < k < o.end),
            "failed_in_flight_on_victim": sum(1 for o in outs if not o.ok and o.node == vid and o.start < k),
            "sent_to_victim_after_kill": sum(1 for o in outs if o.node == vid and o.start > k),
            "failed_after_kill": sum(1 for o in outs if not o.ok and o.start > k),
        }
    cluster.stop()
    return res


async def kill_midway(gw_url: str, cluster: Cluster, t0: float, tasks: list[asyncio.Task], at_s: float) -> dict:
    """At `at_s` after t0, SIGKILL the node that served most requests so far (it holds the hot
    adapters: the worst node to lose), at a moment when the gateway has requests in flight on it
    (its own exact count, waited for up to 3 s), so the kill cuts real requests rather than an idle
    node; then time until the gateway's /v1/nodes shows it unhealthy (polled every 20 ms)."""
    await asyncio.sleep(max(0.0, at_s - (time.perf_counter() - t0)))
    served: dict[str, int] = {}
    for tk in tasks:
        if tk.done() and tk.result().node:
            served[tk.result().node] = served.get(tk.result().node, 0) + 1
    async with httpx.AsyncClient(timeout=5) as c:
        async def nodes() -> dict[str, dict]:
            return {n["id"]: n for n in (await c.get(gw_url + "/v1/nodes")).json()["data"]}

        seen = await nodes()
        victim_id = max(served, key=served.get) if served else next(iter(seen))
        deadline = time.perf_counter() + 3.0
        while seen[victim_id]["load"]["inflight"] < 1 and time.perf_counter() < deadline:
            await asyncio.sleep(0.005)
            seen = await nodes()
        victim = next(n for n in cluster.nodes if n.url == seen[victim_id]["url"])
        victim.proc.send_signal(signal.SIGKILL)
        killed = time.perf_counter()
        out = {"victim": victim.url, "victim_id": victim_id, "kill_at_s": killed - t0,
               "gateway_inflight_on_victim_at_kill": seen[victim_id]["load"]["inflight"],
               "unhealthy_after_s": None}  # stays None if /v1/nodes does not show it within 30 s
        while time.perf_counter() - killed < 30:
            if not (await nodes())[victim_id]["healthy"]:
                out["unhealthy_after_s"] = time.perf_counter() - killed
                break
            await asyncio.sleep(0.02)
    return out


def cpu_seconds(pids: list[int]) -> tuple[float, float, float]:
    """(busy CPU s of the whole machine, of `pids` together, stolen by the hypervisor) since boot.
    Differences over a run tell whether something else competed for the two cores (the VM drifts)."""
    tick = os.sysconf("SC_CLK_TCK")
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy, steal = f[0] + f[1] + f[2] + f[5] + f[6], f[7]
    ours = 0
    for pid in pids:
        try:
            st = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            ours += int(st[11]) + int(st[12])  # utime + stime, all threads
        except OSError:
            pass
    return busy / tick, ours / tick, steal / tick


def _us(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e6, 1)


def decision_in_process(n_adapters: int, seed: int, calls: int = 5000) -> dict:
    """policy.rank timed per call on a synthetic fleet of 4 NodeViews holding `n_adapters` adapters each
    (8 resident, 24 in host memory, the rest on disk; random loads), Zipf-drawn requests."""
    from openlora.network.policy import POLICIES as RANKERS
    from openlora.network.view import NodeView

    rng = random.Random(seed)
    names = adapter_names(n_adapters)
    fleet = []
    for i in range(4):
        order = rng.sample(names, len(names))
        tiers = {a: "resident" if k < 8 else "host" if k < 32 else "disk" for k, a in enumerate(order)}
        n = NodeView(url=f"http://10.0.0.{i}:8000", model="tiny", adapters=tiers, max_num_seqs=8,
                     waiting=rng.randrange(4), kv_usage=rng.random(), inflight=rng.randrange(8))
        n.ok(rng.uniform(0.01, 0.2))
        fleet.append(n)
    models = rng.choices(names, [1.0 / (k + 1) for k in range(len(names))], k=calls)
    out = {}
    for name, cls in RANKERS.items():
        pol = cls(seed)
        ts = []
        for m in models:
            t = time.perf_counter_ns()
            pol.rank(fleet, m)
            ts.append((time.perf_counter_ns() - t) / 1e3)
        out[name] = {"us_p50": round(pct(ts, 50), 2), "us_p99": round(pct(ts, 99), 2)}
    return out


def ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or not den else num / den


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 round, 10 s per run (about 3 minutes)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--duration", type=float, default=40.0, help="seconds of arrivals per run")
    ap.add_argument("--rate", type=float, default=25.0, help="requests/s, Poisson, open loop (here ~35/s "
                                                             "saturates the four nodes on two shared cores)")
    ap.add_argument("--adapters", type=int, default=200)
    ap.add_argument("--zipf", type=float, default=1.0)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--max-loras", type=int, default=8)
    ap.add_argument("--max-cpu-loras", type=int, default=32)
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--policies", default=",".join(POLICIES), help="subset to run (ratios need all three)")
    ap.add_argument("--skip-failure", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.duration = 1, 10.0

    model, adir = prepare(args.adapters)
    names = adapter_names(args.adapters)
    jobs = make_workload(names, args.rate, args.duration, args.seed, args.zipf)
    log(f"workload: {len(jobs)} requests over {args.duration:.0f} s, {len({j.adapter for j in jobs})} distinct "
        f"adapters of {args.adapters}")
    opts = ["--max-loras", str(args.max_loras), "--max-cpu-loras", str(args.max_cpu_loras), "--max-num-seqs",
            str(args.max_num_seqs), "--kv-cache-memory", "32MiB", "--max-model-len", "256", "--grace-period", "2"]
    runs: list[dict] = []
    failure = None
    with tempfile.TemporaryDirectory(prefix="openlora-routing-") as td:
        tmp = Path(td)
        cluster = Cluster(args.nodes, model, adir, tmp, opts)
        try:
            for rnd in range(args.rounds):
                for policy in [p for p in POLICIES if p in args.policies.split(",")]:
                    r = run_one(cluster, policy, jobs, args, tmp)
                    r["round"] = rnd
                    runs.append(r)
                    log(f"round {rnd} {policy:>12}: ttft p50 {r['ttft_ms_p50']:.1f} ms p99 {r['ttft_ms_p99']:.1f} ms, "
                        f"{r['requests_per_s']:.2f} req/s, ok {r['success_rate']:.4f}, loads {r['adapter_loads']:.0f}, "
                        f"per node {r['requests_per_node']}")
            if not args.skip_failure:
                failure = run_one(cluster, "ours", jobs, args, tmp, kill=True)
                log(f"failure phase: ok {failure['success_rate']:.4f}, {failure['failure']}")
        finally:
            cluster.stop()
            # Every process started must be gone, and nothing else may still run from this run's folder.
            leaked = sorted({p.pid for p in STARTED if p.poll() is None} | set(pids_using(tmp)))
    result = report(runs, failure, args, len(jobs), leaked)
    emit(result)


def pids_using(tmp: Path) -> list[int]:
    """Processes whose command line mentions `tmp` (the nodes' ledgers and keys live there)."""
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if str(tmp) in (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    out.append(int(p.name))
            except OSError:
                pass
    return out


def report(runs: list[dict], failure: dict | None, args: argparse.Namespace, n_jobs: int, leaked: list[int]) -> dict:
    by = {p: [r for r in runs if r["policy"] == p] for p in POLICIES}
    rounds = sorted({r["round"] for r in runs})

    def per_round(key: str, num: str, den: str) -> list[float]:
        out = []
        for k in rounds:
            a = next((r for r in by[num] if r["round"] == k), None)
            b = next((r for r in by[den] if r["round"] == k), None)
            if a and b and (v := ratio(a[key], b[key])) is not None:
                out.append(round(v, 4))
        return out

    ratios = {}
    for label, key, num, den in (("ttft_p99_ours_vs_round_robin", "ttft_ms_p99", "ours", "round-robin"),
                                 ("ttft_p50_ours_vs_round_robin", "ttft_ms_p50", "ours", "round-robin"),
                                 ("throughput_ours_vs_round_robin", "requests_per_s", "ours", "round-robin"),
                                 ("adapter_loads_ours_vs_least_loaded", "adapter_loads", "ours", "least-loaded"),
                                 ("adapter_loads_ours_vs_round_robin", "adapter_loads", "ours", "round-robin"),
                                 ("ttft_p99_ours_vs_least_loaded", "ttft_ms_p99", "ours", "least-loaded")):
        pr = per_round(key, num, den)
        ratios[label] = statistics.median(pr) if pr else None
        ratios[label + "_per_round"] = pr

    def pooled(p: str) -> dict:
        """Medians over the policy's runs (one per round), and the runs themselves."""
        rs = by[p]
        out = {f"{k}_median": statistics.median(r[k] or 0 for r in rs)
               for k in ("ttft_ms_p50", "ttft_ms_p99", "requests_per_s", "output_tokens_per_s", "adapter_loads",
                         "decision_us_p50_hist", "decision_us_p99_hist")}
        return {**out, "success_rate_min": min(r["success_rate"] for r in rs), "runs": rs}

    res = {"bench": "routing",
           "setup": {"nodes": args.nodes, "model": "tests/tiny_models.make_tiny_model (llama, 2 layers, hidden 64)",
                     "adapters": args.adapters, "adapter_shape": "PEFT r=4 on q_proj, v_proj", "zipf_s": args.zipf,
                     "rate_per_s": args.rate, "duration_s": args.duration, "requests_per_run": n_jobs,
                     "max_tokens": args.max_tokens, "rounds": args.rounds, "node_max_loras": args.max_loras,
                     "node_max_cpu_loras": args.max_cpu_loras, "node_max_num_seqs": args.max_num_seqs,
                     "node_num_threads": 1, "poll_interval_s": 0.5, "cpu_count": os.cpu_count(),
                     "order": "alternating rounds (round-robin, least-loaded, ours); nodes restarted and warmed "
                              "before each run"},
           "policies": {p: pooled(p) for p in POLICIES if by[p]},
           "ratios": ratios,
           "decision_time_note": "gateway histogram quantiles are bucket-interpolated (buckets 10, 50, 100, 250, "
                                 "500 us, ...); decision_in_process times policy.rank per call",
           "decision_in_process": decision_in_process(args.adapters, args.seed),
           "leaked_processes": leaked}
    if failure is not None:
        res["failure_phase"] = {"policy": "ours", "success_rate": failure["success_rate"],
                                "target_success_rate": 0.999, **failure["failure"],
                                "requests": failure["requests"], "errors": failure["errors"],
                                "ttft_ms_p99": failure["ttft_ms_p99"], "gateway_retries": failure["gateway_retries"],
                                "gateway_resumed": failure.get("gateway_resumed", 0.0)}
    return res


if __name__ == "__main__":
    main()
