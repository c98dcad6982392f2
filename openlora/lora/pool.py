"""Device-resident adapter storage: rank rows as pages, no padding to a maximum rank.

For every projection site, `a[site]` is `[num_layers, pool_rows, in]` and `bt[site]` is
`[num_layers, pool_rows, out]` (B transposed, with the adapter's per-layer scaling folded in). An
adapter of rank r at a site owns r rows of that site's pool, wherever they are free. Sites are
allocated on first use, so adapters that only touch q and v cost nothing elsewhere.

`pack()` lays an adapter out exactly as the pool stores it; it runs on the loader threads, so the
engine step only pays for one `index_copy_` per site when an adapter becomes resident.

DoRA adapters also take one entry of the row-scale tables: per site `g[site]` [num_layers, E, out] and
(sites with a bias) `shift[site]` likewise, fp32; entry 0 is the identity (g = 1, shift = 0) and every
other entry belongs to one resident DoRA adapter (openlora.lora.dora).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from openlora.config import LORA_SITES, ModelShape
from openlora.lora.heads import EndWeights, plan_ends
from openlora.lora.input_fix import InputFix


@dataclass(frozen=True)
class PackedAdapter:
    """An adapter in pool layout: per site `(a [L, r, in], bt [L, r, out])` in the pool dtype."""

    sites: dict[str, tuple[torch.Tensor, torch.Tensor]]
    # DoRA: per site the magnitude [L, out] fp32 (NaN rows: layers the adapter leaves alone); empty for LoRA.
    magnitude: dict[str, torch.Tensor] = field(default_factory=dict)
    # DoRA: per site the row terms (||W||^2, cross, quad, bias or None) [L, out] fp64 that give g at any
    # request weight (openlora.lora.dora), computed once against the served base model (the engine thread,
    # at the first residency: openlora.lora.device_slots) and kept with the host copy.
    terms: dict[str, tuple] = field(default_factory=dict)
    # The model's ends as the adapter changes them (openlora.lora.heads), outside the pool's rows:
    # "embed_tokens" / "lm_head" -> LoRA, a whole matrix (modules_to_save), rows of added tokens.
    heads: dict[str, EndWeights] = field(default_factory=dict)

    @property
    def dora(self) -> bool:
        return bool(self.magnitude)

    @property
    def ranks(self) -> dict[str, int]:
        return {s: a.shape[1] for s, (a, _) in self.sites.items()}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (
            *(t for pair in self.sites.values() for t in pair), *(t for e in self.heads.values() for t in e.tensors())))

    @property
    def vocab_size(self) -> int:
        """Token rows of the adapter's ends (0: it leaves both alone)."""
        return max((e.vocab for e in self.heads.values()), default=0)


@torch.no_grad()
def pack(adapter, shape: ModelShape, dtype: torch.dtype, pin: bool = False,
         input_fix: InputFix | None = None) -> PackedAdapter:
    """Lay out an adapter (openlora.lora.adapter.LoRAAdapter) as the pool stores it. Layers where the
    adapter has a smaller rank (rank_pattern) or no module get zero rows, so their contribution is
    exactly zero. `pin` page-locks the tensors (CUDA: async host->device copies). `input_fix` scales A's
    columns where the served base folded activation scales into its norms (openlora.lora.input_fix)."""
    sites: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    magnitude: dict[str, torch.Tensor] = {}
    L = shape.num_layers
    for site in LORA_SITES:
        r = adapter.site_rank(site)
        if r <= 0:
            continue
        fin, fout = shape.site_dims(site)
        a = torch.zeros(L, r, fin, dtype=torch.float32)
        bt = torch.zeros(L, r, fout, dtype=torch.float32)
        for layer in range(L):
            m = adapter.modules.get((layer, site))
            if m is None:
                continue
            rr = m.a.shape[0]
            a[layer, :rr] = m.a.float()
            bt[layer, :rr] = (m.b.float() * m.scaling).t()  # scaling folded into B once
            if m.magnitude is not None:
                if site not in magnitude:
                    magnitude[site] = torch.full((L, fout), float("nan"))
                magnitude[site][layer] = m.magnitude.float()
        if input_fix is not None:
            a = input_fix.apply(site, a)
        a, bt = a.to(dtype), bt.to(dtype)
        if pin:
            a, bt = a.pin_memory(), bt.pin_memory()
        sites[site] = (a, bt)
    heads = plan_ends(adapter, shape.vocab_size, shape.tie_word_embeddings, dtype)
    return PackedAdapter(sites, magnitude, heads=heads)


