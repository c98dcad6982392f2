"""What the gateway knows about one node: identity, declared facts, scraped state, its own
counters and the node's health (circuit breaker)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

BREAKER_BASE_S = 2.0  # first open period; doubles per consecutive failure up to BREAKER_MAX_S
BREAKER_MAX_S = 30.0


@dataclass
class NodeView:
    """One node as the gateway sees it. Own counters (`inflight`) are exact and immediate; scraped
    fields lag by up to one poll interval and are only a secondary signal."""

    url: str  # base URL, no trailing /v1
    address: str | None = None  # the signer the registry (or --node URL@ADDR) says it has
    pinned: bool = False  # address from a trusted source: a mismatch drops the node
    region: str = ""
    location: tuple[float, float] | None = None
    hardware: dict[str, Any] = field(default_factory=dict)
    price: dict[str, int] = field(default_factory=dict)
    # scraped from /v1/state
    model: str | None = None
    model_hash: str | None = None
    adapters: dict[str, str] = field(default_factory=dict)  # adapter id -> tier
    free_slots: int = 0
    running: int = 0
    waiting: int = 0
    max_num_seqs: int = 1
    kv_usage: float = 0.0
    scraped_at: float = 0.0
    # the gateway's own view
    inflight: int = 0
    served: int = 0
    latency_s: float | None = None  # EWMA of time to first byte
    healthy: bool = False
    failures: int = 0  # consecutive
    open_until: float = 0.0  # circuit breaker: no traffic before this (monotonic)
    dropped: str | None = None  # why the node was dropped for good (receipts that do not verify)

    @property
    def id(self) -> str:
        return self.address or self.url

    def usable(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        return self.healthy and self.dropped is None and now >= self.open_until

    def ok(self, latency_s: float | None = None) -> None:
        """A poll or a request succeeded."""
        self.healthy, self.failures, self.open_until = True, 0, 0.0
        if latency_s is not None:
            self.latency_s = latency_s if self.latency_s is None else 0.8 * self.latency_s + 0.2 * latency_s

    def fail(self) -> None:
        """A poll or a request failed: unhealthy, breaker open for a growing period."""
        self.failures += 1
        self.healthy = False
        self.open_until = time.monotonic() + min(BREAKER_MAX_S, BREAKER_BASE_S * 2 ** (self.failures - 1))

    def tier(self, adapter: str | None) -> str | None:
        """The adapter's tier on this node ("base" for base-model requests), None if it lacks it."""
        if adapter is None or adapter == self.model:
            return "base"
        return self.adapters.get(adapter)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "url": self.url, "address": self.address, "region": self.region,
            "location": list(self.location) if self.location else None, "hardware": self.hardware,
            "price": self.price, "model": self.model, "healthy": self.usable(), "dropped": self.dropped,
            "load": {"inflight": self.inflight, "running": self.running, "waiting": self.waiting,
                     "kv_usage": self.kv_usage, "max_num_seqs": self.max_num_seqs},
            "resident_adapters": sorted(a for a, t in self.adapters.items() if t == "resident"),
            "adapters": len(self.adapters), "served": self.served,
            "latency_ms": None if self.latency_s is None else round(self.latency_s * 1000, 1),
        }
