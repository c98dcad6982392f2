"""CPU SGMV backends: the C++ extension (fast path) and a pure-torch fallback.

NOTE: decode on a 2-core CPU with many distinct adapters is bound by reading the adapters' rows
(32 distinct r=16 adapters x 7 sites x 30 layers of a 135M model is ~156M weights per step). The C++
kernel therefore streams each segment's A and Bt rows exactly once per call, converts bf16 -> fp32 in
registers and keeps the [tokens, r] intermediate in fp32; long segments (prefill chunks) use at::mm.
"""

from __future__ import annotations

import logging
from types import ModuleType

import torch

from openlora.kernels.backend import LoRABackend
from openlora.kernels.build import build_extension
from openlora.lora.batch import LoRABatch, SiteRows

logger = logging.getLogger("openlora.kernels")


# Segments with at least this many tokens are two fp32 GEMMs (gather + at::mm) in the C++ path; shorter
# ones go through the streaming kernel. Measured with bench/sgmv_micro.py (1 thread, gate_proj shape):
# the streaming kernel was faster at every length tried, 8..256 tokens (fp32 256: 308 vs 476 us; bf16
# 256: 332 vs 1123 us, the GEMM path pays gathers and bf16->fp32 copies), so GEMMs only for long chunks.
DEFAULT_MM_MIN_TOKENS = 512



def load_extension() -> ModuleType:
    """The compiled C++ SGMV module (see openlora.kernels.build). -ffp-contract=off as in
    csrc/decoder_cpu.cpp, which compiles the same source: both builds then round alike."""
    return build_extension("sgmv", "sgmv_cpu.cpp", "SGMV", ("-ffp-contract=off",))


class CppBackend(LoRABackend):
    """SGMV through the C++ extension: one native call per (site, layer), no per-call Python work."""

    name = "cpp"

    def __init__(self, mm_min_tokens: int = DEFAULT_MM_MIN_TOKENS) -> None:
        super().__init__()
        ext = load_extension()
        self._op = ext.sgmv
        self._op_dora = ext.sgmv_dora
        self.has_avx512 = bool(ext.has_avx512())
        self.mm_min_tokens = mm_min_tokens

    def sgmv(
        self, y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, batch: LoRABatch, site: str,
        layer: int = 0,
    ) -> None:
        rows = batch.sites.get(site)
        if rows is None or batch.empty:
            return
        if rows.seg_dora is None:
            self._op(y, x, a, bt, batch.token_idx, batch.seg_indptr, rows.row_idx, rows.row_indptr,
                     rows.row_scale, self.mm_min_tokens)
        else:  # the same kernel, DoRA's row scale applied in the expand epilogue
            self._op_dora(y, x, a, bt, batch.token_idx, batch.seg_indptr, rows.row_idx, rows.row_indptr,
                          rows.row_scale, self.mm_min_tokens, rows.seg_dora, rows.g_table[layer],
                          None if rows.shift_table is None else rows.shift_table[layer])


class _Group:
    """Segments with the same token count n, batched as one bmm (rows padded to the group's max rank)."""

    __slots__ = ("tok", "rows", "scale", "shape", "dora")

    def __init__(self, tok: torch.Tensor, rows: torch.Tensor, scale: torch.Tensor, shape: tuple[int, int, int],
                 dora: torch.Tensor | None = None):
        self.tok = tok  # int64 [G*n]: the group's tokens, segment-major
        self.rows = rows  # int64 [G, Rmax]: pool rows, padding points at the segment's first row
        self.scale = scale  # fp32 [G, 1, Rmax]: 0 for padding
        self.shape = shape  # (G, n, Rmax)
        self.dora = dora  # int64 [G*n]: each token's row-scale entry (0: identity); None: no DoRA here


def _torch_plan(batch: LoRABatch, rows: SiteRows) -> list[_Group]:
    """Group the segments by token count (decode: one group of 1-token segments)."""
    seg = batch.seg_indptr_list
    rptr = rows.row_indptr_list or [int(v) for v in rows.row_indptr.tolist()]
    by_n: dict[int, list[int]] = {}
    for g in range(len(seg) - 1):
        n, r = seg[g + 1] - seg[g], rptr[g + 1] - rptr[g]
        if n > 0 and r > 0:
            by_n.setdefault(n, []).append(g)
    device = batch.token_idx.device
    groups = []
    for n, gs in by_n.items():
        rmax = max(rptr[g + 1] - rptr[g] for g in gs)
        tok = torch.cat([batch.token_idx[seg[g] : seg[g + 1]] for g in gs])
        row_tab = torch.empty(len(gs), rmax, dtype=torch.long, device=device)
        scale = torch.zeros(len(gs), 1, rmax, dtype=torch.float32, device=device)
        for i, g in enumerate(gs):
            r = rptr[g + 1] - rptr[g]
            row_tab[i, :r] = rows.row_idx[rptr[g] : rptr[g + 1]]
            row_tab[i, r:] = row_tab[i, 0]
            scale[i, 0, :r] = rows.row_scale[rptr[g] : rptr[g + 1]]
        dora = None
        if rows.seg_dora is not None and any(rows.seg_dora_list[g] for g in gs):
            dora = torch.tensor([rows.seg_dora_list[g] for g in gs], dtype=torch.long, device=device)
            dora = dora.repeat_interleave(n)
        groups.append(_Group(tok, row_tab, scale, (len(gs), n, rmax), dora))
    return groups


def _dora_epilogue(y: torch.Tensor, tok: torch.Tensor, out: torch.Tensor, dora: torch.Tensor, rows: SiteRows,
                   layer: int) -> None:
    """y[tok] = G[d] * (y[tok] + out) + S[d] per token (entry d; 0 is the identity), one rounding."""
    acc = (y.index_select(0, tok).float() + out).mul_(rows.g_table[layer].index_select(0, dora))
    if rows.shift_table is not None:
        acc.add_(rows.shift_table[layer].index_select(0, dora))
    y.index_copy_(0, tok, acc.to(y.dtype))


class TorchBackend(LoRABackend):
    """Pure-torch SGMV (no compiler needed): segments of equal length are batched into bmm's.

    Slower than the C++ path because every call (1) materializes gathered, fp32-converted copies of the
    segments' A and Bt rows ([G, Rmax, in] and [G, Rmax, out]: each weight is read, written and read
    again), (2) pads every segment to the group's largest rank, and (3) issues ~10 separate ATen ops,
    each with dispatch overhead that is large next to a 1-token segment's work. The padded row tables
    are built once per step and site (cached), not per layer.
    """

    name = "torch"

    def sgmv(
        self, y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, batch: LoRABatch, site: str,
        layer: int = 0,
    ) -> None:
        if site not in batch.sites or batch.empty:
            return
        for grp in self._plan(batch, site, "torch", _torch_plan):
            g, n, rmax = grp.shape
            xs = x.index_select(0, grp.tok).view(g, n, -1).float()  # [G, n, in]
            a_g = a[grp.rows].float()  # [G, Rmax, in]
            v = torch.bmm(xs, a_g.transpose(1, 2)).mul_(grp.scale)  # [G, n, Rmax] fp32
            out = torch.bmm(v, bt[grp.rows].float()).view(g * n, -1)  # [G*n, out] fp32
            if grp.dora is not None:
                _dora_epilogue(y, grp.tok, out, grp.dora, batch.sites[site], layer)
            elif y.dtype == torch.float32:
                y.index_add_(0, grp.tok, out)
            else:  # accumulate in fp32, round once
                y.index_copy_(0, grp.tok, (y.index_select(0, grp.tok).float() + out).to(y.dtype))
