"""compressed-tensors checkpoints (llm-compressor) -> QuantWeight.

config.json's `quantization_config` has `quant_method: "compressed-tensors"`, a `format` and
`config_groups` whose `weights` give num_bits / type / symmetric / strategy / group_size.
    int-quantized (W8A8, W8A16):  X.weight int8 [N, K], X.weight_scale [N, 1] (channel), [N, K/g] (group)
                                  or one value (tensor); W = scale * q. A static recipe adds
                                  X.input_scale (and X.input_zero_point), passed through as floats.
    pack-quantized (W4A16, W8A16): X.weight_packed int32 [N, ceil(K * bits / 32)], packed along K in
                                  sequential order (value i of a word at bits bits*i), each code stored
                                  with an offset of 2^(bits-1) (so unsigned); X.weight_shape int [2] = (N, K);
                                  X.weight_scale [N, K/g]; W = scale * (u - 2^(bits-1)).
Optional, both formats: X.weight_zero_point (asymmetric; for pack-quantized packed along N with the same
offset, from the library's description, not checked against a checkpoint it wrote) and X.weight_g_idx
(act-order, handled like GPTQ's g_idx through `perm`). Scales of any float dtype are widened to fp32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from openlora.errors import ModelLoadError
from openlora.quant.formats.common import FLOATS, bad, check_shape, need, perm_from_g_idx, unpack_int32
from openlora.quant.types import QuantWeight

FORMATS = ("int-quantized", "pack-quantized")
INTS = (torch.int8, torch.int16, torch.int32, torch.int64)
_OWN = ("weight", "weight_packed", "weight_shape", "weight_scale", "weight_zero_point", "weight_g_idx")


def ct_settings(cfg: dict[str, Any], source: str) -> tuple[str, int]:
    """(format, weight bits) from the config; every config group must agree on both."""
    groups = cfg.get("config_groups") or {}
    fmts = {g.get("format") for g in groups.values() if g.get("format")} or {cfg.get("format")}
    weights = [g.get("weights") or {} for g in groups.values()]
    bits = {w.get("num_bits", 8) for w in weights} or {8}
    kinds = {w.get("type", "int") for w in weights}
    if len(fmts) != 1 or not fmts <= set(FORMATS):
        raise ModelLoadError(f"{source}: compressed-tensors format {sorted(map(str, fmts))} is not supported "
                             f"(one of {', '.join(FORMATS)})")
    if kinds - {"int"} or len(bits) != 1 or not bits <= {4, 8}:
        raise ModelLoadError(f"{source}: compressed-tensors weights {sorted(kinds)} with {sorted(bits)} bits "
                             "are not supported (int, 4 or 8 bits)")
    return fmts.pop(), bits.pop()


def _params(tensors: dict[str, torch.Tensor], path: Path, p: str, n: int, k: int
            ) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """(scale fp32 [N, G], group, g_idx or None) of linear p, checked against [N, K]."""
    scale = need(tensors, path, f"{p}.weight_scale", FLOATS)
    if scale.numel() == 1:  # strategy "tensor": one scale for the whole matrix
        scale = scale.reshape(1, 1).expand(n, 1)
    if scale.dim() != 2 or scale.shape[0] != n or scale.shape[1] == 0 or k % scale.shape[1]:
        raise bad(path, f"{p}.weight_scale", f"has shape {tuple(scale.shape)}, which does not divide [{n}, {k}]")
    g_idx = None
    if f"{p}.weight_g_idx" in tensors:
        g_idx = need(tensors, path, f"{p}.weight_g_idx", INTS, 1)
        check_shape(path, f"{p}.weight_g_idx", g_idx, (k,))
    return scale.float().contiguous(), k // scale.shape[1], g_idx


def _finish(path: Path, p: str, q: torch.Tensor, scale: torch.Tensor, group: int, zero: torch.Tensor | None,
            g_idx: torch.Tensor | None, bits: int) -> QuantWeight:
    perm = None if g_idx is None else perm_from_g_idx(path, f"{p}.weight_g_idx", g_idx, group)
    if perm is not None:
        q = q[:, perm]
    if zero is not None:
        check_shape(path, f"{p}.weight_zero_point", zero, tuple(scale.shape))
        zero = None if not bool(zero.any()) else zero.to(torch.int16).contiguous()
    return QuantWeight(q=q.to(torch.int8).contiguous(), scale=scale, zero=zero, bits=bits, group=group, perm=perm)


def int_weight(tensors: dict[str, torch.Tensor], path: Path, p: str, bits: int) -> QuantWeight:
    """int-quantized linear p: int8 codes as stored (in [-8, 7] when the config says 4 bits)."""
    q = need(tensors, path, f"{p}.weight", (torch.int8,), 2)
    n, k = q.shape
    scale, group, g_idx = _params(tensors, path, p, n, k)
    zero = tensors.get(f"{p}.weight_zero_point")
    if zero is not None and zero.numel() == 1:
        zero = zero.reshape(1, 1).expand(n, 1)
    return _finish(path, p, q, scale, group, zero, g_idx, bits)


def packed_weight(tensors: dict[str, torch.Tensor], path: Path, p: str, bits: int) -> QuantWeight:
    """pack-quantized linear p: codes unpacked along K, offset removed."""
    per, offset = 32 // bits, 1 << (bits - 1)
    packed = need(tensors, path, f"{p}.weight_packed", (torch.int32,), 2)
    shape = need(tensors, path, f"{p}.weight_shape", INTS, 1)
    if shape.numel() != 2:
        raise bad(path, f"{p}.weight_shape", f"holds {shape.numel()} values, expected 2")
    n, k = (int(v) for v in shape)
    check_shape(path, f"{p}.weight_packed", packed, (n, -(-k // per)))
    q = unpack_int32(packed, bits, dim=1)[:, :k] - offset  # [N, K] signed codes
    scale, group, g_idx = _params(tensors, path, p, n, k)
    zero = None
    if f"{p}.weight_zero_point" in tensors:
        zp = need(tensors, path, f"{p}.weight_zero_point", (torch.int32,), 2)
        check_shape(path, f"{p}.weight_zero_point", zp, (-(-n // per), scale.shape[1]))
        zero = unpack_int32(zp, bits, dim=0)[:n] - offset  # [N, G]
    return _finish(path, p, q, scale, group, zero, g_idx, bits)


def load_compressed(tensors: dict[str, torch.Tensor], path: Path, cfg: dict[str, Any], source: str
                    ) -> tuple[dict[str, QuantWeight], dict[str, torch.Tensor]]:
    """Every quantized linear (an int8 `X.weight` or an `X.weight_packed`, with `X.weight_scale`) ->
    `X.weight` QuantWeight; everything else (ignored layers such as lm_head, norms, input scales) as is."""
    fmt, bits = ct_settings(cfg, f"{path}/{source}")
    suffix = ".weight_packed" if fmt == "pack-quantized" else ".weight_scale"
    prefixes = sorted(k[: -len(suffix)] for k in tensors if k.endswith(suffix))
    if fmt == "int-quantized":  # an int8 weight whose scale is missing is malformed, not a float
        prefixes += [k[: -len(".weight")] for k, v in tensors.items() if k.endswith(".weight")
                     and v.dtype == torch.int8 and f"{k}_scale" not in tensors]
    if not prefixes:
        raise ModelLoadError(f"{path}: a compressed-tensors {fmt} config but no quantized tensor")
    quant = {f"{p}.weight": (packed_weight(tensors, path, p, bits) if fmt == "pack-quantized"
                             else int_weight(tensors, path, p, bits)) for p in prefixes}
    used = {f"{p}.{s}" for p in prefixes for s in _OWN}
    return quant, {k: v for k, v in tensors.items() if k not in used}
