"""GPTQ checkpoints (AutoGPTQ / GPTQModel layout) -> QuantWeight.

Per linear `X` (K in features, N out features, G = K / group):
    X.qweight  int32 [K * bits / 32, N]   codes packed along K: input row k + i at bits bits*i
    X.qzeros   int32 [G, N * bits / 32]   zero points packed along N, same order
    X.scales   fp16  [G, N]
    X.g_idx    int32 [K] (optional)       group of each input column; not k // group under desc_act
    W[n, k] = scales[g_idx[k], n] * (q[k, n] - z[g_idx[k], n])
with z = stored + 1 for `checkpoint_format` "gptq" (v1 stores zero - 1) and z = stored for "gptq_v2".

QuantWeight form: codes transposed to [N, K]; for 8 bits codes and zeros are both shifted by -128 so the
codes fit int8 (q - z unchanged); zeros are int16 (v1's +1 reaches 16 resp. 256 - 128), None when all 0; act-order
checkpoints get `perm` (columns sorted stably by group). Bits 4 and 8 only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from openlora.errors import ModelLoadError
from openlora.quant.formats.common import FLOATS, bad, check_shape, need, perm_from_g_idx, unpack_int32
from openlora.quant.types import QuantWeight

SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


def gptq_settings(cfg: dict[str, Any], source: str) -> tuple[int, int | None, bool]:
    """(bits, group size or None for one group per column, v1?) from the quantization config."""
    bits = cfg.get("bits")
    if bits not in (4, 8):
        raise ModelLoadError(f"{source}: GPTQ with bits={bits!r} is not supported (4 or 8)")
    group = cfg.get("group_size", 128)
    fmt = str(cfg.get("checkpoint_format") or cfg.get("format") or "gptq").lower()
    if fmt not in ("gptq", "gptq_v2") or cfg.get("is_marlin_format"):
        raise ModelLoadError(f"{source}: GPTQ checkpoint format {fmt!r} is not supported (gptq, gptq_v2)")
    if not isinstance(group, int) or group == 0 or group < -1:
        raise ModelLoadError(f"{source}: GPTQ group_size {group!r} is not valid")
    return bits, (None if group == -1 else group), fmt == "gptq"


def gptq_weight(tensors: dict[str, torch.Tensor], path: Path, prefix: str, bits: int, group: int | None,
                v1: bool) -> QuantWeight:
    """The QuantWeight of linear `prefix` (module docstring); ModelLoadError naming any bad tensor."""
    per = 32 // bits
    qweight = need(tensors, path, f"{prefix}.qweight", (torch.int32,), 2)
    k, n = qweight.shape[0] * per, qweight.shape[1]
    g_size = k if group is None else group
    if k % g_size:
        raise bad(path, f"{prefix}.qweight", f"{k} in features are not a multiple of the group size {g_size}")
    groups = k // g_size
    scales = need(tensors, path, f"{prefix}.scales", FLOATS, 2)
    check_shape(path, f"{prefix}.scales", scales, (groups, n))
    qzeros = need(tensors, path, f"{prefix}.qzeros", (torch.int32,), 2)
    if n % per:
        raise bad(path, f"{prefix}.qzeros", f"{n} out features do not pack {per} per int32")
    check_shape(path, f"{prefix}.qzeros", qzeros, (groups, n // per))

    q = unpack_int32(qweight, bits, dim=0).T  # [N, K], 0 .. 2^bits - 1
    z = unpack_int32(qzeros, bits, dim=1).T  # [N, G]
    if v1:
        z = z + 1  # v1 stores zero - 1
    if bits == 8:  # shift both so the codes fit int8; q - z is unchanged
        q, z = q - 128, z - 128
    perm = None
    if f"{prefix}.g_idx" in tensors:
        g_idx = need(tensors, path, f"{prefix}.g_idx", (torch.int32, torch.int64), 1)
        check_shape(path, f"{prefix}.g_idx", g_idx, (k,))
        perm = perm_from_g_idx(path, f"{prefix}.g_idx", g_idx, g_size)
    if perm is not None:
        q = q[:, perm]
    zero = z.to(torch.int16).contiguous() if bool(z.any()) else None  # e.g. symmetric 8-bit: all 128 - 128
    return QuantWeight(q=q.to(torch.int8).contiguous(), scale=scales.T.float().contiguous(),
                       zero=zero, bits=bits, group=g_size, perm=perm)


def load_gptq(tensors: dict[str, torch.Tensor], path: Path, cfg: dict[str, Any], source: str
              ) -> tuple[dict[str, QuantWeight], dict[str, torch.Tensor]]:
    """Every `X.qweight` linear -> `X.weight` QuantWeight; the other tensors (norms, embeddings, the
    head, biases) pass through as floats."""
    bits, group, v1 = gptq_settings(cfg, f"{path}/{source}")
    prefixes = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
    if not prefixes:
        raise ModelLoadError(f"{path}: a GPTQ config but no `*.qweight` tensor")
    quant = {f"{p}.weight": gptq_weight(tensors, path, p, bits, group, v1) for p in prefixes}
    used = {f"{p}.{s}" for p in prefixes for s in SUFFIXES}
    floats = {k: v for k, v in tensors.items() if k not in used}
    return quant, floats
