"""Prometheus metrics (one registry per app, so tests can build several apps in one process).

Counters and histograms are updated as requests progress (on the event loop). Gauges that describe
engine state (KV usage, running/waiting per adapter, adapter residency) are refreshed at scrape
time from a snapshot taken on the engine thread (the engine is not thread-safe).
"""

from __future__ import annotations

from collections import Counter as _Tally
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary, generate_latest

from openlora.engine.llm_engine import LLMEngine

_LAT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_ITL = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
STATES = ("resident", "host", "disk", "loading", "failed", "registered", "downloading")
BASE = "__base__"  # label value for requests without an adapter


class Metrics:
    """All of the server's metrics."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("openlora_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.e2e = Histogram("openlora_e2e_request_latency_seconds", "End-to-end request latency",
                             buckets=_LAT, registry=r)
        self.ttft = Histogram("openlora_time_to_first_token_seconds", "Time to first token", buckets=_LAT, registry=r)
        self.itl = Histogram("openlora_inter_token_latency_seconds", "Time between output tokens",
                             buckets=_ITL, registry=r)
        # Span-level attribution's matching per request (receipt thread, before the receipt is signed).
        self.span_seconds = Summary("openlora_span_attribution_seconds",
                                    "Time matching an answer against its adapters' datanets", registry=r)
        self.prompt_tokens = Counter("openlora_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("openlora_generation_tokens", "Tokens generated", registry=r)
        self.adapter_tokens = Counter("openlora_adapter_tokens", "Tokens per adapter", ["adapter", "kind"], registry=r)
        self.kv_usage = Gauge("openlora_kv_cache_usage_ratio", "Fraction of KV cache blocks in use", registry=r)
        self.running = Gauge("openlora_running_requests", "Running sequences per adapter", ["adapter"], registry=r)
        self.waiting = Gauge("openlora_waiting_requests", "Waiting sequences per adapter", ["adapter"], registry=r)
        self.num_running = Gauge("openlora_num_running", "Running sequences (all adapters)", registry=r)
        self.num_waiting = Gauge("openlora_num_waiting", "Waiting sequences (all adapters)", registry=r)
        self.adapters_by_state = Gauge("openlora_adapters", "Registered adapters per residency state",
                                       ["state"], registry=r)
        self.adapter_state = Gauge("openlora_adapter_state", "1 for the adapter's current state",
                                   ["adapter", "state"], registry=r)
        self.adapter_load = Gauge("openlora_adapter_load_seconds", "Last load time per adapter",
                                  ["adapter"], registry=r)
        self.adapter_loads = Gauge("openlora_adapter_loads", "Adapter loads/evictions/failures so far",
                                   ["event"], registry=r)
        self.receipts = Counter("openlora_receipts", "Attribution receipts per adapter", ["adapter"], registry=r)
        self.fees = Counter("openlora_fees", "Fees charged per adapter (token's smallest unit)",
                            ["adapter"], registry=r)
        self.engine_errors = Gauge("openlora_engine_step_errors", "Engine step failures so far", registry=r)
        # The same numbers under vLLM's names, so routers built for vLLM (GAIE/llm-d, production-stack)
        # read them unchanged.
        self.vllm_running = Gauge("vllm:num_requests_running", "Running requests (vLLM name)", registry=r)
        self.vllm_waiting = Gauge("vllm:num_requests_waiting", "Waiting requests (vLLM name)", registry=r)
        self.vllm_kv = Gauge("vllm:kv_cache_usage_perc", "KV cache usage, 0-1 (vLLM name)", registry=r)

    # ---- per request ----------------------------------------------------------------------------
    def observe_tokens(self, adapters: list[str], prompt: int, completion: int) -> None:
        self.prompt_tokens.inc(prompt)
        self.generation_tokens.inc(completion)
        for a in adapters or [BASE]:
            self.adapter_tokens.labels(a, "prompt").inc(prompt)
            self.adapter_tokens.labels(a, "completion").inc(completion)

    def observe_receipt(self, adapters: list[str], fee: int) -> None:
        for a in adapters or [BASE]:
            self.receipts.labels(a).inc()
        # The fee is counted once, under the first adapter (base-only under BASE).
        self.fees.labels((adapters or [BASE])[0]).inc(fee)

    # ---- scrape -----------------------------------------------------------------------------
    def render(self, snap: dict[str, Any], hidden: frozenset[str] = frozenset()) -> bytes:
        """Refresh the engine gauges from `snapshot()` and return the exposition text, without the
        series labelled with a `hidden` adapter (private adapters the scraper may not see)."""
        self.kv_usage.set(snap["kv_usage"])
        self.num_running.set(snap["num_running"])
        self.num_waiting.set(snap["num_waiting"])
        self.vllm_running.set(snap["num_running"])
        self.vllm_waiting.set(snap["num_waiting"])
        self.vllm_kv.set(snap["kv_usage"])
        self.engine_errors.set(snap.get("step_errors", 0))
        for g, key in ((self.running, "running"), (self.waiting, "waiting")):
            g.clear()
            for a, n in snap[key].items():
                g.labels(a).set(n)
        self.adapter_state.clear()
        self.adapter_load.clear()
        tally = _Tally()
        for a, (state, load_s) in snap["adapters"].items():
            tally[state] += 1
            self.adapter_state.labels(a, state).set(1)
            if load_s is not None:
                self.adapter_load.labels(a).set(load_s)
        for s in STATES:
            self.adapters_by_state.labels(s).set(tally.get(s, 0))
        for k, v in snap["lora_stats"].items():
            self.adapter_loads.labels(k).set(v)
        return generate_latest(_Without(self.registry, hidden) if hidden else self.registry)


class _Without:
    """A view of a registry whose samples skip those labelled `adapter=` one of `hidden`."""

    def __init__(self, registry: CollectorRegistry, hidden: frozenset[str]) -> None:
        self.registry, self.hidden = registry, hidden

    def collect(self):
        for family in self.registry.collect():  # fresh Metric objects on every collect()
            family.samples = [s for s in family.samples if s.labels.get("adapter") not in self.hidden]
            yield family


def snapshot(engine: LLMEngine) -> dict[str, Any]:
    """Engine state for the gauges; runs on the engine thread (see AsyncEngine.call)."""
    def per_adapter(reqs) -> dict[str, int]:
        t: _Tally = _Tally()
        for r in reqs:
            for u in r.adapters or ():
                t[u.adapter_id] += 1
            if not r.adapters:
                t[BASE] += 1
        return dict(t)

    lora = engine.lora
    adapters = {c["id"]: (c["state"], c["load_seconds"]) for c in lora.cards()} if lora is not None else {}
    return {
        "kv_usage": float(engine.kv.usage),
        "num_running": len(engine.scheduler.running),
        "num_waiting": len(engine.scheduler.waiting),
        "running": per_adapter(engine.scheduler.running),
        "waiting": per_adapter(engine.scheduler.waiting),
        "adapters": adapters,
        "lora_stats": dict(lora.stats) if lora is not None else {},
    }