class LoRAPool:
    """Row allocator plus the stacked A / B^T tensors the SGMV kernels read."""

    def __init__(self, shape: ModelShape, rows_per_site: int, dtype: torch.dtype, device: torch.device) -> None:
        self.shape = shape
        self.rows = rows_per_site
        self.dtype = dtype
        self.device = device
        self.a: dict[str, torch.Tensor] = {}
        self.bt: dict[str, torch.Tensor] = {}
        self.free: dict[str, list[int]] = {s: list(range(rows_per_site)) for s in LORA_SITES}
        # DoRA row scales (module docstring); the tables grow (doubling) when every entry is taken.
        self.g: dict[str, torch.Tensor] = {}
        self.shift: dict[str, torch.Tensor] = {}
        self._dora_cap = 1  # entries, the identity entry 0 included
        self._dora_free: list[int] = []
        self.base = None  # openlora.lora.dora.BaseProjections of the served model (set by the runner)
        self.input_fix: InputFix | None = None  # a base with folded activation scales (set by the runner)

    def _ensure_site(self, site: str) -> None:
        if site in self.a:
            return
        fin, fout = self.shape.site_dims(site)
        L = self.shape.num_layers
        self.a[site] = torch.zeros(L, self.rows, fin, dtype=self.dtype, device=self.device)
        self.bt[site] = torch.zeros(L, self.rows, fout, dtype=self.dtype, device=self.device)

    def fits(self, ranks: dict[str, int]) -> bool:
        """Whether an adapter with these per-site ranks fits in the free rows."""
        return all(len(self.free[s]) >= r for s, r in ranks.items())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.a.values(), *self.bt.values()))

    def pack(self, adapter) -> PackedAdapter:
        return pack(adapter, self.shape, self.dtype, pin=self.device.type == "cuda", input_fix=self.input_fix)

    @torch.no_grad()
    def load(self, adapter) -> dict[str, list[int]]:
        """Copy an adapter (PackedAdapter, or a LoRAAdapter packed here) in; returns its rows per site."""
        packed = adapter if isinstance(adapter, PackedAdapter) else self.pack(adapter)
        assert self.fits(packed.ranks), "caller checks fits() and evicts first"
        rows: dict[str, list[int]] = {}
        non_blocking = self.device.type == "cuda"
        for site, (a, bt) in packed.sites.items():
            self._ensure_site(site)
            r = a.shape[1]
            rows[site] = [self.free[site].pop() for _ in range(r)]
            idx = torch.tensor(rows[site], dtype=torch.long, device=self.device)
            self.a[site].index_copy_(1, idx, a.to(self.device, non_blocking=non_blocking))
            self.bt[site].index_copy_(1, idx, bt.to(self.device, non_blocking=non_blocking))
        return rows

    def unload(self, rows: dict[str, list[int]], scrub: bool = False) -> None:
        """Give an adapter's rows back; `scrub` zeroes them (else the next load overwrites them)."""
        for site, rs in rows.items():
            if scrub and rs:
                idx = torch.tensor(rs, dtype=torch.long, device=self.device)
                self.a[site].index_fill_(1, idx, 0)
                self.bt[site].index_fill_(1, idx, 0)
            self.free[site].extend(rs)

    # ---- DoRA row scales ---------------------------------------------------------------------------
    def _grow_dora(self) -> None:
        """Double the entries of every table (new entries are the identity)."""
        old, self._dora_cap = self._dora_cap, self._dora_cap * 2
        for tabs, fill in ((self.g, 1.0), (self.shift, 0.0)):
            for site, t in tabs.items():
                more = torch.full((t.shape[0], old, t.shape[2]), fill, dtype=t.dtype, device=self.device)
                tabs[site] = torch.cat([t, more], dim=1)
        self._dora_free.extend(range(old, self._dora_cap))

    def _table(self, tabs: dict[str, torch.Tensor], site: str, fill: float) -> torch.Tensor:
        if site not in tabs:
            _, fout = self.shape.site_dims(site)
            tabs[site] = torch.full((self.shape.num_layers, self._dora_cap, fout), fill, dtype=torch.float32,
                                    device=self.device)
        return tabs[site]

    @torch.no_grad()
    def load_dora(self, scales: dict[str, tuple[torch.Tensor, torch.Tensor | None]]) -> int:
        """Take a table entry for a DoRA adapter's (g, shift) per site; returns the entry (> 0)."""
        if not self._dora_free:
            self._grow_dora()
        e = self._dora_free.pop()
        for tabs, fill in ((self.g, 1.0), (self.shift, 0.0)):  # sites it leaves alone: the identity
            for t in tabs.values():
                t[:, e].fill_(fill)
        for site, (g, sh) in scales.items():
            self._table(self.g, site, 1.0)[:, e].copy_(g)
            if sh is not None:
                self._table(self.shift, site, 0.0)[:, e].copy_(sh)
        return e

    def unload_dora(self, e: int) -> None:
        """Give a DoRA entry back, reset to the identity (nothing of the adapter stays behind)."""
        for tabs, fill in ((self.g, 1.0), (self.shift, 0.0)):
            for t in tabs.values():
                t[:, e].fill_(fill)
        self._dora_free.append(e)
