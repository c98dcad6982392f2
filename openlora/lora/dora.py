"""DoRA's per-row scale, computed from the weights actually served.

PEFT's DoRA layer computes y = g * (W x + s B A x) + bias with g = m / ||W + s B A||, the norm taken per
output row over the input dimension, and m the adapter's magnitude vector. OpenLoRA keeps W x and the
LoRA delta as they are (base GEMM, then SGMV) and applies g in the SGMV expand epilogue, per token of a
DoRA segment: y = g * (y + delta) + shift, where shift = (1 - g) * bias undoes the scale on the bias
the base GEMM already added (zero for bias-free projections).

g is computed once per adapter, layer and site when the adapter becomes resident, in fp32, without
building the dense [out, in] update:
    ||W_o + s (BA)_o||^2 = ||W_o||^2 + 2 s <W_o, (BA)_o> + s^2 ||(BA)_o||^2
    <W_o, (BA)_o>       = sum_j B[o, j] (A W^T)[j, o]      (A W^T: the served projection of A's rows)
    ||(BA)_o||^2        = B_o (A A^T) B_o^T
The pool stores Bt = s B^T, so with M = A W^T ([r, out]) and G = A A^T ([r, r]):
    norm^2 = row_sq + 2 * sum_j Bt[j] * M[j] + sum_j Bt[j] * (G Bt)[j].
"""

from __future__ import annotations

from typing import Protocol

import torch


class BaseProjections(Protocol):
    """The served base model's projections, as DoRA needs them (openlora.model.llama implements it)."""

    def project(self, layer: int, site: str, x: torch.Tensor) -> torch.Tensor:
        """x [n, in] (model dtype) -> x @ W^T [n, out] fp32, through the served weights, without bias."""

    def row_sq(self, layer: int, site: str) -> torch.Tensor:
        """||W_o||^2 per output row, fp32 [out]."""

    def bias(self, layer: int, site: str) -> torch.Tensor | None:
        """The projection's bias, fp32 [out], or None."""

    def end_weight(self, site: str) -> torch.Tensor | None:
        """The served embedding or output head matrix [vocab, hidden] ("embed_tokens" / "lm_head")."""


@torch.no_grad()
def row_terms(base: BaseProjections, layer: int, site: str, a: torch.Tensor,
              bt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(||W_o||^2, s <W_o, (BA)_o>, s^2 ||(BA)_o||^2) per output row, fp64 [out] each, for one module: a
    [r, in] and bt [r, out] as the pool stores them (bt = s B^T, model dtype). A request weight w scales
    s: norm^2 = row_sq + 2 w cross + w^2 quad."""
    m_proj = base.project(layer, site, a).double()  # [r, out]: A W^T
    a64, bt64 = a.double(), bt.double()
    gram = a64 @ a64.t()  # [r, r]
    cross = (bt64 * m_proj).sum(0)  # [out]
    quad = (bt64 * (gram @ bt64)).sum(0)  # [out]
    return base.row_sq(layer, site).double(), cross, quad


def scale_from_terms(row_sq: torch.Tensor, cross: torch.Tensor, quad: torch.Tensor, magnitude: torch.Tensor,
                     bias: torch.Tensor | None, weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(g, shift or None), fp32, shaped like the terms: g = m / ||W + w s B A||, shift = (1 - g) bias.
    PEFT's DoRA at a request weight w (its scale) is the adapter with s B scaled by w: g follows w."""
    norm = (row_sq + (2.0 * weight) * cross + (weight * weight) * quad).clamp_min(0.0).sqrt()
    g = magnitude.double() / norm
    return g.float(), (None if bias is None else ((1.0 - g) * bias.double()).float())


@torch.no_grad()
def row_scale(base: BaseProjections, layer: int, site: str, a: torch.Tensor, bt: torch.Tensor,
              magnitude: torch.Tensor, weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(g [out], shift [out] or None) for one module at request weight `weight` (magnitude [out] fp32)."""
    return scale_from_terms(*row_terms(base, layer, site, a, bt), magnitude, base.bias(layer, site), weight)
