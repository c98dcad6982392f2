"""Per-step LoRA metadata, built once per step by the model runner and passed explicitly to every
LoRA layer (never through module globals).

Layout of the device pool (see lora/pool.py): for each projection `site` in LORA_SITES and each layer,
`A[site][layer]` is `[pool_rows, in_features]` and `Bt[site][layer]` is `[pool_rows, out_features]`
(B stored transposed: row j of Bt is column j of PEFT's lora_B). An adapter of rank r owns r rows
per site (any rows: rank rows are pages, no padding to a maximum rank).

Tokens of the flattened batch that need LoRA are grouped logically into segments: all tokens of a
segment use the same adapter mix (one adapter, or a weighted composition of several). Tokens of
base-only requests are listed in no segment, so they get exactly zero LoRA contribution.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from openlora.lora.heads import EndUse


@dataclass
class SiteRows:
    """The pool rows each segment uses at one projection site."""

    row_idx: torch.Tensor  # int64 [R]: pool rows, segment g's rows at row_indptr[g]:row_indptr[g+1]
    row_indptr: torch.Tensor  # int64 [G+1] (on CPU as well as on the device: see `row_indptr_list`)
    row_scale: torch.Tensor  # fp32 [R]: weight_i * scaling_i of the adapter that owns the row
    row_indptr_list: list[int] = field(default_factory=list)  # host copy, for host-side loops
    # DoRA (openlora.lora.dora): segment g's entry in the row-scale tables (0: none), or None when no
    # segment here is DoRA; g_table / shift_table are the pool's [num_layers, E, out] fp32 tables.
    seg_dora: torch.Tensor | None = None  # int64 [G]
    seg_dora_list: list[int] = field(default_factory=list)
    g_table: torch.Tensor | None = None
    shift_table: torch.Tensor | None = None  # None: no DoRA site here has a bias

    @property
    def num_rows(self) -> int:
        return int(self.row_idx.numel())


@dataclass
class LoRABatch:
    """Which tokens get which adapter rows in this step.

    Semantics (for every site, layer): for each segment g, for each token t in
    token_idx[seg_indptr[g]:seg_indptr[g+1]], with rows R = row_idx[row_indptr[g]:row_indptr[g+1]]
    and scales S likewise:
        v[j]   = S[j] * sum_k x[t, k] * A[R[j], k]        (fp32)
        y[t,:] += sum_j v[j] * Bt[R[j], :]
    and for a DoRA segment (d = seg_dora[g] > 0) at layer l, in the same single rounding:
        y[t,:]  = g_table[l, d] * (y[t,:] + sum_j v[j] * Bt[R[j], :]) + shift_table[l, d]
    """

    token_idx: torch.Tensor  # int64 [N]: flattened-batch token indices that get LoRA, grouped by segment
    seg_indptr: torch.Tensor  # int64 [G+1]
    seg_indptr_list: list[int]  # host copy of seg_indptr
    sites: dict[str, SiteRows]  # site name -> rows; a site no segment targets is absent
    num_tokens: int  # tokens in the whole flattened batch (LoRA and base-only)
    # The model's ends as adapters change them (openlora.lora.heads): "embed_tokens" / "lm_head" -> one
    # use per (segment, adapter) that changes that end.
    heads: dict[str, list[EndUse]] = field(default_factory=dict)

    @property
    def num_segments(self) -> int:
        return len(self.seg_indptr_list) - 1

    @property
    def empty(self) -> bool:
        """No projection site to apply (the ends, `heads`, are applied outside the layers)."""
        return self.num_segments == 0 or not self.sites

    @property
    def max_vocab(self) -> int:
        """The widest vocabulary of an adapter in the step (0: none touches the ends)."""
        return max((u.end.vocab for uses in self.heads.values() for u in uses), default=0)

    @property
    def has_dora(self) -> bool:
        return any(r.seg_dora is not None for r in self.sites.values())
