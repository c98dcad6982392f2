"""Ranking nodes for one request: filters, then a weighted score; ties broken at random.

Filters (hard): the node is usable (healthy, breaker closed, not dropped), serves the requested
model (the base model or a registered adapter), and is not saturated (own in-flight + scraped
waiting < 2 x max_num_seqs). Filters (soft, skipped when they would remove every node): the
request's region (`x-openlora-region`) and price cap (`x-openlora-max-price`, per 1k completion
tokens).

Score (higher is better), with c = max_num_seqs (the node's batch capacity):

    score = 1.00 * affinity          resident 1.0, host 0.7, loading 0.6, disk/registered 0.3,
                                     downloading 0.1, base-model requests 1.0
          - 1.50 * inflight / c      the gateway's own requests in flight (exact, no lag)
          - 0.50 * waiting / c       scraped queue (lags by a poll)
          - 0.25 * kv_usage          scraped KV-cache use
          - 0.20 * min(1, ttfb / 2 s) measured time to first byte (counts, declared facts do not)
          + 0.30 * prefix            1 if this node served the same prompt prefix recently (its
                                     prefix cache may hold it; only a salted hash is kept)
          - 0.10 * no free slot      a cold adapter on a node whose device slots are all taken
          + 0.10 * region            1 if the node is in the requested region
          - 0.10 * price / max price the node's completion price relative to the dearest candidate
          + U(0, 1e-6)               random tie-break

Why these weights: a node holding the adapter keeps winning until the gateway's own requests in
flight there reach about half its capacity over an idle node that has the adapter's files on disk
((1.0 - 0.3) / 1.5 = 0.47 c), so a hot adapter spreads to more nodes as its demand grows, while a
cold one stays where it is resident and is not loaded everywhere.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass

from openlora.network.view import NodeView

AFFINITY = {"base": 1.0, "resident": 1.0, "host": 0.7, "loading": 0.6, "disk": 0.3, "registered": 0.3,
            "downloading": 0.1}
W_AFFINITY, W_INFLIGHT, W_WAITING, W_KV, W_LATENCY = 1.0, 1.5, 0.5, 0.25, 0.2
W_PREFIX, W_REGION, W_PRICE, W_NO_SLOT = 0.3, 0.1, 0.1, 0.1


@dataclass(frozen=True)
class Prefs:
    """What a request asks of the node besides its model."""

    region: str | None = None
    max_price: int | None = None  # per 1k completion tokens
    prefix_node: str | None = None  # url of the node that last served this prompt prefix


def eligible(nodes: Sequence[NodeView], model: str | None) -> list[NodeView]:
    """Hard filters."""
    out = []
    for n in nodes:
        if not n.usable() or n.tier(model) in (None, "failed"):
            continue
        if n.inflight + n.waiting >= 2 * max(1, n.max_num_seqs):
            continue
        out.append(n)
    return out


def soft_filters(nodes: list[NodeView], prefs: Prefs) -> list[NodeView]:
    """Region and price preferences; each is skipped if it would leave no node."""
    if prefs.region:
        kept = [n for n in nodes if n.region.upper() == prefs.region.upper()]
        nodes = kept or nodes
    if prefs.max_price is not None:
        kept = [n for n in nodes if n.price.get("per_1k_completion_tokens", 0) <= prefs.max_price]
        nodes = kept or nodes
    return nodes


def score(n: NodeView, model: str | None, prefs: Prefs = Prefs(), max_price: int = 0) -> float:
    c = max(1, n.max_num_seqs)
    lat = 0.0 if n.latency_s is None else min(1.0, n.latency_s / 2.0)
    s = (W_AFFINITY * AFFINITY.get(n.tier(model) or "", 0.0) - W_INFLIGHT * n.inflight / c
         - W_WAITING * n.waiting / c - W_KV * n.kv_usage - W_LATENCY * lat)
    if n.tier(model) in ("host", "disk", "registered") and n.free_slots == 0:
        s -= W_NO_SLOT  # loading it there first evicts another resident adapter
    if prefs.prefix_node == n.url:
        s += W_PREFIX
    if prefs.region and n.region.upper() == prefs.region.upper():
        s += W_REGION
    if max_price:
        s -= W_PRICE * n.price.get("per_1k_completion_tokens", 0) / max_price
    return s


class Policy:
    """Orders the eligible nodes for a request: primary first, then fallbacks."""

    name = "ours"

    def __init__(self, seed: int | None = None) -> None:
        self.rng = random.Random(seed)

    def rank(self, nodes: Sequence[NodeView], model: str | None, prefs: Prefs = Prefs()) -> list[NodeView]:
        cands = soft_filters(eligible(nodes, model), prefs)
        top = max((n.price.get("per_1k_completion_tokens", 0) for n in cands), default=0)
        return sorted(cands, key=lambda n: score(n, model, prefs, top) + self.rng.uniform(0, 1e-6), reverse=True)


class RoundRobin(Policy):
    """Peer for the benchmark: the next eligible node in turn, ignoring adapters and load."""

    name = "round-robin"

    def __init__(self, seed: int | None = None) -> None:
        super().__init__(seed)
        self._turn = itertools.count()

    def rank(self, nodes, model, prefs=Prefs()):
        cands = soft_filters(eligible(nodes, model), prefs)
        if not cands:
            return []
        k = next(self._turn) % len(cands)
        return cands[k:] + cands[:k]


class LeastLoaded(Policy):
    """Peer for the benchmark: fewest requests in flight (own count + scraped queue), random ties."""

    name = "least-loaded"

    def rank(self, nodes, model, prefs=Prefs()):
        cands = soft_filters(eligible(nodes, model), prefs)
        return sorted(cands,
                      key=lambda n: (n.inflight + n.waiting) / max(1, n.max_num_seqs) + self.rng.uniform(0, 1e-6))


POLICIES = {p.name: p for p in (Policy, RoundRobin, LeastLoaded)}
