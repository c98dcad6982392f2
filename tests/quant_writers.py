"""Writers of quantized checkpoints (GPTQ, AWQ, compressed-tensors), from the formats' documented rules.

The packing helpers are shared by the loaders' bit-exactness tests (tests/quant/); `write_quantized` turns a
float model folder (tests/tiny_models.py) into a servable quantized folder and, beside it, the float folder
transformers runs as the reference (every projection replaced by its dequantized weight, computed here by
each format's rule, independently of openlora's loaders).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i of an AWQ word holds column AWQ_ORDER[i] of its 8


def pack_int32(vals: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Unsigned values -> int32 words, `32 / bits` consecutive values along `axis` per word, value i at
    bits*i (zero padded to whole words)."""
    per = 32 // bits
    v = np.moveaxis(vals.astype(np.uint32), axis, 0)
    pad = -v.shape[0] % per
    v = np.concatenate([v, np.zeros((pad, *v.shape[1:]), np.uint32)]) if pad else v
    out = np.zeros((v.shape[0] // per, *v.shape[1:]), np.uint32)
    for i in range(per):
        out |= v[i::per] << np.uint32(bits * i)
    return np.ascontiguousarray(np.moveaxis(out, 0, axis)).view(np.int32)


def pack_awq(vals: np.ndarray) -> np.ndarray:
    """[R, C] values 0..15 -> int32 [R, C / 8]: nibble i of word j = column 8j + AWQ_ORDER[i]."""
    r, c = vals.shape
    v = vals.astype(np.uint32).reshape(r, c // 8, 8)
    out = np.zeros((r, c // 8), np.uint32)
    for i, col in enumerate(AWQ_ORDER):
        out |= v[:, :, col] << np.uint32(4 * i)
    return out.view(np.int32)


def _asym(w: np.ndarray, cols: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric min/max codes of w [N, K] over each row of `cols` [G, group] (column indices):
    (q [N, K] 0..2^bits-1, zero [N, G], scale fp16 [N, G]) with w ~ scale * (q - zero)."""
    top = (1 << bits) - 1
    n, k = w.shape
    q = np.zeros((n, k), np.int64)
    zero = np.zeros((n, cols.shape[0]), np.int64)
    scale = np.zeros((n, cols.shape[0]), np.float16)
    for g, c in enumerate(cols):
        lo, hi = np.minimum(w[:, c].min(1), 0), np.maximum(w[:, c].max(1), 0)
        s = ((hi - lo) / top).astype(np.float16)
        s32 = s.astype(np.float32)
        z = np.clip(np.round(-lo / s32), 1, top)  # >= 1: GPTQ v1 stores zero - 1
        q[:, c] = np.clip(np.round(w[:, c] / s32[:, None]) + z[:, None], 0, top)
        zero[:, g], scale[:, g] = z, s
    return q, zero, scale


def _deq(q: np.ndarray, zero: np.ndarray, scale: np.ndarray, group_of: np.ndarray) -> torch.Tensor:
    """The documented rule W[n, k] = scale[n, g(k)] * (q[n, k] - zero[n, g(k)]) in fp32."""
    s = scale.astype(np.float32)[:, group_of]
    return torch.from_numpy((s * (q - zero[:, group_of]).astype(np.float32)).astype(np.float32))


def gptq_linear(w: np.ndarray, prefix: str, group: int, order: np.ndarray | None, v1: bool
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """GPTQ 4-bit with zero points; `order` (act-order): column order[j] lands in group j // group."""
    n, k = w.shape
    order = np.arange(k) if order is None else order
    g_idx = np.empty(k, np.int64)
    g_idx[order] = np.arange(k) // group
    q, zero, scale = _asym(w, order.reshape(-1, group), 4)
    t = {f"{prefix}.qweight": torch.from_numpy(pack_int32(q.T, 4, 0)),  # [K / 8, N]
         f"{prefix}.qzeros": torch.from_numpy(pack_int32((zero - (1 if v1 else 0)).T, 4, 1)),  # [G, N / 8]
         f"{prefix}.scales": torch.from_numpy(np.ascontiguousarray(scale.T)),  # fp16 [G, N]
         f"{prefix}.g_idx": torch.from_numpy(g_idx.astype(np.int32))}
    return t, _deq(q, zero, scale, g_idx)


def awq_linear(w: np.ndarray, prefix: str, group: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """AWQ GEMM: 4-bit with zero points, packed along N with the interleaved order."""
    n, k = w.shape
    q, zero, scale = _asym(w, np.arange(k).reshape(-1, group), 4)
    t = {f"{prefix}.qweight": torch.from_numpy(pack_awq(q.T)),  # [K, N / 8]
         f"{prefix}.qzeros": torch.from_numpy(pack_awq(zero.T)),  # [G, N / 8]
         f"{prefix}.scales": torch.from_numpy(np.ascontiguousarray(scale.T))}  # fp16 [G, N]
    return t, _deq(q, zero, scale, np.arange(k) // group)


def ct_linear(w: np.ndarray, prefix: str, bits: int, group: int | None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """compressed-tensors symmetric: int8 per channel (`group` None, int-quantized) or pack-quantized
    groups (codes + 2^(bits-1) packed along K)."""
    n, k = w.shape
    g = k if group is None else group
    top = (1 << (bits - 1)) - 1
    s = (np.abs(w).reshape(n, k // g, g).max(2) / top).astype(np.float16)  # [N, G]
    s32 = np.repeat(s.astype(np.float32), g, axis=1)
    q = np.clip(np.round(w / s32), -top, top).astype(np.int64)  # never -2^(bits-1): w8a8 takes the codes
    deq = torch.from_numpy((s32 * q.astype(np.float32)).astype(np.float32))
    if group is None:
        return {f"{prefix}.weight": torch.from_numpy(q.astype(np.int8)),
                f"{prefix}.weight_scale": torch.from_numpy(s)}, deq
    return {f"{prefix}.weight_packed": torch.from_numpy(pack_int32(q + (1 << (bits - 1)), bits, 1)),
            f"{prefix}.weight_shape": torch.tensor([n, k]), f"{prefix}.weight_scale": torch.from_numpy(s)}, deq


def ct_config(fmt: str, bits: int, group: int | None, int8_acts: bool) -> dict:
    weights = {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "channel" if group is None else "group",
               "group_size": group}
    acts = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    return {"quant_method": "compressed-tensors", "format": fmt, "ignore": ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": acts if int8_acts else None}}}


QCONFIGS = {
    "gptq": lambda group, v1: {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": True, "sym": False,
                               "checkpoint_format": "gptq" if v1 else "gptq_v2"},
    "awq": lambda group, v1: {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                              "version": "gemm"},
    "ct-int4": lambda group, v1: ct_config("pack-quantized", 4, group, False),
    "ct-w8a8": lambda group, v1: ct_config("int-quantized", 8, None, True),
}


def _input_of(name: str) -> str:
    """Projections that read the same activation share an act-order (GPTQ's Hessian is the input's)."""
    layer = name.split(".")[2]
    part = name.split(".")[-2]
    return f"{layer}.attn_in" if part in ("q_proj", "k_proj", "v_proj") else (
        f"{layer}.mlp_in" if part in ("gate_proj", "up_proj") else name)


def write_quantized(src: Path, dst: Path, fmt: str, *, group: int = 32, v1: bool = True, shared_order: bool = True,
                    state: dict[str, torch.Tensor] | None = None, seed: int = 0) -> Path:
    """Quantize every projection of the float model folder `src` (or of `state`, its tensors changed, e.g.
    with scales folded) into format `fmt` (QCONFIGS) under `dst`, and write the reference float folder
    `dst.parent / (dst.name + "-deq")`: the same model with every projection dequantized. GPTQ gets act-order:
    one random order per input when `shared_order`, else one per projection. Returns `dst`."""
    rng = np.random.default_rng(seed)
    state = dict(state if state is not None else load_file(str(src / "model.safetensors")))
    out: dict[str, torch.Tensor] = {}
    deq = dict(state)
    orders: dict[str, np.ndarray] = {}
    for name, t in state.items():
        parts = name.split(".")
        if len(parts) < 2 or parts[-2] not in PROJ or parts[-1] != "weight":
            out[name] = t
            continue
        prefix, w = name[: -len(".weight")], t.float().numpy()
        if fmt == "gptq":
            key = _input_of(name) if shared_order else name
            order = orders.setdefault(key, rng.permutation(w.shape[1]))
            tensors, deq[name] = gptq_linear(w, prefix, group, order, v1)
        elif fmt == "awq":
            tensors, deq[name] = awq_linear(w, prefix, group)
        else:
            tensors, deq[name] = ct_linear(w, prefix, 4 if fmt == "ct-int4" else 8, group if fmt == "ct-int4" else None)
        out.update(tensors)
    cfg = json.loads((src / "config.json").read_text())
    ref = dst.parent / f"{dst.name}-deq"
    for folder, tensors, qcfg in ((dst, out, QCONFIGS[fmt](group, v1)), (ref, deq, None)):
        shutil.copytree(src, folder, ignore=shutil.ignore_patterns("*.safetensors*"))
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({**cfg, "quantization_config": qcfg} if qcfg else cfg))
    return dst
