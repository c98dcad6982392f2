"""Device-resident adapter storage: rank rows as pages, no padding to a maximum rank.

For every projection site, `a[site]` is `[num_layers, pool_rows, in]` and `bt[site]` is
`[num_layers, pool_rows, out]` (B transposed, with the adapter's per-layer scaling folded in). An
adapter of rank r at a site owns r rows of that site's pool, wherever they are free. Sites are
allocated on first use, so adapters that only touch q and v cost nothing elsewhere.

`pack()` lays an adapter out exactly as the pool stores it; it runs on the loader threads, so the
engine step only pays for one `index_copy_` per site when an adapter becomes resident.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from openlora.config import LORA_SITES, ModelShape


@dataclass(frozen=True)
class PackedAdapter:
    """An adapter in pool layout: per site `(a [L, r, in], bt [L, r, out])` in the pool dtype."""

    sites: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def ranks(self) -> dict[str, int]:
        return {s: a.shape[1] for s, (a, _) in self.sites.items()}

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.sites.values())


@torch.no_grad()
def pack(adapter, shape: ModelShape, dtype: torch.dtype, pin: bool = False) -> PackedAdapter:
    """Lay out an adapter (openlora.lora.adapter.LoRAAdapter) as the pool stores it. Layers where the
    adapter has a smaller rank (rank_pattern) or no module get zero rows, so their contribution is
    exactly zero. `pin` page-locks the tensors (CUDA: async host->device copies)."""
    sites: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
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
        a, bt = a.to(dtype), bt.to(dtype)
        if pin:
            a, bt = a.pin_memory(), bt.pin_memory()
        sites[site] = (a, bt)
    return PackedAdapter(sites)


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
        return pack(adapter, self.shape, self.dtype, pin=self.device.type == "cuda")

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
