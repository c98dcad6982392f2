"""Adapter registry and tiers: remote/disk -> host cache (LRU) -> device pool (slots, LRU).

Implements the scheduler's AdapterGate. Loading (download + parse) runs on background threads; the
engine step only ever copies host tensors into free pool rows. Only adapters with no running and no
queued requests are evicted from the device, least recently used first; pinned adapters never are.
"""

from __future__ import annotations

import enum
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from openlora.config import LORA_SITES, EngineConfig, cache_dir
from openlora.errors import AdapterLoadError, AdapterNotFound, InvalidRequest, OpenLoRAError
from openlora.kernels import select_backend
from openlora.lora.adapter import LoRAAdapter, load_peft_adapter
from openlora.lora.batch import LoRABatch, SiteRows
from openlora.lora.pool import LoRAPool
from openlora.lora.sources import fetch, parse_source
from openlora.request import AdapterUse, Request

log = logging.getLogger("openlora.lora")


class AdapterState(str, enum.Enum):
    REGISTERED = "registered"
    DOWNLOADING = "downloading"
    ON_DISK = "disk"
    HOST = "host"
    RESIDENT = "resident"
    FAILED = "failed"


@dataclass(eq=False)
class AdapterEntry:
    """Everything the manager knows about one registered adapter."""

    adapter_id: str
    source: str
    pinned: bool = False
    state: AdapterState = AdapterState.REGISTERED
    host: LoRAAdapter | None = None  # weights in host memory
    content_hash: str = ""
    error: str | None = None
    exc: Exception | None = None  # the load failure, re-raised by a synchronous register()
    rows: dict[str, list[int]] | None = None  # device rows per site while resident
    holders: set[str] = field(default_factory=set)  # running request ids
    waiting: set[str] = field(default_factory=set)  # queued request ids
    last_used: float = 0.0
    loading: bool = False
    load_seconds: float | None = None
    resident_since: float = 0.0
    unregistered: bool = False
    builder: object = None  # callable returning a LoRAAdapter (merged adapters); None: load from source

    @property
    def resident(self) -> bool:
        return self.rows is not None


