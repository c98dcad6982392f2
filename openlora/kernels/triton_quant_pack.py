"""The device layout of a QuantWeight for the Triton quantized GEMMs (openlora/kernels/triton_quant.py).

Codes stay in the checkpoint's [N, K] order (K contiguous, so a [BLOCK_N, BLOCK_K] tile is N coalesced row
segments); group parameters are transposed to [G, N] so one group's values for a block of rows are
contiguous.

    w8a16  codes int8 [N, K] (the QuantWeight's codes); zero fp32 [G, N] or None; min fp32 [G, N] or None
    w4a16  codes uint8 [N, K / 2]: byte j holds column 2j in its low and 2j + 1 in its high nibble, as
           u = q - qmin in 0..15 (qmin = -8 for signed codes, else 0); zero is then z - qmin (so signed
           codes without a zero point keep a zero of 8)
    w8a8   codes int8 [N, K] in [-127, 127]; symmetric (no zero, no min)
    all    scale fp32 [G, N]; perm int64 [K] or None (the GEMM reads x[:, perm])

Every mode computes W[n, k] = scale * (u - zero) + min per (row, group), the QuantWeight's order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from openlora.quant.types import QuantWeight

MODES = ("w8a16", "w4a16", "w8a8")


@dataclass(frozen=True)
class TritonQuant:
    """A QuantWeight resident on a device in the Triton kernels' layout (module docstring)."""

    mode: str
    n: int  # out features
    k: int  # in features
    group: int  # input columns per scale (K for one scale per row)
    codes: torch.Tensor  # int8 [N, K] (w8a16, w8a8) or uint8 [N, K / 2] (w4a16)
    scale: torch.Tensor  # fp32 [G, N]
    zero: torch.Tensor | None  # fp32 [G, N] (exact small integers), or None for 0
    min: torch.Tensor | None  # fp32 [G, N] added after the scale (GGUF Q4_1), or None
    perm: torch.Tensor | None  # int64 [K]: the kernels read x[:, perm], or None

    @property
    def num_groups(self) -> int:
        return self.k // self.group

    @property
    def nbytes(self) -> int:
        """Resident bytes: codes, group parameters and permutation."""
        ts = [self.codes, self.scale, self.zero, self.min, self.perm]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _params(t: torch.Tensor | None, device: torch.device | str) -> torch.Tensor | None:
    """[N, G] -> fp32 [G, N] contiguous on `device` (None stays None)."""
    return None if t is None else t.float().t().contiguous().to(device)


def _check_w8a8(w: QuantWeight) -> None:
    if w.bits != 8 or w.min is not None or (w.zero is not None and bool((w.zero != 0).any())):
        raise ValueError("w8a8 needs symmetric 8-bit weights (zero 0, no min)")
    if bool((w.q == -128).any()):
        raise ValueError("w8a8 codes must lie in [-127, 127]")


def _nibbles(w: QuantWeight) -> tuple[torch.Tensor, int]:
    """4-bit codes -> (uint8 [N, K / 2] two per byte, qmin) with u = q - qmin in 0..15."""
    if w.bits != 4:
        raise ValueError("w4a16 needs 4-bit codes")
    if w.group % 2:
        raise ValueError(f"w4a16 needs an even group size, got {w.group}")
    lo, hi = int(w.q.min()), int(w.q.max())
    qmin = -8 if lo < 0 else 0
    if lo < qmin or hi > qmin + 15:
        raise ValueError(f"4-bit codes out of range: {lo}..{hi}")
    u = (w.q.to(torch.int16) - qmin).to(torch.uint8)  # [N, K] in 0..15
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous(), qmin


def pack(w: QuantWeight, mode: str, device: torch.device | str) -> TritonQuant:
    """W in the layout of `mode` on `device` (module docstring); raises ValueError where W does not fit."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    n, k = w.shape
    perm = None if w.perm is None else w.perm.to(torch.int64).contiguous().to(device)
    zero: torch.Tensor | None = w.zero
    if mode == "w8a8":
        _check_w8a8(w)
        codes, zero = w.q.contiguous(), None
    elif mode == "w4a16":
        codes, qmin = _nibbles(w)
        if qmin:  # stored codes are shifted by -qmin: shift the zero point with them
            zero = (w.zero.float() if w.zero is not None else torch.zeros(w.scale.shape)) - qmin
    else:
        if w.bits != 8:
            raise ValueError("w8a16 needs 8-bit codes")
        codes = w.q.contiguous()
    if zero is not None and not bool((zero != 0).any()):
        zero = None  # an all-zero zero point costs a load per tile for nothing
    scale = _params(w.scale, device)
    assert scale is not None
    return TritonQuant(mode, n, k, w.group, codes.to(device), scale, _params(zero, device), _params(w.min, device),
                       perm)
