"""AutoAWQ GEMM checkpoints against the documented rule W[n, k] = s[k // g, n] * (q[k, n] - z[k // g, n]).

qweight / qzeros are packed here along N with the interleaved nibble order [0, 2, 4, 6, 1, 3, 5, 7]
(nibble i of a word holds column ORDER[i] of its 8), with plain numpy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from quant_writers import pack_awq
from safetensors.torch import save_file

from openlora.errors import ModelLoadError
from openlora.quant.formats import detect, load_quant_weights

LIN = "model.layers.0.self_attn.q_proj"


def make_linear(rng: np.random.Generator, n: int, k: int, group: int) -> dict:
    return {"q": rng.integers(0, 16, (k, n)), "z": rng.integers(0, 16, (k // group, n)),
            "scales": (rng.standard_normal((k // group, n)) * 0.01).astype(np.float16)}


def reference(raw: dict, group: int) -> torch.Tensor:
    g = np.arange(raw["q"].shape[0]) // group
    w = raw["scales"][g].astype(np.float32) * (raw["q"] - raw["z"][g]).astype(np.float32)  # [K, N]
    return torch.from_numpy(np.ascontiguousarray(w.T))


def write_ckpt(folder: Path, linears: dict[str, dict], qcfg: dict, standalone: bool = False,
               extra: dict | None = None, drop: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"model.layers.0.input_layernorm.weight": torch.ones(16)}
    for p, raw in linears.items():
        tensors[f"{p}.qweight"] = torch.from_numpy(pack_awq(raw["q"]))
        tensors[f"{p}.qzeros"] = torch.from_numpy(pack_awq(raw["z"]))
        tensors[f"{p}.scales"] = torch.from_numpy(raw["scales"])
    tensors.update(extra or {})
    if drop:
        del tensors[drop]
    save_file(tensors, str(folder / "model.safetensors"))
    if standalone:  # older AutoAWQ: quant_config.json with w_bit / q_group_size
        (folder / "quant_config.json").write_text(json.dumps(qcfg))
    else:
        (folder / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "awq", **qcfg}}))
    return folder


GEMM = {"bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}


@pytest.mark.parametrize("standalone", [False, True])
def test_bit_exact(tmp_path, standalone):
    rng = np.random.default_rng(7)
    raws = {LIN: make_linear(rng, 64, 96, 32), "model.layers.0.mlp.down_proj": make_linear(rng, 48, 128, 32)}
    qcfg = {"w_bit": 4, "q_group_size": 32, "zero_point": True, "version": "GEMM"} if standalone else GEMM
    folder = write_ckpt(tmp_path / "m", raws, qcfg, standalone)
    assert detect(folder) == "awq"
    quant, floats = load_quant_weights(folder)
    assert set(floats) == {"model.layers.0.input_layernorm.weight"}
    for p, raw in raws.items():
        qw = quant[f"{p}.weight"]
        assert qw.shape == (raw["q"].shape[1], raw["q"].shape[0]) and qw.bits == 4 and qw.group == 32
        assert qw.perm is None and qw.min is None
        assert torch.equal(qw.q, torch.from_numpy(raw["q"].T.astype(np.int8)))  # codes in logical order
        assert torch.equal(qw.dequantize(), reference(raw, 32)), p


def test_interleave_is_undone():
    """Column c of a word lives in nibble [0, 4, 1, 5, 2, 6, 3, 7][c]: nibble i of 0x76543210 holds i."""
    from openlora.quant.formats.awq import _unpack_awq

    word = torch.tensor([[0x76543210]], dtype=torch.int32)
    assert _unpack_awq(word).tolist() == [[0, 4, 1, 5, 2, 6, 3, 7]]


@pytest.mark.parametrize("case, match", [
    ("missing_scales", f"'{LIN}.scales': is missing"),
    ("bad_scales", f"'{LIN}.scales': has shape \\(3, 32\\), expected \\(3, 64\\)"),
    ("bad_qzeros", f"'{LIN}.qzeros'.*expected \\(3, 8\\)"),
    ("bits8", "bits=8 is not supported"),
    ("gemv", "version 'gemv' is not supported"),
    ("group", "96 in features are not a multiple of the group size 64"),
])
def test_refuses_malformed(tmp_path, case, match):
    raw = make_linear(np.random.default_rng(9), 64, 96, 32)
    qcfg, extra, drop = dict(GEMM), None, None
    if case == "missing_scales":
        drop = f"{LIN}.scales"
    elif case == "bad_scales":
        extra = {f"{LIN}.scales": torch.ones(3, 32, dtype=torch.float16)}
    elif case == "bad_qzeros":
        extra = {f"{LIN}.qzeros": torch.zeros(3, 4, dtype=torch.int32)}
    elif case == "bits8":
        qcfg["bits"] = 8
    elif case == "gemv":
        qcfg["version"] = "gemv"
    elif case == "group":
        qcfg["group_size"] = 64
    with pytest.raises(ModelLoadError, match=match):
        load_quant_weights(write_ckpt(tmp_path / "m", {LIN: raw}, qcfg, extra=extra, drop=drop))