class LoRAManager:
    """Registry, host LRU, device slots and per-step LoRA metadata."""

    def __init__(self, config: EngineConfig, *, loader_threads: int = 2) -> None:
        self.config = config
        self.shape = config.model.shape
        self.max_loras = config.lora.max_loras
        self.max_cpu_loras = config.lora.max_cpu_loras
        self.device = torch.device(config.device)
        from openlora.worker.model_runner import DTYPES

        rows = config.lora.pool_rows or self.max_loras * 16
        self.pool = LoRAPool(self.shape, rows, DTYPES[config.dtype], self.device)
        self.backend = select_backend(self.device)
        self.entries: dict[str, AdapterEntry] = {}
        self.host_lru: OrderedDict[str, None] = OrderedDict()  # ids with host weights, LRU first
        self.lock = threading.RLock()
        self.executor = ThreadPoolExecutor(max_workers=loader_threads, thread_name_prefix="adapter-load")
        self.cache_root = cache_dir() / "adapters"
        self.stats = {"loads": 0, "evictions": 0, "host_evictions": 0, "load_failures": 0}
        self.eviction_log: list[str] = []  # device evictions in order (tests and metrics)
        self.starved_since: float | None = None  # some queued adapter found no free slot

    # ---- registry ---------------------------------------------------------------------------
    def register(self, adapter_id: str, source: str, *, pinned: bool = False, load: bool = False,
                 builder=None) -> AdapterEntry:
        """Register without loading (unless `load`: then parse now and raise on a bad adapter)."""
        if not adapter_id or not isinstance(adapter_id, str):
            raise InvalidRequest("adapter id must be a non-empty string")
        if builder is None:
            parse_source(source)  # validates the spec early
        with self.lock:
            old = self.entries.get(adapter_id)
            if old is not None and not old.unregistered:
                if old.holders or old.waiting:
                    raise InvalidRequest(f"adapter {adapter_id!r} is in use; unregister it first")
                self._drop(old)
            e = AdapterEntry(adapter_id, source, pinned=pinned, builder=builder)
            self.entries[adapter_id] = e
        if load:
            self._load(e)
            if e.state == AdapterState.FAILED:
                with self.lock:
                    del self.entries[adapter_id]
                raise e.exc or AdapterLoadError(e.error or f"adapter {adapter_id!r} failed to load")
        return e

    def unregister(self, adapter_id: str) -> None:
        """Remove an adapter. Requests already running or queued for it finish first; new ones get 404."""
        with self.lock:
            e = self.entries.get(adapter_id)
            if e is None or e.unregistered:
                raise AdapterNotFound(f"adapter {adapter_id!r} is not registered")
            e.unregistered = True
            if not e.holders and not e.waiting:
                self._drop(e)

    def _drop(self, e: AdapterEntry) -> None:
        if e.rows is not None:
            self.pool.unload(e.rows)
            e.rows = None
        self.host_lru.pop(e.adapter_id, None)
        e.host = None
        if self.entries.get(e.adapter_id) is e:
            del self.entries[e.adapter_id]

    def get(self, adapter_id: str) -> AdapterEntry:
        e = self.entries.get(adapter_id)
        if e is None or e.unregistered:
            raise AdapterNotFound(f"adapter {adapter_id!r} is not registered")
        return e

    def state_of(self, e: AdapterEntry) -> str:
        if e.state == AdapterState.FAILED:
            return "failed"
        if e.resident:
            return "resident"
        if e.loading:
            return "loading"
        return e.state.value

    def resolve(self, spec) -> tuple[AdapterUse, ...]:
        """Request adapter spec -> AdapterUse tuple (hash filled in on admission). Starts a
        background load (prefetch) for adapters not in host memory; retries failed ones."""
        if spec is None or spec == "" or spec == []:
            return ()
        pairs = [(spec, 1.0)] if isinstance(spec, str) else list(spec)
        if not pairs:
            return ()
        seen = set()
        uses = []
        for item in pairs:
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise InvalidRequest("adapters must be a name or a list of (name, weight) pairs")
            name, w = item
            if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w):
                raise InvalidRequest(f"adapter weight for {name!r} must be a finite number")
            if name in seen:
                raise InvalidRequest(f"adapter {name!r} is listed twice")
            seen.add(name)
            e = self.get(name)
            with self.lock:
                if e.state == AdapterState.FAILED and not e.loading:
                    e.state, e.error = AdapterState.REGISTERED, None  # a new request retries
                self._prefetch(e)
            uses.append(AdapterUse(name, e.content_hash, float(w)))
        return tuple(uses)

    # ---- background loading -----------------------------------------------------------------
    def _prefetch(self, e: AdapterEntry) -> None:
        if e.host is None and not e.resident and not e.loading and e.state != AdapterState.FAILED:
            e.loading = True
            self.executor.submit(self._load, e)

    def _load(self, e: AdapterEntry) -> None:
        t0 = time.perf_counter()
        try:
            if e.builder is not None:
                adapter = e.builder()
            else:
                src = parse_source(e.source)
                if src.kind != "local":
                    e.state = AdapterState.DOWNLOADING
                path = fetch(src, self.cache_root)
                e.state = AdapterState.ON_DISK
                adapter = load_peft_adapter(path, e.adapter_id, self.shape,
                                            expected_base_model=self.config.model.path)
            too_big = [s for s in LORA_SITES if adapter.site_rank(s) > self.pool.rows]
            if too_big:
                raise AdapterLoadError(f"adapter {e.adapter_id!r} has rank above the pool's {self.pool.rows} rows at {too_big}")
        except Exception as ex:  # any failure marks this adapter failed, nobody else notices
            msg = str(ex) if isinstance(ex, OpenLoRAError) else f"{type(ex).__name__}: {ex}"
            log.warning("adapter %s failed to load: %s", e.adapter_id, msg)
            with self.lock:
                e.state, e.error, e.loading = AdapterState.FAILED, msg, False
                e.exc = ex if isinstance(ex, OpenLoRAError) else AdapterLoadError(msg)
                self.stats["load_failures"] += 1
            return
        with self.lock:
            e.host, e.content_hash = adapter, adapter.content_hash
            e.state, e.loading = AdapterState.HOST, False
            e.load_seconds = time.perf_counter() - t0
            self.stats["loads"] += 1
            self.host_lru[e.adapter_id] = None
            self.host_lru.move_to_end(e.adapter_id)
            self._trim_host()

    def _trim_host(self) -> None:
        """Drop host copies beyond max_cpu_loras: LRU first, never one with queued requests."""
        excess = len(self.host_lru) - self.max_cpu_loras
        for aid in list(self.host_lru):
            if excess <= 0:
                break
            e = self.entries.get(aid)
            if e is None or e.waiting or e.pinned:
                continue
            e.host = None
            if not e.resident:
                e.state = AdapterState.ON_DISK if e.builder is None else AdapterState.REGISTERED
            del self.host_lru[aid]
            self.stats["host_evictions"] += 1
            excess -= 1

    # ---- AdapterGate --------------------------------------------------------------------------
    def enqueue(self, req: Request) -> None:
        with self.lock:
            for u in req.adapters:
                e = self.entries.get(u.adapter_id)
                if e is not None:
                    e.waiting.add(req.request_id)
                    self._prefetch(e)

    def failure(self, req: Request) -> str | None:
        for u in req.adapters:
            e = self.entries.get(u.adapter_id)
            if e is None:
                return f"adapter {u.adapter_id!r} was unregistered"
            if e.state == AdapterState.FAILED:
                return e.error or f"adapter {u.adapter_id!r} failed to load"
        return None

    def acquire(self, req: Request) -> bool:
        if not req.adapters:
            return True
        with self.lock:
            entries = [self.entries[u.adapter_id] for u in req.adapters]
            now = time.monotonic()
            for e in entries:
                if not e.resident and not self._make_resident(e, now):
                    if self.starved_since is None:
                        self.starved_since = now
                    return False
            # Fairness: once others wait for a slot, an adapter resident longer than the time slice
            # admits no new requests, drains, and becomes evictable.
            if self.starved_since is not None:
                slice_s = self.config.scheduler.adapter_time_slice_s
                if any(e.holders and now - e.resident_since > slice_s and not e.pinned for e in entries):
                    return False
            req.adapters = tuple(AdapterUse(u.adapter_id, e.content_hash, u.weight) for u, e in zip(req.adapters, entries))
            for e in entries:
                if not e.holders:
                    e.resident_since = now
                e.holders.add(req.request_id)
                e.waiting.discard(req.request_id)
                e.last_used = now
                e.state = AdapterState.RESIDENT
            return True

    def release(self, req: Request) -> None:
        with self.lock:
            for u in req.adapters:
                e = self.entries.get(u.adapter_id)
                if e is None:
                    continue
                e.holders.discard(req.request_id)
                e.waiting.discard(req.request_id)
                e.last_used = time.monotonic()
                if e.unregistered and not e.holders and not e.waiting:
                    self._drop(e)

    def requeue(self, req: Request) -> None:
        """A running request was preempted: it waits again."""
        with self.lock:
            for u in req.adapters:
                e = self.entries.get(u.adapter_id)
                if e is not None:
                    e.holders.discard(req.request_id)
                    e.waiting.add(req.request_id)

    def _num_resident(self) -> int:
        return sum(1 for e in self.entries.values() if e.resident)

    def _make_resident(self, e: AdapterEntry, now: float) -> bool:
        """Copy host weights into the pool, evicting idle adapters if needed (lock held)."""
        if e.host is None:
            self._prefetch(e)
            return False
        ranks = {s: e.host.site_rank(s) for s in LORA_SITES if e.host.site_rank(s) > 0}
        while self._num_resident() >= self.max_loras or not self.pool.fits(ranks):
            if not self._evict_one():
                return False
        e.rows = self.pool.load(e.host)
        e.state = AdapterState.RESIDENT
        e.last_used = now
        self.host_lru.pop(e.adapter_id, None)  # the device copy is authoritative now
        self.host_lru[e.adapter_id] = None
        if self.starved_since is not None and not any(
                x.waiting and not x.resident for x in self.entries.values() if x is not e):
            self.starved_since = None
        return True

    def _evict_one(self) -> bool:
        """Evict the least recently used resident adapter with no running and no queued requests."""
        idle = [x for x in self.entries.values() if x.resident and not x.holders and not x.pinned]
        if not idle:
            return False
        # Prefer adapters nobody is waiting for; among those, least recently used.
        idle.sort(key=lambda x: (bool(x.waiting), x.last_used))
        victim = idle[0]
        if victim.waiting:
            return False  # evicting it would only cause a cold-start cliff for its queue
        self.pool.unload(victim.rows)
        victim.rows = None
        victim.state = AdapterState.HOST if victim.host is not None else AdapterState.ON_DISK
        self.stats["evictions"] += 1
        self.eviction_log.append(victim.adapter_id)
        return True

    # ---- per-step metadata ------------------------------------------------------------------
    def build_batch(self, seqs: Sequence, q_starts: Sequence[int], num_tokens: int) -> LoRABatch | None:
        """Group this step's LoRA tokens by adapter mix; None when no row uses an adapter (the
        base-only path then costs nothing)."""
        mixes: dict[tuple, list[tuple[int, int]]] = {}
        for s, q0 in zip(seqs, q_starts):
            key = s.request.lora_key
            if key:
                mixes.setdefault(key, []).append((q0, s.num_new_tokens))
        if not mixes:
            return None
        dev = self.device
        tok: list[int] = []
        seg = [0]
        for ranges in mixes.values():
            for q0, n in ranges:
                tok.extend(range(q0, q0 + n))
            seg.append(len(tok))
        rows_of = {aid: self.entries[aid].rows or {} for key in mixes for aid, _ in key}
        used = {site for rows in rows_of.values() for site in rows}
        sites = {}
        for site in used:
            idx: list[int] = []
            sc: list[float] = []
            ptr = [0]
            for key in mixes:
                for aid, w in key:
                    rs = rows_of[aid].get(site, ())
                    idx.extend(rs)
                    sc.extend([w] * len(rs))
                ptr.append(len(idx))
            sites[site] = SiteRows(
                row_idx=torch.tensor(idx, dtype=torch.long, device=dev),
                row_indptr=torch.tensor(ptr, dtype=torch.long, device=dev),
                row_scale=torch.tensor(sc, dtype=torch.float32, device=dev),
                row_indptr_list=ptr,
            )
        return LoRABatch(
            token_idx=torch.tensor(tok, dtype=torch.long, device=dev),
            seg_indptr=torch.tensor(seg, dtype=torch.long, device=dev),
            seg_indptr_list=seg, sites=sites, num_tokens=num_tokens,
        )

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
