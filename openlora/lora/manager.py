"""Adapter registry and tiers: remote -> disk cache -> host cache (LRU) -> device pool (slots, LRU).

Implements the scheduler's AdapterGate. Loading (download, parse, pack into pool layout) runs on
background threads; the engine step only ever copies packed host tensors into free pool rows.

NOTE (the tiers' rules, from the design's traps):
- Prefetch: every adapter a queued request needs is loaded into host memory ahead of its turn, in
  the order the requests queued, as long as the host cache has room (`max_cpu_loras`, loads in flight
  included). The host cache never drops an adapter that has queued requests, so a prefetched adapter
  is never thrown away before it is used (no thrashing); it drops idle ones, least recently used first.
- Device eviction: least recently used among resident adapters with no running and no queued
  requests; pinned adapters never. An adapter with queued requests is only evicted when its time
  slice ran out while another adapter is starving for a slot (fairness below).
- Fairness (LoRAX-style time slices): when an adapter is ready in host memory but finds no free slot
  ("starving"), the resident adapters that have been resident longer than `adapter_time_slice_s`,
  oldest first and one per starving adapter, stop admitting new requests, drain, and give up their
  slot even though they have queued requests. FCFS holds within each adapter.
"""

from __future__ import annotations

import enum
import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from openlora.config import LORA_SITES, EngineConfig, cache_dir
from openlora.errors import AdapterLoadError, AdapterNotFound, InvalidRequest, OpenLoRAError
from openlora.kernels import select_backend
from openlora.lora.adapter import LoRAAdapter, load_peft_adapter
from openlora.lora.batch import LoRABatch, SiteRows
from openlora.lora.pool import LoRAPool, PackedAdapter
from openlora.lora.sources import fetch, parse_source, scan_adapter_dir
from openlora.request import AdapterUse, Request

log = logging.getLogger("openlora.lora")


class AdapterState(str, enum.Enum):
    """Where an adapter's weights are. `state_of()` reports these values."""

    REGISTERED = "registered"  # known, nothing loaded
    DOWNLOADING = "downloading"  # a loader thread fetches it from the hub / S3 into the disk cache
    ON_DISK = "disk"  # files on local disk (folder or disk cache), not in host memory
    LOADING = "loading"  # a loader thread parses and packs it
    HOST = "host"  # packed in host memory
    RESIDENT = "resident"  # in the device pool
    FAILED = "failed"  # the last load failed; a new request retries


@dataclass(eq=False)
class AdapterEntry:
    """Everything the manager knows about one registered adapter (hashable by identity)."""

    adapter_id: str
    source: str
    pinned: bool = False
    state: AdapterState = AdapterState.REGISTERED
    host: LoRAAdapter | None = None  # parsed fp32 weights in host memory (merges read them)
    packed: PackedAdapter | None = None  # the same in pool layout, ready to copy to the device
    content_hash: str = ""
    expected_hash: str | None = None  # files hash the fetched files must match (sources.files_hash)
    error: str | None = None
    exc: Exception | None = None  # the load failure, re-raised by a synchronous register()
    rows: dict[str, list[int]] | None = None  # device rows per site while resident
    holders: set[str] = field(default_factory=set)  # running request ids
    waiting: set[str] = field(default_factory=set)  # queued request ids
    last_used: float = 0.0
    loading: bool = False
    load_seconds: float | None = None  # last background load (fetch + parse + pack)
    copy_seconds: float | None = None  # last host -> pool copy
    resident_since: float = 0.0  # start of the current residency (time slices count from here)
    unregistered: bool = False
    builder: Callable[[], LoRAAdapter] | None = None  # returns the adapter (merges); None: load from source

    @property
    def resident(self) -> bool:
        return self.rows is not None

    def _rest_state(self) -> AdapterState:
        """State once neither resident nor in host memory."""
        if self.builder is not None:
            return AdapterState.REGISTERED
        return AdapterState.ON_DISK if self.load_seconds is not None else AdapterState.REGISTERED


