"""Quantize-at-load: round-to-nearest from a float checkpoint into QuantWeight (no calibration data).

Both schemes are symmetric (zero point 0, no min), so W = scale * q:
    int8 per output channel: scale[n] = max|W[n, :]| / 127, q = round(W / scale) in [-127, 127]
    int8 in groups of g:     scale[n, j] = max|W[n, jg:(j+1)g]| / 127 (same codes range)
    int4 in groups of g:     scale[n, j] = max|W[n, jg:(j+1)g]| / 7, q = round(W / scale) in [-8, 7]
`round` is round-half-to-even (torch.round). An all-zero row or group gets scale 0 and codes 0.
The division runs in fp32 (the weight is widened first), so results do not depend on the stored dtype
beyond its values.
"""

from __future__ import annotations

import torch

from openlora.quant.types import QuantWeight


def _check(w: torch.Tensor) -> torch.Tensor:
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"expected a float [N, K] weight, got {w.dtype} {tuple(w.shape)}")
    w = w.detach().float()
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weight holds NaN or infinite values; refusing to quantize it")
    return w


def _codes(w: torch.Tensor, scale: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """round(w / scale) clamped to [lo, hi] as int8; 0 where the scale is 0. w [..., g], scale [..., 1]."""
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(w / safe).clamp_(lo, hi).to(torch.int8)


def quantize_int8_per_channel(w: torch.Tensor) -> QuantWeight:
    """W [N, K] float -> int8 codes with one fp32 scale per output row (group = K)."""
    w = _check(w)
    scale = w.abs().amax(dim=1, keepdim=True) / 127  # [N, 1]
    return QuantWeight(q=_codes(w, scale, -127, 127), scale=scale, zero=None, bits=8, group=w.shape[1])


def _groups(w: torch.Tensor, group: int, qmax: int, lo: int, bits: int) -> QuantWeight:
    """Symmetric codes in [lo, qmax] with one fp32 scale (max|w| / qmax) per row and `group` columns."""
    w = _check(w)
    n, k = w.shape
    if group <= 0 or k % group:
        raise ValueError(f"in features {k} are not a multiple of the group size {group}")
    wg = w.view(n, k // group, group)
    scale = wg.abs().amax(dim=2, keepdim=True) / qmax  # [N, G, 1]
    q = _codes(wg, scale, lo, qmax).view(n, k)
    return QuantWeight(q=q, scale=scale.view(n, k // group), zero=None, bits=bits, group=group)


def quantize_int8_groups(w: torch.Tensor, group: int = 128) -> QuantWeight:
    """W [N, K] float -> int8 codes (-127..127) with one fp32 scale per row and `group` columns."""
    return _groups(w, group, 127, -127, 8)


def quantize_int4_groups(w: torch.Tensor, group: int = 128) -> QuantWeight:
    """W [N, K] float -> 4-bit codes (-8..7, one per int8) with one fp32 scale per row and `group` columns."""
    return _groups(w, group, 7, -8, 4)


def quantization_error(w: torch.Tensor, qw: QuantWeight) -> float:
    """Normalized mean squared error sum((W - deq)^2) / sum(W^2), in fp64 (0 for an all-zero W)."""
    w64 = w.detach().double()
    err = (w64 - qw.dequantize().double()).pow(2).sum()
    ref = w64.pow(2).sum()
    return float(err / ref) if float(ref) > 0 else float(err)
