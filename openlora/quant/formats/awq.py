"""AWQ checkpoints (AutoAWQ, GEMM version) -> QuantWeight.

Per linear `X` (K in features, N out features, G = K / group):
    X.qweight  int32 [K, N / 8]   4-bit codes packed along N, interleaved: nibble i of a word holds
                                  column ORDER[i] of its 8, ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
    X.qzeros   int32 [G, N / 8]   zero points, same packing
    X.scales   fp16  [G, N]
    W[n, k] = scales[k // group, n] * (q[k, n] - z[k // group, n])
Zeros are stored as they are (no GPTQ-style +1). GEMV checkpoints (packed along K) are refused.
AWQ folds activation scales into the preceding norms: see folding.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from openlora.errors import ModelLoadError
from openlora.quant.formats.common import FLOATS, bad, check_shape, need, unpack_int32
from openlora.quant.types import QuantWeight

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i -> logical column ORDER[i]
REVERSE = tuple(ORDER.index(c) for c in range(8))  # logical column c -> nibble REVERSE[c] = (0,4,1,5,2,6,3,7)
SUFFIXES = ("qweight", "qzeros", "scales")


def awq_settings(cfg: dict[str, Any], source: str) -> int:
    """The group size, after checking that the config describes 4-bit GEMM with zero points."""
    bits = cfg.get("bits", cfg.get("w_bit"))
    group = cfg.get("group_size", cfg.get("q_group_size"))
    version = str(cfg.get("version", "gemm")).lower()
    if bits != 4:
        raise ModelLoadError(f"{source}: AWQ with bits={bits!r} is not supported (4)")
    if version != "gemm":
        raise ModelLoadError(f"{source}: AWQ version {version!r} is not supported (gemm)")
    if not cfg.get("zero_point", True):
        raise ModelLoadError(f"{source}: AWQ without zero points is not supported")
    if not isinstance(group, int) or group <= 0:
        raise ModelLoadError(f"{source}: AWQ group size {group!r} is not valid")
    return group


def _unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] -> int32 [R, 8C] codes in logical column order (undoing the interleave)."""
    r, c = packed.shape
    nib = unpack_int32(packed, 4, dim=1).view(r, c, 8)  # [R, C, nibble]
    return nib[:, :, list(REVERSE)].reshape(r, 8 * c)


def awq_weight(tensors: dict[str, torch.Tensor], path: Path, prefix: str, group: int) -> QuantWeight:
    """The QuantWeight of linear `prefix` (module docstring); ModelLoadError naming any bad tensor."""
    qweight = need(tensors, path, f"{prefix}.qweight", (torch.int32,), 2)
    k, n = qweight.shape[0], qweight.shape[1] * 8
    if k % group:
        raise bad(path, f"{prefix}.qweight", f"{k} in features are not a multiple of the group size {group}")
    scales = need(tensors, path, f"{prefix}.scales", FLOATS, 2)
    check_shape(path, f"{prefix}.scales", scales, (k // group, n))
    qzeros = need(tensors, path, f"{prefix}.qzeros", (torch.int32,), 2)
    check_shape(path, f"{prefix}.qzeros", qzeros, (k // group, n // 8))
    q = _unpack_awq(qweight).T  # [N, K] 0..15
    z = _unpack_awq(qzeros).T  # [N, G] 0..15
    return QuantWeight(q=q.to(torch.int8).contiguous(), scale=scales.T.float().contiguous(),
                       zero=z.to(torch.int8).contiguous(), bits=4, group=group)


def load_awq(tensors: dict[str, torch.Tensor], path: Path, cfg: dict[str, Any], source: str
             ) -> tuple[dict[str, QuantWeight], dict[str, torch.Tensor]]:
    """Every `X.qweight` linear -> `X.weight` QuantWeight; other tensors pass through as floats."""
    group = awq_settings(cfg, f"{path}/{source}")
    prefixes = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
    if not prefixes:
        raise ModelLoadError(f"{path}: an AWQ config but no `*.qweight` tensor")
    quant = {f"{p}.weight": awq_weight(tensors, path, p, group) for p in prefixes}
    used = {f"{p}.{s}" for p in prefixes for s in SUFFIXES}
    return quant, {k: v for k, v in tensors.items() if k not in used}
