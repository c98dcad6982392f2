"""The device tier: adapter slots in the LoRA pool, eviction, time-slice fairness, per-step metadata.

Rules (the design's traps):
- Eviction: least recently used among resident adapters with no running and no queued requests; pinned
  adapters never. An adapter with queued requests is only evicted when its time slice ran out while
  another adapter is starving for a slot.
- Fairness (LoRAX-style time slices): when an adapter is ready in host memory but finds no free slot
  ("starving"), the resident adapters that have been resident longer than `time_slice_s`, oldest first
  and one per starving adapter, stop admitting new requests, drain, and give up their slot even though
  they have queued requests. FCFS holds within each adapter.

Every method runs with the adapter manager's lock held (build_batch: on the engine thread, which is the
only one that changes residency).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence

import torch

from openlora.config import LORA_SITES
from openlora.errors import AdapterLoadError, UnsupportedAdapter
from openlora.lora import dora
from openlora.lora.adapter import LoRAAdapter
from openlora.lora.batch import LoRABatch, SiteRows
from openlora.lora.entry import AdapterEntry, AdapterState
from openlora.lora.heads import EndUse, EndWeights
from openlora.lora.host_cache import HostCache
from openlora.lora.pool import LoRAPool, PackedAdapter


class DeviceSlots:
    """At most `max_loras` adapters resident in `pool`, copied from the host cache on admission."""

    def __init__(self, pool: LoRAPool, max_loras: int, max_lora_rank: int, time_slice_s: float,
                 host: HostCache, stats: dict[str, int], scrub: bool = False) -> None:
        self.pool = pool
        self.scrub = scrub  # zero an adapter's rows when it leaves the device
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.time_slice_s = time_slice_s
        self.host = host
        self.stats = stats
        self.eviction_log: list[str] = []  # device evictions in order (tests and metrics)
        # (adapter id, load seconds, copy seconds) of each cold start that reached the device
        self.cold_starts: deque[tuple[str, float, float]] = deque(maxlen=100_000)
        self._resident: dict[AdapterEntry, None] = {}  # ordered set; may hold retired entries
        self._starving: dict[AdapterEntry, float] = {}  # host-ready, queued, no slot -> since when
        # resident DoRA adapter -> (its row-scale table entry, the sites it targets)
        self._dora: dict[AdapterEntry, tuple[int, frozenset[str]]] = {}
        # resident adapter with LoRA on embed_tokens / lm_head -> those tensors on the device
        self._heads: dict[AdapterEntry, dict[str, EndWeights]] = {}
        self._step_dora: list[int] = []  # DoRA entries made for the last step's weights (_dora_segments)

    def __len__(self) -> int:
        return len(self._resident)

    @property
    def num_starving(self) -> int:
        return len(self._starving)

    def resident_ids(self) -> list[str]:
        return [e.adapter_id for e in self._resident]

    def pack(self, adapter: LoRAAdapter) -> PackedAdapter:
        """Check the adapter fits this pool (rank limit, pool rows) and lay it out as the pool stores it
        (loader threads: touches no slot state)."""
        if adapter.max_rank > self.max_lora_rank:
            raise AdapterLoadError(f"adapter {adapter.adapter_id!r} has rank {adapter.max_rank}, above this "
                                   f"server's --max-lora-rank {self.max_lora_rank}")
        too_big = [s for s in LORA_SITES if adapter.site_rank(s) > self.pool.rows]
        if too_big:
            raise AdapterLoadError(
                f"adapter {adapter.adapter_id!r} has rank above the pool's {self.pool.rows} rows at {too_big}")
        for site, saved in adapter.head_bases.items():
            # PEFT's copy of the base end: the served rows, plus those of any added tokens
            served = None if self.pool.base is None else self.pool.base.end_weight(site)
            if (served is None or saved.shape[0] < served.shape[0] or saved.shape[1:] != served.shape[1:]
                    or not torch.equal(saved[:served.shape[0]].to(served.dtype), served)):
                raise UnsupportedAdapter(
                    f"adapter {adapter.adapter_id!r} carries base {site} weights that are not the served model's: "
                    f"it was trained on another base model (a LoRA on {site} applies to the base rows it was "
                    f"trained with)")
        if adapter.dora and self.pool.base is None:
            raise AdapterLoadError(f"adapter {adapter.adapter_id!r} is DoRA, which needs the served model's "
                                   f"weights: this engine has none to give")
        if self.pool.input_fix is not None:  # a base with folded activation scales (AWQ, SmoothQuant)
            self.pool.input_fix.check(adapter)
        return self.pool.pack(adapter)

    def _free_extras(self, e: AdapterEntry) -> None:
        self._heads.pop(e, None)
        d = self._dora.pop(e, None)
        if d is not None:
            self.pool.unload_dora(d[0])

    @torch.no_grad()
    def _dora_terms(self, packed: PackedAdapter) -> dict[str, tuple]:
        """DoRA's row terms per site, (||W||^2, cross, quad, bias or None) [L, out] fp64 each
        (openlora.lora.dora), computed at the first residency of this host copy (the engine thread: the
        served model's GEMMs stay on its OpenMP team) and kept."""
        if not packed.terms:
            base, dev = self.pool.base, self.pool.device
            for site, mag in packed.magnitude.items():
                a, bt = packed.sites[site]
                rs, cr, qd = (torch.zeros(mag.shape, dtype=torch.float64) for _ in range(3))
                bias = None
                for layer in range(mag.shape[0]):
                    if torch.isnan(mag[layer, 0]):
                        continue  # no module at this layer: identity
                    t = dora.row_terms(base, layer, site, a[layer].to(dev), bt[layer].to(dev))
                    rs[layer], cr[layer], qd[layer] = (x.cpu() for x in t)
                    b = base.bias(layer, site)
                    if b is not None:
                        bias = torch.zeros(mag.shape, dtype=torch.float64) if bias is None else bias
                        bias[layer] = b.double().cpu()
                packed.terms[site] = (rs, cr, qd, bias)
        return packed.terms

    def _dora_scales(self, packed: PackedAdapter, weight: float = 1.0) -> dict[str, tuple]:
        """(g, shift or None) [L, out] fp32 per site at a request weight (layers without a module: identity)."""
        out = {}
        for site, (rs, cr, qd, bias) in self._dora_terms(packed).items():
            mag = packed.magnitude[site]
            g, shift = dora.scale_from_terms(rs, cr, qd, mag, bias, weight)
            absent = torch.isnan(mag[:, 0])
            g[absent] = 1.0
            if shift is not None:
                shift[absent] = 0.0
            out[site] = (g, shift)
        return out

    def drop(self, e: AdapterEntry) -> None:
        """Free `e`'s rows and forget it here."""
        if e.rows is not None:
            self.pool.unload(e.rows, self.scrub)
            e.rows = None
        self._free_extras(e)
        self._resident.pop(e, None)
        self._starving.pop(e, None)

    def not_starving(self, e: AdapterEntry) -> None:
        self._starving.pop(e, None)

    # ---- residency --------------------------------------------------------------------------
    def draining(self, now: float) -> list[AdapterEntry]:
        """Resident adapters whose slice ran out, oldest residency first, one per starving adapter. They
        admit no new requests and may be evicted once idle."""
        if not self._starving:
            return []
        over = [x for x in self._resident if not x.pinned and now - x.resident_since >= self.time_slice_s]
        over.sort(key=lambda x: x.resident_since)
        return over[:len(self._starving)]

    def must_drain(self, e: AdapterEntry, now: float) -> bool:
        return bool(self._starving) and e in self.draining(now)

    def make_resident(self, e: AdapterEntry, now: float, keep: Sequence[AdapterEntry]) -> bool:
        """Copy e's packed host weights into the pool, evicting idle adapters if needed. False when it
        is not in host memory yet (then prefetched) or no slot can be freed (then starving)."""
        if e.packed is None:
            self.host.want(e)
            self.host.pump()
            return False
        ranks = e.packed.ranks
        while len(self._resident) >= self.max_loras or not self.pool.fits(ranks):
            if not self._evict_one(now, keep):
                self._starving.setdefault(e, now)
                return False
        t0 = time.perf_counter()
        if e.packed.dora:
            self._dora[e] = (self.pool.load_dora(self._dora_scales(e.packed)), frozenset(e.packed.magnitude))
        e.rows = self.pool.load(e.packed)
        if e.packed.heads:
            dev = self.pool.device
            self._heads[e] = {s: end.to(dev) for s, end in e.packed.heads.items()}
        e.copy_seconds = time.perf_counter() - t0
        self.stats["copies"] += 1
        if e.fresh:  # first residency since this host copy was loaded: a cold start
            e.fresh = False
            self.cold_starts.append((e.adapter_id, e.load_seconds or 0.0, e.copy_seconds))
        self._resident[e] = None
        self._starving.pop(e, None)
        e.state = AdapterState.RESIDENT
        e.resident_since = now
        e.last_used = now
        self.host.touch(e)
        return True

    def _evict_one(self, now: float, keep: Sequence[AdapterEntry]) -> bool:
        """Evict the least recently used resident adapter with no running and no queued requests;
        failing that, an idle one whose time slice ran out while others starve."""
        cands = [x for x in self._resident if not x.holders and not x.pinned and x not in keep]
        idle = [x for x in cands if not x.waiting]
        if idle:
            victim = min(idle, key=lambda x: x.last_used)
        else:
            drain = self.draining(now) if self._starving else []
            late = [x for x in cands if x in drain]
            if not late:
                return False  # evicting one with a queue would only cause a cold-start cliff
            victim = min(late, key=lambda x: x.resident_since)
        self.pool.unload(victim.rows, self.scrub)
        victim.rows = None
        self._free_extras(victim)
        del self._resident[victim]
        victim.state = AdapterState.HOST if victim.packed is not None else victim.rest_state()
        if victim.waiting:
            self.host.want(victim)  # its queue still needs it: keep (or get) it in host memory
        self.stats["evictions"] += 1
        self.eviction_log.append(victim.adapter_id)
        return True

    # ---- per-step metadata ------------------------------------------------------------------
    def build_batch(self, mixes: dict[tuple[tuple[AdapterEntry, float], ...], list[tuple[int, int]]],
                    num_tokens: int) -> LoRABatch:
        """One segment per adapter mix ((entry, weight) pairs -> its (first row, rows) ranges): the token
        rows, and per site the pool rows and scales each segment gathers."""
        dev = self.pool.device
        tok: list[int] = []
        seg = [0]
        for ranges in mixes.values():
            for q0, n in ranges:
                tok.extend(range(q0, q0 + n))
            seg.append(len(tok))
        used = {site for key in mixes for e, _ in key for site in (e.rows or {})}
        dora_seg = self._dora_segments(mixes) if self._dora else []
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
            if self._dora:
                self._dora_rows(sites[site], site, dora_seg)
        heads: dict[str, list] = {}
        if self._heads:
            for g, key in enumerate(mixes):
                for e, w in key:
                    for site, end in self._heads.get(e, {}).items():
                        t = torch.tensor(tok[seg[g]:seg[g + 1]], dtype=torch.long, device=dev)
                        heads.setdefault(site, []).append(EndUse(t, end, w))
        return LoRABatch(
            token_idx=torch.tensor(tok, dtype=torch.long, device=dev),
            seg_indptr=torch.tensor(seg, dtype=torch.long, device=dev),
            seg_indptr_list=seg, sites=sites, num_tokens=num_tokens, heads=heads,
        )

    def _dora_segments(self, mixes) -> list[tuple[int, frozenset[str]]]:
        """Each segment's DoRA table entry and the sites it targets ((0, {}) for none): a mix of one
        DoRA adapter (the manager refuses DoRA in any other mix). At weight 1 the adapter's own entry;
        at another weight an entry made for this step (g follows the weight), given back next step."""
        for d in self._step_dora:
            self.pool.unload_dora(d)
        self._step_dora = []
        made: dict[tuple[AdapterEntry, float], int] = {}
        out = []
        for key in mixes:
            e, w = key[0]
            if len(key) != 1 or e not in self._dora:
                out.append((0, frozenset()))
                continue
            d, targets = self._dora[e]
            if w != 1.0:
                if (e, w) not in made:
                    made[(e, w)] = self.pool.load_dora(self._dora_scales(e.packed, w))
                    self._step_dora.append(made[(e, w)])
                d = made[(e, w)]
            out.append((d, targets))
        return out

    def _dora_rows(self, rows: SiteRows, site: str, dora_seg: list[tuple[int, frozenset[str]]]) -> None:
        """Each segment's row-scale entry at `site` (see _dora_segments)."""
        seg = [d if site in targets else 0 for d, targets in dora_seg]
        if any(seg):
            rows.seg_dora = torch.tensor(seg, dtype=torch.long, device=self.pool.device)
            rows.seg_dora_list = seg
            rows.g_table = self.pool.g[site]
            rows.shift_table = self.pool.shift.get(site)
