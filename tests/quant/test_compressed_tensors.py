"""compressed-tensors (llm-compressor) int-quantized and pack-quantized checkpoints against the documented rule.

    int-quantized:  W = weight_scale (any float dtype, widened) * weight (int8)
    pack-quantized: W = weight_scale * (u - 2^(bits-1)), u the unsigned fields of weight_packed packed along K
Checkpoints are packed here with plain numpy and saved with safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from quant_writers import pack_int32
from safetensors.torch import save_file

from openlora.errors import ModelLoadError
from openlora.quant.formats import detect, load_quant_weights

LIN = "model.layers.0.self_attn.k_proj"
SHAPES = {LIN: (64, 96), "model.layers.0.mlp.down_proj": (48, 128)}


def config(fmt: str, bits: int, strategy: str, group: int | None, static_input: bool = False) -> dict:
    acts = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor" if static_input else "token",
            "dynamic": not static_input}
    weights = {"num_bits": bits, "type": "int", "symmetric": True, "strategy": strategy, "group_size": group}
    return {"quant_method": "compressed-tensors", "format": fmt, "ignore": ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": acts if fmt == "int-quantized" else None}}}


def write(folder: Path, tensors: dict, qcfg: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"lm_head.weight": torch.randn(10, 16), **tensors}
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": qcfg}))
    return folder


def pack_k(u: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned [R, K] -> int32 [R, ceil(K * bits / 32)], sequential along K (zero padded)."""
    return pack_int32(u, bits, 1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_int_quantized_w8a8_channel(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    tensors, refs = {}, {}
    for p, (n, k) in SHAPES.items():
        q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        s = (torch.rand(n, 1, generator=g) * 0.01).to(dtype)
        tensors.update({f"{p}.weight": q, f"{p}.weight_scale": s, f"{p}.input_scale": torch.tensor([0.02])})
        refs[p] = s.float() * q.float()
    folder = write(tmp_path / "m", tensors, config("int-quantized", 8, "channel", None, static_input=True))
    assert detect(folder) == "compressed-tensors"
    quant, floats = load_quant_weights(folder)
    assert set(floats) == {"lm_head.weight", *(f"{p}.input_scale" for p in SHAPES)}
    for p, (n, k) in SHAPES.items():
        qw = quant[f"{p}.weight"]
        assert qw.shape == (n, k) and qw.group == k and qw.bits == 8 and qw.zero is None
        assert torch.equal(qw.dequantize(), refs[p])


def test_int_quantized_groups_and_tensor_scale(tmp_path):
    g = torch.Generator().manual_seed(1)
    q1 = torch.randint(-127, 128, (64, 96), dtype=torch.int8, generator=g)
    s1 = torch.rand(64, 3, generator=g).to(torch.bfloat16)
    q2 = torch.randint(-127, 128, (48, 128), dtype=torch.int8, generator=g)
    s2 = torch.tensor([0.003], dtype=torch.float16)  # strategy "tensor"
    folder = write(tmp_path / "m", {f"{LIN}.weight": q1, f"{LIN}.weight_scale": s1,
                                    "a.weight": q2, "a.weight_scale": s2}, config("int-quantized", 8, "group", 32))
    quant, _ = load_quant_weights(folder)
    ref1 = (s1.float().repeat_interleave(32, dim=1) * q1.float())
    assert quant[f"{LIN}.weight"].group == 32 and torch.equal(quant[f"{LIN}.weight"].dequantize(), ref1)
    assert torch.equal(quant["a.weight"].dequantize(), s2.float() * q2.float())


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_quantized_bit_exact(tmp_path, bits):
    rng = np.random.default_rng(bits)
    offset, tensors, refs = 1 << (bits - 1), {}, {}
    for p, (n, k) in {**SHAPES, "model.layers.0.mlp.gate_proj": (16, 36)}.items():  # K = 36: a padded word
        group = 12 if k == 36 else 32
        u = rng.integers(0, 2**bits, (n, k))
        s = torch.rand(n, k // group, generator=torch.Generator().manual_seed(n)).to(torch.bfloat16)
        tensors.update({f"{p}.weight_packed": torch.from_numpy(pack_k(u, bits)), f"{p}.weight_scale": s,
                        f"{p}.weight_shape": torch.tensor([n, k])})
        refs[p] = s.float().repeat_interleave(group, dim=1) * torch.from_numpy(u - offset).float()
    quant, floats = load_quant_weights(write(tmp_path / "m", tensors, config("pack-quantized", bits, "group", 32)))
    assert set(floats) == {"lm_head.weight"}
    for p, ref in refs.items():
        qw = quant[f"{p}.weight"]
        assert qw.shape == tuple(ref.shape) and qw.bits == bits and qw.zero is None
        assert int(qw.q.min()) >= -offset and int(qw.q.max()) < offset  # signed codes
        assert torch.equal(qw.dequantize(), ref), p


def test_pack_quantized_act_order_and_zero_point(tmp_path):
    """weight_g_idx gives `perm`; an asymmetric weight_zero_point (packed along N, offset 8) is subtracted."""
    rng = np.random.default_rng(11)
    n, k, group = 64, 96, 32
    u = rng.integers(0, 16, (n, k))
    order = rng.permutation(k)
    g_idx = np.empty(k, np.int32)
    g_idx[order] = np.arange(k) // group
    zu = rng.integers(0, 16, (n, k // group))  # unsigned, offset 8
    s = torch.rand(n, k // group, generator=torch.Generator().manual_seed(2))
    tensors = {f"{LIN}.weight_packed": torch.from_numpy(pack_k(u, 4)), f"{LIN}.weight_scale": s,
               f"{LIN}.weight_shape": torch.tensor([n, k]), f"{LIN}.weight_g_idx": torch.from_numpy(g_idx),
               f"{LIN}.weight_zero_point": torch.from_numpy(np.ascontiguousarray(pack_k(zu.T, 4).T))}
    quant, _ = load_quant_weights(write(tmp_path / "m", tensors, config("pack-quantized", 4, "group", group)))
    qw = quant[f"{LIN}.weight"]
    gi = torch.from_numpy(g_idx).long()
    ref = s[:, gi] * (torch.from_numpy(u - 8) - torch.from_numpy(zu - 8)[:, gi]).float()
    assert qw.perm is not None and torch.equal(gi[qw.perm], torch.arange(k) // group)
    assert torch.equal(qw.dequantize(), ref)


@pytest.mark.parametrize("case, match", [
    ("int_missing_scale", f"'{LIN}.weight_scale': is missing"),
    ("packed_missing_scale", f"'{LIN}.weight_scale': is missing"),
    ("packed_bad_shape", f"'{LIN}.weight_packed': has shape \\(64, 11\\), expected \\(64, 12\\)"),
    ("bad_scale", f"'{LIN}.weight_scale': has shape \\(64, 5\\)"),
    ("bad_weight_shape", f"'{LIN}.weight_shape': holds 3 values"),
    ("fp8", "format \\['float-quantized'\\] is not supported"),
    ("bits2", "with \\[2\\] bits are not supported"),
])
def test_refuses_malformed(tmp_path, case, match):
    packed = {f"{LIN}.weight_packed": torch.zeros(64, 12, dtype=torch.int32),
              f"{LIN}.weight_scale": torch.ones(64, 3), f"{LIN}.weight_shape": torch.tensor([64, 96])}
    qcfg = config("pack-quantized", 4, "group", 32)
    tensors: dict = packed
    if case == "int_missing_scale":
        tensors, qcfg = {f"{LIN}.weight": torch.zeros(64, 96, dtype=torch.int8)}, config("int-quantized", 8, "channel",
                                                                                          None)
    elif case == "packed_missing_scale":
        del tensors[f"{LIN}.weight_scale"]
    elif case == "packed_bad_shape":
        tensors[f"{LIN}.weight_packed"] = torch.zeros(64, 11, dtype=torch.int32)
    elif case == "bad_scale":
        tensors[f"{LIN}.weight_scale"] = torch.ones(64, 5)
    elif case == "bad_weight_shape":
        tensors[f"{LIN}.weight_shape"] = torch.tensor([64, 96, 1])
    elif case == "fp8":
        qcfg["format"] = "float-quantized"
    elif case == "bits2":
        qcfg["config_groups"]["group_0"]["weights"]["num_bits"] = 2
    with pytest.raises(ModelLoadError, match=match):
        load_quant_weights(write(tmp_path / "m", tensors, qcfg))
