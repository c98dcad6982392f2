"""GPTQ checkpoints (v1 / v2, 4 and 8 bits, act-order g_idx) against the documented dequantization rule.

Checkpoints are packed here with plain numpy (K-packed qweight, N-packed qzeros) and saved with
safetensors; the oracle is w[k, n] = scales[g_idx[k], n] * (q[k, n] - z[g_idx[k], n]) in fp32 with
z = stored + 1 (v1) or stored (v2), transposed to [N, K].
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from quant_writers import pack_int32 as pack
from safetensors.torch import save_file

from openlora.errors import ModelLoadError
from openlora.quant.formats import detect, load_quant_weights

LIN = "model.layers.0.mlp.up_proj"


def make_linear(rng: np.random.Generator, n: int, k: int, bits: int, group: int, act_order: bool) -> dict:
    """Raw GPTQ fields of one linear: codes q [K, N], stored zeros [G, N], scales fp16 [G, N], g_idx [K]."""
    g_size = k if group == -1 else group
    groups = k // g_size
    g_idx = np.arange(k) // g_size
    if act_order:  # column order[j] is quantized j-th, so it lands in group j // group
        order = rng.permutation(k)
        g_idx = np.empty(k, np.int64)
        g_idx[order] = np.arange(k) // g_size
    return {"q": rng.integers(0, 2**bits, (k, n)), "z": rng.integers(0, 2**bits, (groups, n)),
            "scales": (rng.standard_normal((groups, n)) * 0.01).astype(np.float16), "g_idx": g_idx.astype(np.int32)}


def reference(raw: dict, v1: bool) -> torch.Tensor:
    """The documented rule, [N, K] fp32."""
    z = raw["z"] + (1 if v1 else 0)
    g = raw["g_idx"]
    w = raw["scales"][g].astype(np.float32) * (raw["q"] - z[g]).astype(np.float32)  # [K, N]
    return torch.from_numpy(np.ascontiguousarray(w.T))


def write_ckpt(folder: Path, linears: dict[str, dict], bits: int, group: int, fmt: str, where: str = "config",
               drop: str | None = None, extra: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"model.norm.weight": torch.ones(8), f"{LIN}.bias": torch.zeros(4)}
    for p, raw in linears.items():
        tensors[f"{p}.qweight"] = torch.from_numpy(pack(raw["q"], bits, 0))
        tensors[f"{p}.qzeros"] = torch.from_numpy(pack(raw["z"], bits, 1))
        tensors[f"{p}.scales"] = torch.from_numpy(raw["scales"])
        tensors[f"{p}.g_idx"] = torch.from_numpy(raw["g_idx"])
    if drop:
        del tensors[drop]
    tensors.update(extra or {})
    save_file(tensors, str(folder / "model.safetensors"))
    qcfg = {"bits": bits, "group_size": group, "desc_act": True, "sym": True, "checkpoint_format": fmt}
    if where == "config":
        (folder / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq", **qcfg}}))
    else:
        (folder / "quantize_config.json").write_text(json.dumps(qcfg))
    return folder


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("act_order", [False, True])
def test_bit_exact(tmp_path, bits, fmt, act_order):
    rng = np.random.default_rng(bits * 10 + act_order)
    raws = {LIN: make_linear(rng, 64, 96, bits, 32, act_order),
            "model.layers.0.mlp.down_proj": make_linear(rng, 48, 128, bits, 32, act_order)}
    folder = write_ckpt(tmp_path / "m", raws, bits, 32, fmt, where="config" if bits == 4 else "quantize_config")
    assert detect(folder) == "gptq"
    quant, floats = load_quant_weights(folder)
    assert set(quant) == {f"{p}.weight" for p in raws}
    assert set(floats) == {"model.norm.weight", f"{LIN}.bias"}
    for p, raw in raws.items():
        qw = quant[f"{p}.weight"]
        n, k = raw["q"].shape[1], raw["q"].shape[0]
        assert qw.shape == (n, k) and qw.bits == bits and qw.group == 32 and qw.q.dtype == torch.int8
        assert torch.equal(qw.dequantize(), reference(raw, v1=fmt == "gptq")), p
        if act_order:
            assert qw.perm is not None and qw.perm.shape == (k,)
            # stored column j is in group j // 32, and the sort is stable
            assert torch.equal(torch.from_numpy(raw["g_idx"]).long()[qw.perm], torch.arange(k) // 32)
            assert bool((qw.perm.view(-1, 32).diff(dim=1) > 0).all())
        else:
            assert qw.perm is None


def test_per_column_group_and_v1_zero_sixteen(tmp_path):
    """group_size -1 is one group of K; a v1 stored zero of 15 means a zero point of 16."""
    rng = np.random.default_rng(3)
    raw = make_linear(rng, 64, 96, 4, -1, False)
    raw["z"][:] = 15
    quant, _ = load_quant_weights(write_ckpt(tmp_path / "m", {LIN: raw}, 4, -1, "gptq"))
    qw = quant[f"{LIN}.weight"]
    assert qw.group == 96 and qw.scale.shape == (64, 1) and int(qw.zero.max()) == 16
    assert torch.equal(qw.dequantize(), reference(raw, v1=True))


@pytest.mark.parametrize("case, match", [
    ("missing_scales", f"'{LIN}.scales': is missing"),
    ("bad_scales", f"'{LIN}.scales': has shape \\(2, 64\\), expected \\(3, 64\\)"),
    ("bad_qzeros", f"'{LIN}.qzeros'.*expected \\(3, 8\\)"),
    ("bad_dtype", f"'{LIN}.qweight': has dtype torch.int64"),
    ("uneven_gidx", f"'{LIN}.g_idx'.*exactly 32 columns"),
    ("bits3", "bits=3 is not supported"),
    ("marlin", "format 'marlin' is not supported"),
])
def test_refuses_malformed(tmp_path, case, match):
    rng = np.random.default_rng(5)
    raw = make_linear(rng, 64, 96, 4, 32, False)
    bits, fmt, drop, extra = 4, "gptq", None, None
    if case == "missing_scales":
        drop = f"{LIN}.scales"
    elif case == "bad_scales":
        raw["scales"] = raw["scales"][:2]
    elif case == "bad_qzeros":
        extra = {f"{LIN}.qzeros": torch.zeros(3, 4, dtype=torch.int32)}
    elif case == "bad_dtype":
        extra = {f"{LIN}.qweight": torch.zeros(12, 64, dtype=torch.int64)}
    elif case == "uneven_gidx":
        raw["g_idx"][0] = 1  # group 0 has 31 columns, group 1 has 33
    elif case == "bits3":
        bits = 3
    elif case == "marlin":
        fmt = "marlin"
    folder = write_ckpt(tmp_path / "m", {LIN: raw}, 4, 32, fmt, drop=drop, extra=extra)
    if bits != 4:
        cfg = json.loads((folder / "config.json").read_text())
        cfg["quantization_config"]["bits"] = bits
        (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=match):
        load_quant_weights(folder)


def test_symmetric_8bit_has_no_zero(tmp_path):
    """v1 symmetric 8-bit stores 127 (zero 128): after the -128 shift the zero is 0 and dropped, so the
    weight qualifies for symmetric int8 kernels."""
    rng = np.random.default_rng(6)
    raw = make_linear(rng, 64, 96, 8, -1, False)
    raw["z"][:] = 127
    qw = load_quant_weights(write_ckpt(tmp_path / "m", {LIN: raw}, 8, -1, "gptq"))[0][f"{LIN}.weight"]
    assert qw.zero is None and qw.group == 96
    assert torch.equal(qw.dequantize(), reference(raw, v1=True))
