"""The adapter manager: the registry, the host cache and the device slots behind one lock, and the
scheduler's AdapterGate.

Tiers: remote -> disk cache (openlora.lora.sources) -> host cache (openlora.lora.host_cache: LRU,
prefetch, loader threads) -> device slots (openlora.lora.device_slots: pool rows, eviction, time
slices). The engine step only ever copies packed host tensors into free pool rows.

Other layers use the methods below (register, update or stage + install, card, cards, snapshot,
content_hash, pool_tensors, source_adapter, the gate's enqueue/failure/acquire/release/requeue); nothing
outside openlora/lora touches the entries, the lock or the tiers (tests/test_layering.py). One RLock
guards every entry and every tier: the tiers' rules read each other's state (a queued adapter is never
dropped from the host), so finer locks would only add orderings to get wrong.

Versions: an id names one current entry. Registering it again or update() replaces that entry
atomically; each request is bound to the entries it resolved when queued (self._req), so requests of a
replaced (or unregistered) entry finish on it, which is freed when its last request ends. Content
hashes key the prefix cache and merges, so nothing computed for one version serves another.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from openlora.config import EngineConfig, cache_dir
from openlora.errors import AdapterLoadError, AdapterNotFound, InvalidRequest
from openlora.lora.adapter import LoRAAdapter, load_peft_adapter
from openlora.lora.batch import LoRABatch
from openlora.lora.device_slots import DeviceSlots
from openlora.lora.entry import AdapterEntry, AdapterState, StagedVersion
from openlora.lora.host_cache import HostCache
from openlora.lora.pool import LoRAPool
from openlora.lora.registry import AdapterRegistry
from openlora.lora.sources import fetch, parse_source, scan_adapter_dir
from openlora.lora.tokenizers import AdapterTokenizers
from openlora.request import AdapterUse, Request

log = logging.getLogger("openlora.lora")

__all__ = ["AdapterEntry", "AdapterState", "LoRAManager", "StagedVersion"]


class LoRAManager:
    """Registry, host cache and device slots of one engine."""

    def __init__(self, config: EngineConfig, *, loader_threads: int = 2,
                 clock: Callable[[], float] = time.monotonic) -> None:
        from openlora.worker.model_runner import DTYPES

        self.config = config
        self.shape = config.model.shape
        self.max_loras = config.lora.max_loras
        self.clock = clock  # injectable so fairness tests count steps, not wall time
        self.lock = threading.RLock()
        self.stats = {"loads": 0, "evictions": 0, "host_evictions": 0, "load_failures": 0, "copies": 0}
        rows = config.lora.pool_rows or self.max_loras * 16
        pool = LoRAPool(self.shape, rows, DTYPES[config.dtype], torch.device(config.device))
        self.registry = AdapterRegistry()
        self.host_cache = HostCache(self.lock, config.lora.max_cpu_loras, self.shape, cache_dir() / "adapters",
                                    self._pack, self.stats, loader_threads, config.lora.max_adapter_bytes)
        self.slots = DeviceSlots(pool, self.max_loras, config.lora.max_lora_rank,
                                 config.scheduler.adapter_time_slice_s, self.host_cache, self.stats,
                                 scrub=config.cache.scrub_freed_memory)
        self._req: dict[str, list[AdapterEntry]] = {}  # request id -> its entries (survives re-register)
        self._serials = itertools.count(1)  # AdapterEntry.serial
        self.tokenizers = AdapterTokenizers({})  # set by use_tokenizer

    def use_tokenizer(self, tokenizer) -> None:
        """The model's tokenizer: adapters that add tokens bring their own, which must extend it."""
        self.tokenizers = AdapterTokenizers(tokenizer.get_vocab())

    def tokenizer_for(self, adapter_ids: Sequence[str]) -> Any:
        """The tokenizer of a request's adapter when it adds tokens (openlora.lora.tokenizers), else None."""
        if len(adapter_ids) != 1:
            return None  # a composition never holds such an adapter (failure refuses it)
        with self.lock:
            e = self.registry.current(adapter_ids[0])
            return None if e is None else self.tokenizers.get(e)

    def use_base(self, base) -> None:
        """The served model's projections (openlora.lora.dora.BaseProjections): DoRA adapters need them."""
        self.slots.pool.base = base

    def use_input_fix(self, fix) -> None:
        """The served base's LoRA input corrections and refused sites (openlora.lora.input_fix.InputFix), or
        None: a base that folded activation scales into its norms (AWQ, SmoothQuant)."""
        self.slots.pool.input_fix = fix

    def on_load_done(self, fn: Callable[[], None]) -> None:
        """Call `fn` (on a loader thread, without the lock) whenever a background load ends."""
        self.host_cache.on_done = fn

    def _pack(self, adapter: LoRAAdapter):
        return self.slots.pack(adapter)

    # ---- registry ---------------------------------------------------------------------------
    def register(self, adapter_id: str, source: str, *, pinned: bool = False, load: bool = False,
                 builder: Callable[[], LoRAAdapter] | None = None, expected_hash: str | None = None) -> None:
        """Register `adapter_id`, or replace the adapter registered under it (as install() does: requests
        bound to the old version finish on it). Without `load` nothing is read now; with it the adapter
        is loaded first and a bad one raises, leaving any old version serving. `expected_hash`
        (sources.files_hash of the adapter's files) is checked on every fetch."""
        if load:
            self.install(self.stage(adapter_id, source, pinned=pinned, builder=builder, expected_hash=expected_hash))
            return
        e = self._new_entry(adapter_id, source, pinned, builder, expected_hash)
        with self.lock:
            self._swap(e)

    def update(self, adapter_id: str, source: str, *, pinned: bool | None = None,
               expected_hash: str | None = None) -> str:
        """Replace a registered adapter with a new version (other files, or its source read again):
        stage() then install(). A bad new version raises the loader's error and the old one keeps
        serving; an unknown id raises AdapterNotFound. Returns the replaced version's content hash."""
        with self.lock:
            self.registry.get(adapter_id)  # 404 before reading anything
        return self.install(self.stage(adapter_id, source, pinned=pinned, expected_hash=expected_hash),
                            replace_only=True)

    def stage(self, adapter_id: str, source: str, *, pinned: bool | None = None,
              builder: Callable[[], LoRAAdapter] | None = None, expected_hash: str | None = None) -> StagedVersion:
        """Load and check a version of `adapter_id` on this thread (the lock is only taken around state
        changes, so the engine keeps stepping) without making it current. Raises the loader's error
        (AdapterLoadError, AdapterNotFound, InvalidRequest). `pinned` None: keep the replaced one's."""
        e = self._new_entry(adapter_id, source, bool(pinned), builder, expected_hash)
        with self.lock:
            self.host_cache.start_loading(e)
        self.host_cache.load(e)
        with self.lock:
            if e.state == AdapterState.FAILED:
                raise e.exc or AdapterLoadError(e.error or f"adapter {adapter_id!r} failed to load")
            return StagedVersion(adapter_id, e.content_hash, pinned, e)

    def install(self, staged: StagedVersion, *, replace_only: bool = False) -> str:
        """Make a staged version current, atomically: requests resolved from now on get it; requests
        already bound to the replaced version (queued or running) finish on that one, whose device rows
        and host copy are freed when the last one ends. Returns the replaced version's content hash (''
        if there was none or it never loaded). `replace_only`: raise AdapterNotFound (and forget the
        staged copy) unless the id is registered. The server calls this on the engine thread, so a
        request is bound to the version current when the engine accepted it."""
        e = staged.entry
        with self.lock:
            old = self.registry.find(staged.adapter_id)
            if old is None and replace_only:
                self._drop(e)
                raise AdapterNotFound(f"adapter {staged.adapter_id!r} is not registered")
            e.pinned = staged.pinned if staged.pinned is not None else bool(old is not None and old.pinned)
            return self._swap(e)

    def _new_entry(self, adapter_id: str, source: str, pinned: bool, builder: Callable[[], LoRAAdapter] | None,
                   expected_hash: str | None) -> AdapterEntry:
        if not adapter_id or not isinstance(adapter_id, str):
            raise InvalidRequest("adapter id must be a non-empty string")
        if builder is None:
            parse_source(source)  # validates the spec early
        return AdapterEntry(adapter_id, source, pinned=pinned, builder=builder, expected_hash=expected_hash,
                            serial=next(self._serials))

    def _swap(self, e: AdapterEntry) -> str:
        """Make `e` current under its id and retire the entry it replaces (lock held): an idle one goes
        now, a busy one lives on through self._req until its requests end (release). Returns the
        replaced entry's content hash."""
        old = self.registry.add(e)
        if old is None or old is e:
            return ""
        old.unregistered = True
        if not old.busy:
            self._drop(old)
        return old.content_hash

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
            e = self.registry.get(adapter_id)
            e.unregistered = True
            if not e.busy:
                self._drop(e)

    def pin(self, adapter_id: str, pinned: bool = True) -> None:
        """Pinned adapters are never evicted from the device or the host cache."""
        with self.lock:
            self.registry.get(adapter_id).pinned = pinned

    def _drop(self, e: AdapterEntry) -> None:
        """Forget an entry's weights everywhere (lock held)."""
        self.slots.drop(e)
        self.host_cache.drop(e)
        self.registry.remove(e)
        self.tokenizers.forget(e)

    # ---- what the other layers ask ------------------------------------------------------------
    @staticmethod
    def _card(e: AdapterEntry) -> dict[str, Any]:
        return {"id": e.adapter_id, "state": e.public_state(), "pinned": e.pinned, "load_seconds": e.load_seconds,
                "content_hash": e.content_hash}

    def card(self, adapter_id: str) -> dict[str, Any] | None:
        """{id, state, pinned, load_seconds, content_hash} of a registered adapter; None if it is not
        registered. state: registered, downloading, disk, loading, host, resident or failed;
        content_hash: '' until the current version first loaded."""
        with self.lock:
            e = self.registry.find(adapter_id)
            return None if e is None else self._card(e)

    def cards(self) -> list[dict[str, Any]]:
        """card() of every registered adapter, in registration order."""
        with self.lock:
            return [self._card(e) for e in self.registry.live()]

    def content_hash(self, adapter_id: str) -> str:
        """The adapter's content hash once loaded ('' before, or if unknown)."""
        with self.lock:
            e = self.registry.current(adapter_id)
            return e.content_hash if e is not None else ""

    def pool_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(A rows, B^T rows) per site, [num_layers, pool_rows, in|out]: the runner's LoRA context."""
        return self.slots.pool.a, self.slots.pool.bt

    def source_adapter(self, adapter_id: str, identity: str | None = None) -> LoRAAdapter:
        """The parsed weights of a registered adapter (merges read them): the host copy when there is
        one, else fetched and parsed now (not cached: the host cache holds what requests use). With
        `identity` (what identity() said when the merge was keyed), raises AdapterLoadError if the
        adapter was updated since, so a merge is never built from other content than its key names."""
        with self.lock:
            e = self.registry.get(adapter_id)
            self._check_identity(e, identity)
            host = e.host
        if host is not None:
            return host
        if e.builder is not None:
            return e.builder()
        hc = self.host_cache
        path = fetch(parse_source(e.source), hc.cache_root, expected_files_hash=e.expected_hash, max_bytes=hc.max_bytes)
        adapter = load_peft_adapter(path, adapter_id, self.shape, max_bytes=hc.max_bytes)
        with self.lock:
            e.content_hash = e.content_hash or adapter.content_hash
            self._check_identity(e, identity, adapter.content_hash)  # the files changed under the same source
        return adapter

    def identity(self, adapter_id: str) -> str:
        """What a cached derivative (a merge) of this adapter is keyed by: its content hash once known;
        before the first load, the registration itself (its serial: an update or re-registration makes a
        new one, so a stale merge is never reused). Raises AdapterNotFound."""
        with self.lock:
            return self._identity(self.registry.get(adapter_id))

    @staticmethod
    def _identity(e: AdapterEntry, registration: bool = False) -> str:
        reg = f"{e.adapter_id}@{e.source}#{e.serial}"
        return reg if registration else (e.content_hash or reg)

    def _check_identity(self, e: AdapterEntry, identity: str | None, content_hash: str | None = None) -> None:
        """Raise unless `identity` still names `e` (its registration, or the content read: `content_hash`,
        else the entry's)."""
        if identity is None or identity == self._identity(e, registration=True):
            return
        if identity != (content_hash or e.content_hash):
            raise AdapterLoadError(f"adapter {e.adapter_id!r} was updated while a merge of it was being prepared; "
                                   "send the request again")

    def host_copy(self, adapter_id: str) -> LoRAAdapter | None:
        """The adapter's parsed weights if they are in host memory now, else None (no loading)."""
        with self.lock:
            return self.registry.get(adapter_id).host

    def snapshot(self) -> dict[str, Any]:
        """Per-adapter state for the server and metrics, plus counts per state and tier sizes."""
        with self.lock:
            adapters = {}
            counts = {s.value: 0 for s in AdapterState}
            for e in self.registry.live():
                st = e.public_state()
                counts[st] += 1
                adapters[e.adapter_id] = {"state": st, "pinned": e.pinned, "running": len(e.holders),
                                          "waiting": len(e.waiting), "load_seconds": e.load_seconds,
                                          "last_used": e.last_used or None}
            return {"adapters": adapters, "counts": counts, "resident": len(self.slots),
                    "host": len(self.host_cache), "loading": self.host_cache.num_loading,
                    "prefetch_queue": self.host_cache.num_wanted, "starving": self.slots.num_starving,
                    "stats": dict(self.stats)}

    @property
    def eviction_log(self) -> list[str]:
        """Device evictions in order (tests and metrics)."""
        return self.slots.eviction_log

    @property
    def cold_starts(self) -> Sequence[tuple[str, float, float]]:
        """(adapter id, load seconds, copy seconds) of each cold start that reached the device."""
        return self.slots.cold_starts

    def num_resident(self) -> int:
        with self.lock:
            return len(self.slots)

    def resident_ids(self) -> list[str]:
        with self.lock:
            return self.slots.resident_ids()

    def resolve(self, spec) -> tuple[AdapterUse, ...]:
        """Request adapter spec -> AdapterUse tuple (hash filled in on admission). Raises
        AdapterNotFound / InvalidRequest. A failed adapter is reset so this new request retries it;
        the load itself starts when the request is queued (enqueue)."""
        with self.lock:
            pairs = self.registry.resolve(spec)
            for e, _ in pairs:
                if e.state == AdapterState.FAILED and not e.loading:
                    e.state, e.error, e.exc = AdapterState.REGISTERED, None, None  # a new request retries
            return tuple(AdapterUse(e.adapter_id, e.content_hash, w) for e, w in pairs)

    def prefetch(self, adapter_ids: Iterable[str]) -> None:
        """Ask for these adapters in host memory ahead of any request (within the host budget)."""
        with self.lock:
            for aid in adapter_ids:
                self.host_cache.want(self.registry.get(aid))
            self.host_cache.pump()

    # ---- AdapterGate --------------------------------------------------------------------------
    def _entries_of(self, req: Request) -> list[AdapterEntry]:
        ents = self._req.get(req.request_id)
        if ents is None:  # not queued through enqueue (direct gate use): look the names up
            ents = [e for u in req.adapters if (e := self.registry.current(u.adapter_id)) is not None]
        return ents

    def enqueue(self, req: Request) -> None:
        """Queue the request on its adapters and prefetch them (in queue order)."""
        if not req.adapters:
            return
        with self.lock:
            ents = [e for u in req.adapters if (e := self.registry.current(u.adapter_id)) is not None]
            self._req[req.request_id] = ents
            for e in ents:
                e.waiting.add(req.request_id)
                self.host_cache.want(e)
            self.host_cache.pump()

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
            dora = [e.adapter_id for e in ents if e.packed is not None and e.packed.dora]
            if len(req.adapters) > 1 and dora:  # known once loaded: acquire() admits nothing before that
                return InvalidRequest(
                    f"DoRA adapter {dora[0]!r} can only be used alone (at any weight): its row scale "
                    f"m / ||W + s B A|| is not linear in the update, so a composition has no single scale")
            return self._vocab_failure(req, ents)
        return None

    def _vocab_failure(self, req: Request, ents: list[AdapterEntry]) -> BaseException | None:
        """Added tokens (openlora.lora.heads) belong to their adapter: it is used alone, and only its
        requests' prompts may hold its ids (lock held; known once the adapters are loaded)."""
        if any(e.packed is None for e in ents):
            return None
        vocab = self.shape.vocab_size
        grown = [e.adapter_id for e in ents if e.packed.vocab_size > vocab]
        if grown and len(ents) > 1:
            return InvalidRequest(f"adapter {grown[0]!r} adds tokens to the vocabulary: it can only be used alone")
        limit = max(vocab, ents[0].packed.vocab_size) if len(ents) == 1 else vocab
        if req.prompt_token_ids and max(req.prompt_token_ids) >= limit:
            return InvalidRequest(f"prompt token ids must be integers in [0, {limit}) for these adapters")
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
                    if self.slots.must_drain(e, now):
                        return False
                elif not self.slots.make_resident(e, now, ents):
                    return False
            req.adapters = tuple(AdapterUse(u.adapter_id, e.content_hash, u.weight)
                                 for u, e in zip(req.adapters, ents))
            for e in ents:
                e.holders.add(req.request_id)
                e.waiting.discard(req.request_id)
                e.last_used = now
                e.state = AdapterState.RESIDENT
                self.host_cache.touch(e)
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
                    self.slots.not_starving(e)
                    self.host_cache.unwant(e)
                if e.unregistered and not e.busy:
                    self._drop(e)
            if self.host_cache.num_wanted:
                self.host_cache.pump()

    def requeue(self, req: Request) -> None:
        """A running request was preempted (or admitted but found no KV blocks): it waits again."""
        with self.lock:
            for e in self._entries_of(req):
                e.holders.discard(req.request_id)
                e.waiting.add(req.request_id)

    def contended(self) -> bool:
        """More adapters have running or queued requests than there are slots: the scheduler then
        orders admissions for fairness across adapters instead of plain FCFS."""
        with self.lock:
            return sum(1 for e in self.registry.all() if e.busy) > self.max_loras

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
        return self.slots.build_batch(mixes, num_tokens)

    def shutdown(self) -> None:
        self.host_cache.shutdown()
