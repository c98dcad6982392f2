"""The host tier: adapters fetched, parsed and packed on loader threads, kept in host memory (LRU).

Rules (the design's traps): every adapter a queued request needs is prefetched in the order the requests
queued, while the cache has room (`capacity`, loads in flight included). An adapter with queued requests
is never dropped, so a prefetched copy is never thrown away before it is used (no thrashing); idle
copies go first, least recently used first.

Every method runs with the adapter manager's lock held, except `load`, which takes it itself around
each change of the entry (it runs on a loader thread, or the caller's for a synchronous register).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from openlora.config import ModelShape
from openlora.errors import AdapterLoadError, OpenLoRAError
from openlora.lora.adapter import DEFAULT_MAX_ADAPTER_BYTES, LoRAAdapter, load_peft_adapter
from openlora.lora.entry import AdapterEntry, AdapterState
from openlora.lora.pool import PackedAdapter
from openlora.lora.sources import fetch, parse_source

log = logging.getLogger("openlora.lora")


class HostCache:
    """Packed adapters in host memory, the prefetch queue and the loader threads."""

    def __init__(self, lock: threading.RLock, capacity: int, shape: ModelShape, cache_root: Path,
                 pack: Callable[[LoRAAdapter], PackedAdapter], stats: dict[str, int], loader_threads: int = 2,
                 max_bytes: int = DEFAULT_MAX_ADAPTER_BYTES) -> None:
        self.lock = lock  # the manager's
        self.capacity = max(1, capacity)  # 0 would never load anything
        self.shape = shape
        self.cache_root = cache_root  # the disk cache of remote adapters (openlora.lora.sources)
        self.pack = pack  # checks the adapter fits the device pool and lays it out (DeviceSlots.pack)
        self.stats = stats
        self.max_bytes = max_bytes  # largest weights file / download accepted (hostile sources)
        self.executor = ThreadPoolExecutor(max_workers=loader_threads, thread_name_prefix="adapter-load")
        self._lru: OrderedDict[AdapterEntry, None] = OrderedDict()  # packed in host memory, LRU first
        self._want: OrderedDict[AdapterEntry, None] = OrderedDict()  # to prefetch, in queue order
        self.num_loading = 0
        # Called (without the lock) when a load ends, loaded or failed: an idle engine loop waits for it
        # instead of spinning, which on two cores would take the CPU and the GIL from the loader itself.
        self.on_done: Callable[[], None] | None = None

    def __len__(self) -> int:
        return len(self._lru)

    @property
    def num_wanted(self) -> int:
        return len(self._want)

    # ---- prefetch ---------------------------------------------------------------------------
    def want(self, e: AdapterEntry) -> None:
        """Queue `e` for prefetch unless it is loaded, loading, failed or resident."""
        if e.packed is None and not e.loading and e.state != AdapterState.FAILED and not e.resident:
            self._want.setdefault(e, None)

    def unwant(self, e: AdapterEntry) -> None:
        self._want.pop(e, None)

    def pump(self) -> None:
        """Start background loads for wanted adapters, in order, while the cache has room."""
        while self._want:
            if len(self._lru) + self.num_loading >= self.capacity and not self._drop_one():
                return
            e, _ = self._want.popitem(last=False)
            if e.packed is not None or e.loading or e.state == AdapterState.FAILED:
                continue
            self.start_loading(e)
            self.executor.submit(self.load, e)

    def start_loading(self, e: AdapterEntry) -> None:
        """Mark `e` loading and count it against the capacity (load() undoes both)."""
        e.loading, e.state = True, AdapterState.LOADING
        self.num_loading += 1

    def touch(self, e: AdapterEntry) -> None:
        """`e` was just used: most recently used."""
        if e in self._lru:
            self._lru.move_to_end(e)

    def drop(self, e: AdapterEntry) -> None:
        """Forget `e`'s host copy and any prefetch of it."""
        self._lru.pop(e, None)
        self._want.pop(e, None)
        e.host = e.packed = None
        e.fresh = False

    def _drop_one(self) -> bool:
        """Drop the least recently used host copy nobody is queued for."""
        for x in self._lru:
            if not x.waiting and not x.pinned:
                self.drop(x)
                if not x.resident:
                    x.state = x.rest_state()
                self.stats["host_evictions"] += 1
                return True
        return False

    # ---- loading (loader threads) -------------------------------------------------------------
    def read(self, e: AdapterEntry) -> LoRAAdapter:
        """Fetch (into the disk cache) and parse one adapter, without packing it. Takes the lock only to
        publish the entry's state."""
        if e.builder is not None:
            return e.builder()
        src = parse_source(e.source)
        if src.kind != "local":
            with self.lock:
                e.state = AdapterState.DOWNLOADING
        path = fetch(src, self.cache_root, expected_files_hash=e.expected_hash, max_bytes=self.max_bytes)
        with self.lock:
            if e.loading:
                e.state = AdapterState.LOADING
        # Shapes are the real compatibility check; the served model is a local path here while adapters
        # name hub ids, so a name comparison would warn for nearly every adapter.
        return load_peft_adapter(path, e.adapter_id, self.shape, max_bytes=self.max_bytes)

    def load(self, e: AdapterEntry) -> None:
        """Load one adapter into host memory; the caller called start_loading(e)."""
        try:
            self._load(e)
        finally:
            if self.on_done is not None:
                self.on_done()

    def _load(self, e: AdapterEntry) -> None:
        t0 = time.perf_counter()
        try:
            adapter = self.read(e)
            packed = self.pack(adapter)
        except Exception as ex:  # any failure marks this adapter failed, nobody else notices
            msg = str(ex) if isinstance(ex, OpenLoRAError) else f"{type(ex).__name__}: {ex}"
            log.warning("adapter %s failed to load: %s", e.adapter_id, msg)
            with self.lock:
                e.state, e.error, e.loading = AdapterState.FAILED, msg, False
                e.exc = ex if isinstance(ex, OpenLoRAError) else AdapterLoadError(msg)
                self.num_loading -= 1
                self.stats["load_failures"] += 1
                self.pump()
            return
        with self.lock:
            self.num_loading -= 1
            e.loading = False
            if e.unregistered and not e.busy:
                self.pump()  # dropped while loading: discard
                return
            e.host, e.packed, e.content_hash, e.fresh = adapter, packed, adapter.content_hash, True
            e.error = e.exc = None
            e.state = AdapterState.RESIDENT if e.resident else AdapterState.HOST
            e.load_seconds = time.perf_counter() - t0
            self.stats["loads"] += 1
            self._lru[e] = None
            # Over capacity only when a synchronous register bypassed pump(): trim idle copies.
            while len(self._lru) > self.capacity and self._drop_one():
                pass
            self.pump()

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