class LoRAManager:
    """Registry, host LRU, device slots and per-step LoRA metadata."""

    def __init__(self, config: EngineConfig, *, loader_threads: int = 2,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.shape = config.model.shape
        self.max_loras = config.lora.max_loras
        self.max_cpu_loras = max(1, config.lora.max_cpu_loras)  # 0 would never load anything
        self.max_lora_rank = config.lora.max_lora_rank
        self.device = torch.device(config.device)
        from openlora.worker.model_runner import DTYPES

        rows = config.lora.pool_rows or self.max_loras * 16
        self.pool = LoRAPool(self.shape, rows, DTYPES[config.dtype], self.device)
        self.backend = select_backend(self.device)
        self.clock = clock  # injectable so fairness tests count steps, not wall time
        self.entries: dict[str, AdapterEntry] = {}
        self.lock = threading.RLock()
        self.executor = ThreadPoolExecutor(max_workers=loader_threads, thread_name_prefix="adapter-load")
        self.cache_root = cache_dir() / "adapters"
        self.stats = {"loads": 0, "evictions": 0, "host_evictions": 0, "load_failures": 0, "copies": 0}
        self.eviction_log: list[str] = []  # device evictions in order (tests and metrics)
        # (adapter id, load seconds, copy seconds) of each cold start that reached the device
        self.cold_starts: deque[tuple[str, float, float]] = deque(maxlen=100_000)
        self._resident: dict[AdapterEntry, None] = {}  # ordered set; may hold retired entries
        self._host: OrderedDict[AdapterEntry, None] = OrderedDict()  # packed in host memory, LRU first
        self._want: OrderedDict[AdapterEntry, None] = OrderedDict()  # to prefetch, in queue order
        self._num_loading = 0
        self._starving: dict[AdapterEntry, float] = {}  # host-ready, queued, no slot -> since when
        self._req: dict[str, list[AdapterEntry]] = {}  # request id -> its entries (survives re-register)
        self._cold: set[AdapterEntry] = set()  # loaded from disk, not yet copied to the device

    # ---- registry ---------------------------------------------------------------------------
    def register(self, adapter_id: str, source: str, *, pinned: bool = False, load: bool = False,
                 builder: Callable[[], LoRAAdapter] | None = None,
                 expected_hash: str | None = None) -> AdapterEntry:
        """Register without loading (unless `load`: then load now and raise on a bad adapter).
        `expected_hash` (sources.files_hash of the adapter's files) is checked on every fetch."""
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
            # An unregistered predecessor still serving its requests lives on through self._req.
            e = AdapterEntry(adapter_id, source, pinned=pinned, builder=builder, expected_hash=expected_hash)
            self.entries[adapter_id] = e
            if load:
                e.loading, e.state = True, AdapterState.LOADING
                self._num_loading += 1
        if load:
            self._load(e)
            if e.state == AdapterState.FAILED:
                with self.lock:
                    if self.entries.get(adapter_id) is e:
                        del self.entries[adapter_id]
                raise e.exc or AdapterLoadError(e.error or f"adapter {adapter_id!r} failed to load")
        return e

    def register_dir(self, root: str | Path, *, prefix: str = "", pinned: bool = False) -> list[str]:
        """Register every adapter folder under `root` (sources.scan_adapter_dir) as `prefix + name`,
        without loading any. Returns the names; names already registered are re-registered."""
        found = scan_adapter_dir(root)
        for name, folder in found.items():
            self.register(prefix + name, str(folder), pinned=pinned)
        return [prefix + n for n in found]

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
        """Forget an entry's weights everywhere (lock held)."""
        if e.rows is not None:
            self.pool.unload(e.rows)
            e.rows = None
        for d in (self._resident, self._host, self._want, self._starving):
            d.pop(e, None)
        self._cold.discard(e)
        e.host = e.packed = None
        if self.entries.get(e.adapter_id) is e:
            del self.entries[e.adapter_id]

    def get(self, adapter_id: str) -> AdapterEntry:
        e = self.entries.get(adapter_id)
        if e is None or e.unregistered:
            raise AdapterNotFound(f"adapter {adapter_id!r} is not registered")
        return e

    def state_of(self, e: AdapterEntry) -> str:
        """registered, downloading, disk, loading, host, resident or failed."""
        if e.state == AdapterState.FAILED:
            return "failed"
        if e.resident:
            return "resident"
        return e.state.value

    # ---- what the other layers may ask (nothing outside lora/ touches entries, lock or pool) -----
    def card(self, adapter_id: str) -> dict[str, Any] | None:
        """{id, state, pinned, load_seconds} of a registered adapter; None if it is not registered."""
        with self.lock:
            e = self.entries.get(adapter_id)
            if e is None or e.unregistered:
                return None
            return {"id": adapter_id, "state": self.state_of(e), "pinned": e.pinned, "load_seconds": e.load_seconds}

    def cards(self) -> list[dict[str, Any]]:
        """card() of every registered adapter, in registration order."""
        with self.lock:
            return [{"id": aid, "state": self.state_of(e), "pinned": e.pinned, "load_seconds": e.load_seconds}
                    for aid, e in self.entries.items() if not e.unregistered]

    def content_hash(self, adapter_id: str) -> str:
        """The adapter's content hash once loaded ('' before, or if unknown)."""
        e = self.entries.get(adapter_id)
        return e.content_hash if e is not None else ""

    def pool_tensors(self) -> tuple[dict, dict, Any]:
        """(A rows, B^T rows, SGMV backend) for the model runner's LoRA context."""
        return self.pool.a, self.pool.bt, self.backend

    @property
    def backend_name(self) -> str:
        return getattr(self.backend, "name", type(self.backend).__name__)

    def snapshot(self) -> dict[str, Any]:
        """Per-adapter state for the server and metrics, plus counts per state and tier sizes."""
        with self.lock:
            adapters = {}
            counts = {s.value: 0 for s in AdapterState}
            for aid, e in self.entries.items():
                if e.unregistered:
                    continue
                st = self.state_of(e)
                counts[st] += 1
                adapters[aid] = {"state": st, "pinned": e.pinned, "running": len(e.holders),
                                 "waiting": len(e.waiting), "load_seconds": e.load_seconds,
                                 "last_used": e.last_used or None}
            return {"adapters": adapters, "counts": counts, "resident": len(self._resident),
                    "host": len(self._host), "loading": self._num_loading, "prefetch_queue": len(self._want),
                    "starving": len(self._starving), "stats": dict(self.stats)}

    def resolve(self, spec) -> tuple[AdapterUse, ...]:
        """Request adapter spec -> AdapterUse tuple (hash filled in on admission). Raises
        AdapterNotFound / InvalidRequest. A failed adapter is reset so this new request retries it;
        the load itself starts when the request is queued (enqueue)."""
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
                    e.state, e.error, e.exc = AdapterState.REGISTERED, None, None  # a new request retries
            uses.append(AdapterUse(name, e.content_hash, float(w)))
        return tuple(uses)

    # ---- background loading -----------------------------------------------------------------
    def prefetch(self, adapter_ids: Iterable[str]) -> None:
        """Ask for these adapters in host memory ahead of any request (within the host budget)."""
        with self.lock:
            for aid in adapter_ids:
                self._want_add(self.get(aid))
            self._pump()

    def _want_add(self, e: AdapterEntry) -> None:
        if e.packed is None and not e.loading and e.state != AdapterState.FAILED and not e.resident:
            self._want.setdefault(e, None)

    def _pump(self) -> None:
        """Start background loads for wanted adapters, in order, while the host cache has room (lock held)."""
        while self._want:
            if len(self._host) + self._num_loading >= self.max_cpu_loras and not self._drop_one_host():
                return
            e, _ = self._want.popitem(last=False)
            if e.packed is not None or e.loading or e.state == AdapterState.FAILED:
                continue
            e.loading = True
            e.state = AdapterState.LOADING
            self._num_loading += 1
            self.executor.submit(self._load, e)

    def _drop_one_host(self) -> bool:
        """Drop the least recently used host copy nobody is queued for (lock held)."""
        for x in self._host:
            if not x.waiting and not x.pinned:
                del self._host[x]
                x.host = x.packed = None
                self._cold.discard(x)
                if not x.resident:
                    x.state = x._rest_state()
                self.stats["host_evictions"] += 1
                return True
        return False

    def _read(self, e: AdapterEntry) -> LoRAAdapter:
        """Fetch (into the disk cache) and parse one adapter; runs on a loader thread."""
        if e.builder is not None:
            return e.builder()
        src = parse_source(e.source)
        if src.kind != "local":
            e.state = AdapterState.DOWNLOADING
        path = fetch(src, self.cache_root, expected_files_hash=e.expected_hash)
        e.state = AdapterState.LOADING
        # Shapes are the real compatibility check; the served model is a local path here while adapters
        # name hub ids, so a name comparison would warn for nearly every adapter.
        return load_peft_adapter(path, e.adapter_id, self.shape)

    def _load(self, e: AdapterEntry) -> None:
        """Load one adapter into host memory; the caller set e.loading and counted it (loader thread,
        or the caller's thread for register(load=True))."""
        t0 = time.perf_counter()
        try:
            adapter = self._read(e)
            if adapter.max_rank > self.max_lora_rank:
                raise AdapterLoadError(f"adapter {e.adapter_id!r} has rank {adapter.max_rank}, above this "
                                       f"server's --max-lora-rank {self.max_lora_rank}")
            too_big = [s for s in LORA_SITES if adapter.site_rank(s) > self.pool.rows]
            if too_big:
                raise AdapterLoadError(
                    f"adapter {e.adapter_id!r} has rank above the pool's {self.pool.rows} rows at {too_big}")
            packed = self.pool.pack(adapter)
        except Exception as ex:  # any failure marks this adapter failed, nobody else notices
            msg = str(ex) if isinstance(ex, OpenLoRAError) else f"{type(ex).__name__}: {ex}"
            log.warning("adapter %s failed to load: %s", e.adapter_id, msg)
            with self.lock:
                e.state, e.error, e.loading = AdapterState.FAILED, msg, False
                e.exc = ex if isinstance(ex, OpenLoRAError) else AdapterLoadError(msg)
                self._num_loading -= 1
                self.stats["load_failures"] += 1
                self._starving.pop(e, None)
                self._pump()
            return
        with self.lock:
            self._num_loading -= 1
            e.loading = False
            if e.unregistered and not e.holders and not e.waiting:
                self._pump()  # dropped while loading: discard
                return
            e.host, e.packed, e.content_hash = adapter, packed, adapter.content_hash
            e.error = e.exc = None
            e.state = AdapterState.RESIDENT if e.resident else AdapterState.HOST
            e.load_seconds = time.perf_counter() - t0
            self.stats["loads"] += 1
            self._host[e] = None
            self._cold.add(e)
            # Over budget only when register(load=True) bypassed _pump: trim idle copies.
            while len(self._host) > self.max_cpu_loras and self._drop_one_host():
                pass
            self._pump()

    # ---- AdapterGate --------------------------------------------------------------------------
    def _entries_of(self, req: Request) -> list[AdapterEntry]:
        ents = self._req.get(req.request_id)
        if ents is None:  # not queued through enqueue (direct gate use): look the names up
            ents = [self.entries[u.adapter_id] for u in req.adapters if u.adapter_id in self.entries]
        return ents

    def enqueue(self, req: Request) -> None:
        """Queue the request on its adapters and prefetch them (in queue order)."""
        if not req.adapters:
            return
        with self.lock:
            ents = [self.entries[u.adapter_id] for u in req.adapters if u.adapter_id in self.entries]
            self._req[req.request_id] = ents
            for e in ents:
                e.waiting.add(req.request_id)
                self._want_add(e)
            self._pump()

    def failure(self, req: Request) -> BaseException | None:
        """The exception that keeps the request's adapters from loading (its status and type reach
        the client unchanged: 400 invalid_request_error for a bad merge), or None."""
        if not req.adapters:
            return None
        with self.lock:
            ents = self._entries_of(req)
            if len(ents) != len(req.adapters):
                return AdapterNotFound("an adapter of this request was unregistered")
            for e in ents:
                if e.state == AdapterState.FAILED:
                    return e.exc or AdapterLoadError(e.error or f"adapter {e.adapter_id!r} failed to load")
        return None

    def acquire(self, req: Request) -> bool:
        """Make the request's adapters resident and hold them. False if one is still loading, no slot
        is free, or one's time slice ran out while another adapter starves (it drains first)."""
        if not req.adapters:
            return True
        with self.lock:
            ents = self._entries_of(req)
            if len(ents) != len(req.adapters):
                return False  # failure() reports it
            now = self.clock()
            for e in ents:
                if e.resident:
                    if self._must_drain(e, now):
                        return False
                elif not self._make_resident(e, now, ents):
                    return False
            req.adapters = tuple(AdapterUse(u.adapter_id, e.content_hash, u.weight)
                                 for u, e in zip(req.adapters, ents))
            for e in ents:
                e.holders.add(req.request_id)
                e.waiting.discard(req.request_id)
                e.last_used = now
                e.state = AdapterState.RESIDENT
                if e in self._host:
                    self._host.move_to_end(e)
            return True

    def release(self, req: Request) -> None:
        """The request finished, failed or was aborted: drop its holds and queue places."""
        if not req.adapters:
            return
        with self.lock:
            ents = self._req.pop(req.request_id, None)
            if ents is None:
                ents = self._entries_of(req)
            now = self.clock()
            for e in ents:
                e.holders.discard(req.request_id)
                e.waiting.discard(req.request_id)
                e.last_used = now
                if not e.waiting:
                    self._starving.pop(e, None)
                    self._want.pop(e, None)
                if e.unregistered and not e.holders and not e.waiting:
                    self._drop(e)
            if self._want:
                self._pump()

    def requeue(self, req: Request) -> None:
        """A running request was preempted (or admitted but found no KV blocks): it waits again."""
        with self.lock:
            for e in self._entries_of(req):
                e.holders.discard(req.request_id)
                e.waiting.add(req.request_id)

    # ---- device slots -------------------------------------------------------------------------
    def _draining(self, now: float) -> list[AdapterEntry]:
        """Resident adapters whose slice ran out, oldest residency first, one per starving adapter
        (lock held). They admit no new requests and may be evicted once idle."""
        if not self._starving:
            return []
        slice_s = self.config.scheduler.adapter_time_slice_s
        over = [x for x in self._resident if not x.pinned and now - x.resident_since >= slice_s]
        over.sort(key=lambda x: x.resident_since)
        return over[:len(self._starving)]

    def _must_drain(self, e: AdapterEntry, now: float) -> bool:
        return bool(self._starving) and e in self._draining(now)

    def _make_resident(self, e: AdapterEntry, now: float, keep: Sequence[AdapterEntry]) -> bool:
        """Copy packed host weights into the pool, evicting idle adapters if needed (lock held)."""
        if e.packed is None:
            self._want_add(e)
            self._pump()
            return False
        ranks = e.packed.ranks
        while len(self._resident) >= self.max_loras or not self.pool.fits(ranks):
            if not self._evict_one(now, keep):
                self._starving.setdefault(e, now)
                return False
        t0 = time.perf_counter()
        e.rows = self.pool.load(e.packed)
        e.copy_seconds = time.perf_counter() - t0
        self.stats["copies"] += 1
        if e in self._cold:  # first residency since this host copy was loaded: a cold start
            self._cold.discard(e)
            self.cold_starts.append((e.adapter_id, e.load_seconds or 0.0, e.copy_seconds))
        self._resident[e] = None
        self._starving.pop(e, None)
        e.state = AdapterState.RESIDENT
        e.resident_since = now
        e.last_used = now
        self._host.move_to_end(e)
        return True

    def _evict_one(self, now: float, keep: Sequence[AdapterEntry]) -> bool:
        """Evict the least recently used resident adapter with no running and no queued requests;
        failing that, an idle one whose time slice ran out while others starve (lock held)."""
        cands = [x for x in self._resident if not x.holders and not x.pinned and x not in keep]
        idle = [x for x in cands if not x.waiting]
        if idle:
            victim = min(idle, key=lambda x: x.last_used)
        else:
            drain = self._draining(now) if self._starving else []
            late = [x for x in cands if x in drain]
            if not late:
                return False  # evicting one with a queue would only cause a cold-start cliff
            victim = min(late, key=lambda x: x.resident_since)
        self.pool.unload(victim.rows)
        victim.rows = None
        del self._resident[victim]
        victim.state = AdapterState.HOST if victim.packed is not None else victim._rest_state()
        if victim.waiting:
            self._want_add(victim)  # its queue still needs it: keep (or get) it in host memory
        self.stats["evictions"] += 1
        self.eviction_log.append(victim.adapter_id)
        return True

    def contended(self) -> bool:
        """More adapters have running or queued requests than there are slots: the scheduler then
        orders admissions for fairness across adapters instead of plain FCFS."""
        with self.lock:
            active = sum(1 for e in self.entries.values() if e.waiting or e.holders)
            return active > self.max_loras

    def num_resident(self) -> int:
        return len(self._resident)

    def resident_ids(self) -> list[str]:
        return [e.adapter_id for e in self._resident]

    # ---- per-step metadata ------------------------------------------------------------------
    def build_batch(self, seqs: Sequence, q_starts: Sequence[int], num_tokens: int) -> LoRABatch | None:
        """Group this step's LoRA tokens by adapter mix; None when no row uses an adapter (the
        base-only path then costs nothing)."""
        mixes: dict[tuple, list[tuple[int, int]]] = {}
        for s, q0 in zip(seqs, q_starts):
            req = s.request
            if req.adapters:
                ents = self._entries_of(req)
                key = tuple((e, u.weight) for e, u in zip(ents, req.adapters))
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
        used = {site for key in mixes for e, _ in key for site in (e.rows or {})}
        sites = {}
        for site in used:
            idx: list[int] = []
            sc: list[float] = []
            ptr = [0]
            for key in mixes:
                for e, w in key:
                    rs = (e.rows or {}).get(site, ())
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

