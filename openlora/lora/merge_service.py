"""Per-request adapter merges: parse the request's `merge` field, build merged adapters in the
background, cache them, and serve them like any adapter (through the pool and the LRU).

`cat` is exact and needs no merged copy: it becomes a weighted composition in the multi-adapter
pass. Every other strategy builds a merged adapter once (on the adapter-load worker threads) and
registers it under `merge:<key>`, where the key hashes the merge parameters and the source adapters'
identities (content hashes), so an identical request later is a cache hit, and one after a source was
updated in place builds a new merge: the build checks it reads the very versions the key names.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import asdict, dataclass
from typing import Any

from openlora.errors import AdapterNotFound, InvalidRequest
from openlora.lora.adapter import compute_content_hash
from openlora.lora.merge import check_ranks, merge_adapters, validate_params

_FIELDS = {"adapters", "weights", "strategy", "density", "majority_sign_method", "svd_rank", "svd_clamp", "seed"}


@dataclass(frozen=True)
class MergeSpec:
    """A validated `merge` request field."""

    adapters: tuple[str, ...]
    weights: tuple[float, ...]
    strategy: str = "cat"
    density: float | None = None
    majority_sign_method: str = "total"
    svd_rank: int | None = None
    svd_clamp: float | None = None
    seed: int | None = None

    @classmethod
    def parse(cls, raw: Any) -> "MergeSpec":
        """Accepts `{adapters: [{id, weight}], strategy, ...}` or `{adapters: [id, ...], weights: [...]}`."""
        if not isinstance(raw, dict):
            raise InvalidRequest("merge: must be an object")
        unknown = set(raw) - _FIELDS
        if unknown:
            raise InvalidRequest(f"merge: unknown field(s) {sorted(unknown)}")
        items = raw.get("adapters")
        if not isinstance(items, list) or not items:
            raise InvalidRequest("merge.adapters: must be a non-empty list")
        if all(isinstance(x, dict) for x in items):
            if "weights" in raw:
                raise InvalidRequest("merge.weights: give weights inside merge.adapters or as a list, not both")
            ids, weights = [], []
            for x in items:
                if not isinstance(x.get("id"), str) or not x["id"]:
                    raise InvalidRequest("merge.adapters[].id: must be a non-empty string")
                ids.append(x["id"])
                weights.append(x.get("weight", 1.0))
        elif all(isinstance(x, str) for x in items):
            ids = list(items)
            weights = raw.get("weights", [1.0] * len(ids))
            if not isinstance(weights, list):
                raise InvalidRequest("merge.weights: must be a list of numbers")
        else:
            raise InvalidRequest("merge.adapters: must be a list of {id, weight} objects or of adapter ids")
        if len(set(ids)) != len(ids):
            raise InvalidRequest("merge.adapters: an adapter is listed twice")
        if any(isinstance(w, bool) or not isinstance(w, (int, float)) for w in weights):
            raise InvalidRequest("merge.weights: every weight must be a number")
        spec = cls(tuple(ids), tuple(float(w) for w in weights), raw.get("strategy", "cat"), raw.get("density"),
                   raw.get("majority_sign_method", "total"), raw.get("svd_rank"), raw.get("svd_clamp"), raw.get("seed"))
        if spec.seed is not None and (isinstance(spec.seed, bool) or not isinstance(spec.seed, int)):
            raise InvalidRequest("merge.seed: must be an integer")
        validate_params(len(ids), list(weights), spec.strategy, spec.density, spec.majority_sign_method,
                        spec.svd_rank, spec.svd_clamp)
        return spec

    def params(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("adapters", "weights")}


class MergeService:
    """Turns MergeSpecs into adapter specs the engine can resolve; counts builds and cache hits."""

    def __init__(self, manager) -> None:
        self.manager = manager  # openlora.lora.manager.LoRAManager
        self.lock = threading.Lock()
        self.stats = {"merges_built": 0, "merge_cache_hits": 0, "merge_requests": 0}
        self._sources: dict[str, tuple[str, ...]] = {}  # merged adapter id -> its sources' content hashes

    def key(self, spec: MergeSpec, identities: list[str] | None = None) -> str:
        """The cache key: parameters, weights and the sources' identities (LoRAManager.identity)."""
        if identities is None:
            identities = [self.manager.identity(a) for a in spec.adapters]
        doc = {"v": 1, "sources": identities, "weights": list(spec.weights), **spec.params()}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    def prepare(self, spec: MergeSpec) -> list[tuple[str, float]]:
        """The adapter list a merge request runs with: the weighted sources for `cat`, else the one
        merged adapter (registered now and built in the background on first use)."""
        with self.lock:
            self.stats["merge_requests"] += 1
        for aid in spec.adapters:
            if self.manager.card(aid) is None:
                raise AdapterNotFound(f"adapter {aid!r} is not registered")
        if spec.strategy == "cat":
            return list(zip(spec.adapters, spec.weights))
        hosts = [self.manager.host_copy(a) for a in spec.adapters]
        if all(h is not None for h in hosts):
            check_ranks(hosts, spec.strategy)  # immediate 400 when the sources are already in memory
        identities = [self.manager.identity(a) for a in spec.adapters]
        mid = f"merge:{self.key(spec, identities)[:24]}"
        with self.lock:
            existing = self.manager.card(mid)
            if existing is not None and existing["state"] != "failed":
                self.stats["merge_cache_hits"] += 1
            else:
                self.manager.register(mid, f"merge of {', '.join(spec.adapters)}",
                                      builder=lambda: self._build(spec, mid, identities))
        return [(mid, 1.0)]

    def _build(self, spec: MergeSpec, mid: str, identities: list[str]):
        """Runs on an adapter-load worker: load the sources (host copy if present; exactly the versions
        the key names, else AdapterLoadError), merge, hash."""
        sources = [self.manager.source_adapter(aid, ident) for aid, ident in zip(spec.adapters, identities)]
        merged = merge_adapters(sources, list(spec.weights), spec.strategy, density=spec.density,
                                majority_sign_method=spec.majority_sign_method, svd_rank=spec.svd_rank,
                                svd_clamp=spec.svd_clamp, seed=spec.seed, new_id=mid)
        if not merged.content_hash:
            merged.content_hash = compute_content_hash(merged.modules)
        with self.lock:
            self.stats["merges_built"] += 1
            self._sources[mid] = tuple(s.content_hash for s in sources)
        return merged

    def source_hashes(self, mid: str) -> tuple[str, ...] | None:
        """The content hashes of the source versions merged adapter `mid` was built from (receipts name
        them, not whatever version is current when the request ends); None before it was built."""
        with self.lock:
            return self._sources.get(mid)
