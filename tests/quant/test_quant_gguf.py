"""GGUF Q8_0 / Q4_0 / Q4_1 tensors kept quantized: bit-exact against `gguf.quants.dequantize`.

Small files are written here with `gguf.GGUFWriter` and `gguf.quants.quantize` (random weights). The
oracle is the gguf package's own numpy dequantizer applied to the raw blocks the reader returns.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFWriter, quants

from openlora.errors import ModelLoadError
from openlora.quant.formats import detect, load_quant_weights
from openlora.quant.formats.gguf_blocks import blocks_to_quant
from openlora.quant.formats.gguf_file import hf_name, load_gguf

KINDS = ("Q8_0", "Q4_0", "Q4_1")
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16  # q rows 64, k rows 32
# GGUF name -> HF-layout shape [N, K]
SHAPES = {"blk.0.ffn_up.weight": (64, 96), "blk.0.ffn_down.weight": (48, 128), "blk.1.attn_v.weight": (32, 64),
          "token_embd.weight": (40, 64), "output.weight": (40, 64)}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter permutation of q/k rows (HF -> GGUF)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, kind: str, seed: int = 0, arch: str = "llama") -> dict[str, np.ndarray]:
    """A small Llama-named GGUF with `kind` 2-D weights and an F32 norm; returns the HF-layout floats."""
    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), arch)
    w.add_block_count(2)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    qt = T[kind]
    floats: dict[str, np.ndarray] = {}
    for name, shape in SHAPES.items():
        floats[name] = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        w.add_tensor(name, quants.quantize(floats[name], qt), raw_dtype=qt)
    for name, heads in (("blk.0.attn_q.weight", HEADS), ("blk.0.attn_k.weight", KV_HEADS)):
        floats[name] = (rng.standard_normal((heads * HEAD_DIM, 64)) * 0.05).astype(np.float32)
        w.add_tensor(name, quants.quantize(_permute(floats[name], heads), qt), raw_dtype=qt)
    floats["blk.0.attn_norm.weight"] = (1 + 0.1 * rng.standard_normal(64)).astype(np.float32)
    w.add_tensor("blk.0.attn_norm.weight", floats["blk.0.attn_norm.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return floats


@pytest.mark.parametrize("kind", KINDS)
def test_blocks_bit_exact_against_gguf_dequantize(tmp_path, kind):
    write_gguf(tmp_path / "m.gguf", kind)
    reader = GGUFReader(str(tmp_path / "m.gguf"))
    seen = 0
    for t in reader.tensors:
        if t.tensor_type.name != kind:
            continue
        k, n = (int(x) for x in t.shape)
        qw = blocks_to_quant(t.data, kind, n, k, t.name)
        ref = torch.from_numpy(quants.dequantize(t.data, t.tensor_type))  # [N, K] fp32
        assert qw.shape == (n, k) == tuple(ref.shape)
        assert qw.group == 32 and qw.q.dtype == torch.int8 and qw.scale.dtype == torch.float32
        assert qw.bits == (8 if kind == "Q8_0" else 4)
        assert torch.equal(qw.dequantize(), ref), t.name
        seen += 1
    assert seen == len(SHAPES) + 2


@pytest.mark.parametrize("kind", KINDS)
def test_load_names_and_unpermutes_q_k(tmp_path, kind):
    floats = write_gguf(tmp_path / "m.gguf", kind)
    assert detect(tmp_path / "m.gguf") == "gguf"
    quant, other = load_quant_weights(tmp_path / "m.gguf")
    qt = T[kind]
    assert set(quant) == {hf_name(n) for n in floats if n != "blk.0.attn_norm.weight"}
    assert set(other) == {"model.layers.0.input_layernorm.weight"}
    assert torch.equal(other["model.layers.0.input_layernorm.weight"],
                       torch.from_numpy(floats["blk.0.attn_norm.weight"]))
    for gname, w in floats.items():
        if w.ndim != 2:
            continue
        # row-wise blocks: quantizing the permuted rows and un-permuting = quantizing the HF rows
        ref = torch.from_numpy(quants.dequantize(quants.quantize(w, qt), qt))
        assert torch.equal(quant[hf_name(gname)].dequantize(), ref), gname
    assert quant["model.layers.0.mlp.down_proj.weight"].shape == (48, 128)
    assert quant["model.layers.0.self_attn.q_proj.weight"].shape == (HEADS * HEAD_DIM, 64)


def test_codes_and_parameters_come_from_the_blocks(tmp_path):
    """Q4_0 codes are the nibbles (0..15) with zero 8; Q4_1 carries its block minimum; Q8_0 has no zero."""
    write_gguf(tmp_path / "a.gguf", "Q4_0")
    q40 = load_gguf(tmp_path / "a.gguf")[0]["model.layers.0.mlp.up_proj.weight"]
    assert int(q40.q.min()) >= 0 and int(q40.q.max()) <= 15 and q40.min is None
    assert torch.equal(q40.zero, torch.full((64, 3), 8, dtype=torch.int8))
    write_gguf(tmp_path / "b.gguf", "Q4_1")
    q41 = load_gguf(tmp_path / "b.gguf")[0]["model.layers.0.mlp.up_proj.weight"]
    assert q41.zero is None and q41.min is not None and q41.min.shape == (64, 3)
    write_gguf(tmp_path / "c.gguf", "Q8_0")
    q80 = load_gguf(tmp_path / "c.gguf")[0]["model.layers.0.mlp.up_proj.weight"]
    assert q80.zero is None and q80.min is None and q80.scale.shape == (64, 3)


def test_hf_names():
    assert hf_name("blk.3.attn_output.weight") == "model.layers.3.self_attn.o_proj.weight"
    assert hf_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert hf_name("blk.2.attn_q.bias") == "model.layers.2.self_attn.q_proj.bias"
    assert hf_name("output_norm.weight") == "model.norm.weight"
    assert hf_name("output.weight") == "lm_head.weight"
    assert hf_name("rope_freqs.weight") is None


def test_other_types_are_dequantized_into_floats(tmp_path):
    """A K-quant (Q4_K raw blocks) and F16 go to the float dict, equal to gguf's dequantizer / as stored."""
    rng = np.random.default_rng(1)
    w = GGUFWriter(str(tmp_path / "k.gguf"), "qwen2")
    blocks = rng.integers(0, 256, size=(8, 144), dtype=np.uint8)
    blocks[:, 0:4] = np.frombuffer(np.array([0.001, 0.0005], np.float16).tobytes(), np.uint8)  # d, dmin
    w.add_tensor("blk.0.ffn_up.weight", blocks.reshape(4, 2 * 144), raw_dtype=T.Q4_K)  # [4, 512]
    half = rng.standard_normal((8, 32)).astype(np.float16)
    w.add_tensor("blk.0.attn_q.weight", half)  # qwen2: no q/k permutation
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    quant, other = load_gguf(tmp_path / "k.gguf")
    assert not quant
    ref = quants.dequantize(blocks.reshape(4, 288), T.Q4_K)
    assert torch.equal(other["model.layers.0.mlp.up_proj.weight"], torch.from_numpy(ref))
    assert torch.equal(other["model.layers.0.self_attn.q_proj.weight"], torch.from_numpy(half))


def test_refuses_malformed(tmp_path):
    with pytest.raises(ModelLoadError, match="'blk.0.ffn_up.weight'.*bytes"):
        blocks_to_quant(np.zeros(33, np.uint8), "Q8_0", 1, 32, "blk.0.ffn_up.weight")
    with pytest.raises(ModelLoadError, match="'x'.*Q6_K"):
        blocks_to_quant(np.zeros(210, np.uint8), "Q6_K", 1, 256, "x")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\x00" * 12)
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        load_quant_weights(tmp_path / "junk.gguf")
    write_gguf(tmp_path / "gpt2.gguf", "Q8_0", arch="gpt2")
    with pytest.raises(ModelLoadError, match="architecture 'gpt2'"):
        load_quant_weights(tmp_path / "gpt2.gguf")
