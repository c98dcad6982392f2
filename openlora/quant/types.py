"""The one form a quantized linear weight takes in OpenLoRA, whatever format it came from.

A weight W [N, K] (out features, in features, Hugging Face layout) is kept as integer codes q with, per
output row and group of `group` consecutive input columns, a scale, an integer zero point and an
optional additive minimum:

    W[n, k] = scale[n, g] * (q[n, k] - zero[n, g]) + min[n, g],      g = k // group

computed in fp32 in exactly that order: q - zero is an exact small integer, then one rounding for the
product and one for the sum. That order is what each format's own dequantizer does, so loaders are
bit-exact against them:
    GGUF Q8_0   group 32, zero 0, no min          (d * q)
    GGUF Q4_0   group 32, zero 8, no min          (d * (q - 8))
    GGUF Q4_1   group 32, zero 0, min m           (d * q + m)
    GPTQ / AWQ  group g,  zero z, no min          (s * (q - z)), GPTQ act-order through `perm`
    compressed-tensors int8 per channel / int4 groups, symmetric (zero 0)
    our own quantize-at-load: int8 per output channel, or int4 in groups of 128, symmetric

`perm` (GPTQ act-order, `g_idx`): the stored columns are W[:, perm], grouped contiguously; a GEMM then
reads x[:, perm]. Codes are int8 for every width (4-bit codes are 0..15 or -8..7 here; kernels pack
them into nibbles themselves).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuantWeight:
    """W [N, K] as integer codes and per-group affine parameters (module docstring)."""

    q: torch.Tensor  # int8 [N, K]: the codes
    scale: torch.Tensor  # fp32 [N, K // group]
    zero: torch.Tensor | None  # int8/int16/int32 or fp32 [N, K // group] (exact integers), or None for 0
    bits: int  # 8 or 4: the range the codes use
    group: int  # input columns per scale; K for one scale per output row
    min: torch.Tensor | None = None  # fp32 [N, K // group] added after the scale (GGUF Q4_1), or None
    perm: torch.Tensor | None = None  # int64 [K]: stored columns are W[:, perm] (GPTQ act-order), or None

    def __post_init__(self) -> None:
        n, k = self.q.shape
        if self.q.dtype != torch.int8 or self.bits not in (4, 8) or k % self.group:
            raise ValueError(f"bad quantized weight: codes {self.q.dtype} {tuple(self.q.shape)}, "
                             f"{self.bits} bits, group {self.group}")
        for name in ("scale", "zero", "min"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != (n, k // self.group):
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {(n, k // self.group)}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)  # type: ignore[return-value]

    def dequantize(self) -> torch.Tensor:
        """W [N, K] fp32 in the original column order (the oracle every kernel and loader is checked
        against)."""
        n, k = self.q.shape
        g = k // self.group
        q = self.q.view(n, g, self.group).float()  # codes are small integers: exact in fp32
        if self.zero is not None:
            q = q - self.zero.float().view(n, g, 1)
        w = q * self.scale.float().view(n, g, 1)
        if self.min is not None:
            w = w + self.min.float().view(n, g, 1)
        w = w.view(n, k)
        if self.perm is not None:
            out = torch.empty_like(w)
            out[:, self.perm] = w
            w = out
        return w

    @property
    def nbytes(self) -> int:
        """Resident bytes as kernels store it: codes at `bits` per value plus the group parameters."""
        n, k = self.q.shape
        params = sum(t.numel() * 4 for t in (self.scale, self.zero, self.min) if t is not None)
        return n * k * self.bits // 8 + params
