"""The entry point (`detect`, `load_quant_weights`) and the folded-scales report, across formats."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter, quants
from safetensors.torch import save_file

from openlora.errors import ModelLoadError
from openlora.quant.formats import detect, folded_scales, load_quant_weights, norm_fold_scales

CT = {"quant_method": "compressed-tensors", "format": "int-quantized",
      "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "int", "symmetric": True,
                                                                  "strategy": "channel"}}}}


def folder_with(tmp_path: Path, qcfg: dict | None, tensors: dict | None = None, name: str = "m") -> Path:
    f = tmp_path / name
    f.mkdir()
    cfg = {"model_type": "llama"} | ({"quantization_config": qcfg} if qcfg is not None else {})
    (f / "config.json").write_text(json.dumps(cfg))
    save_file(tensors or {"model.norm.weight": torch.ones(4)}, str(f / "model.safetensors"))
    return f


def small_gguf(path: Path) -> Path:
    w = GGUFWriter(str(path), "llama")
    w.add_head_count(2)
    w.add_tensor("blk.0.ffn_up.weight", quants.quantize(np.ones((8, 64), np.float32), T.Q8_0), raw_dtype=T.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_detect(tmp_path):
    assert detect(folder_with(tmp_path, None, name="float")) is None
    assert detect(folder_with(tmp_path, CT, name="ct")) == "compressed-tensors"
    assert detect(folder_with(tmp_path, {"quant_method": "bitsandbytes"}, name="bnb")) == "bitsandbytes"
    g = tmp_path / "gg"
    g.mkdir()
    small_gguf(g / "model-Q8_0.gguf")
    assert detect(g) == "gguf" and detect(g / "model-Q8_0.gguf") == "gguf"
    (tmp_path / "x.bin").write_bytes(b"not a gguf")
    assert detect(tmp_path / "x.bin") is None
    with pytest.raises(ModelLoadError, match="does not exist"):
        detect(tmp_path / "nowhere")


def test_load_gguf_from_folder(tmp_path):
    g = tmp_path / "gg"
    g.mkdir()
    small_gguf(g / "m.gguf")
    quant, floats = load_quant_weights(g)
    assert list(quant) == ["model.layers.0.mlp.up_proj.weight"] and not floats
    ref = quants.dequantize(quants.quantize(np.ones((8, 64), np.float32), T.Q8_0), T.Q8_0)  # fp16 d: not 1
    assert torch.equal(quant["model.layers.0.mlp.up_proj.weight"].dequantize(), torch.from_numpy(ref))


def test_load_refuses_unsupported_and_float(tmp_path):
    with pytest.raises(ModelLoadError, match="'bitsandbytes' is not supported"):
        load_quant_weights(folder_with(tmp_path, {"quant_method": "bitsandbytes"}, name="bnb"))
    with pytest.raises(ModelLoadError, match="not a quantized checkpoint"):
        load_quant_weights(folder_with(tmp_path, None, name="float"))
    bad = tmp_path / "badjson"
    bad.mkdir()
    (bad / "config.json").write_text("{nope")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        detect(bad)


def test_sharded_checkpoint(tmp_path):
    """Tensors of one linear spread over two shards listed in model.safetensors.index.json."""
    f = tmp_path / "sh"
    f.mkdir()
    (f / "config.json").write_text(json.dumps({"quantization_config": CT}))
    q = torch.randint(-127, 128, (16, 32), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    s = torch.rand(16, 1, dtype=torch.float32)
    save_file({"l.weight": q}, str(f / "a.safetensors"))
    save_file({"l.weight_scale": s, "n.weight": torch.ones(3)}, str(f / "b.safetensors"))
    (f / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"l.weight": "a.safetensors", "l.weight_scale": "b.safetensors", "n.weight": "b.safetensors"}}))
    quant, floats = load_quant_weights(f)
    assert torch.equal(quant["l.weight"].dequantize(), s * q.float()) and set(floats) == {"n.weight"}


def test_folded_scales_report(tmp_path):
    awq = folder_with(tmp_path, {"quant_method": "awq", "bits": 4, "group_size": 128}, name="awq")
    r = folded_scales(awq)
    assert r.folded is True and r.method == "awq"
    assert "self_attn.q_proj" in r.norm_fed and "mlp.down_proj" in r.hidden
    ct = folder_with(tmp_path, CT, name="ct")
    assert folded_scales(ct).folded is None  # no recipe saved: cannot tell
    (ct / "recipe.yaml").write_text("quant_stage:\n  quant_modifiers:\n    SmoothQuantModifier:\n"
                                    "      smoothing_strength: 0.8\n    GPTQModifier: {scheme: W8A8}\n")
    r = folded_scales(ct)
    assert r.folded is True and r.method == "smoothquant" and "recipe.yaml" in r.evidence
    (ct / "recipe.yaml").write_text("quant_stage:\n  quant_modifiers:\n    QuantizationModifier: {scheme: W8A8}\n")
    assert folded_scales(ct).folded is False
    gptq = folder_with(tmp_path, {"quant_method": "gptq", "bits": 4}, name="gptq")
    assert folded_scales(gptq).folded is False
    assert folded_scales(folder_with(tmp_path, None, name="float")).folded is False


def test_norm_fold_scales():
    ck = {"model.layers.0.input_layernorm.weight": torch.tensor([0.5, 2.0, 0.0]),
          "model.layers.0.post_attention_layernorm.weight": torch.tensor([1.0, 1.0, 4.0]),
          "model.norm.weight": torch.ones(3)}
    orig = {"model.layers.0.input_layernorm.weight": torch.tensor([1.0, 1.0, 0.0]),
            "model.layers.0.post_attention_layernorm.weight": torch.tensor([2.0, 1.0, 1.0])}
    s = norm_fold_scales(ck, orig)
    assert set(s) == {f"model.layers.0.{x}.weight" for x in ("self_attn.q_proj", "self_attn.k_proj",
                                                             "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")}
    assert s["model.layers.0.self_attn.v_proj.weight"].tolist() == [2.0, 0.5, 1.0]
    assert s["model.layers.0.mlp.up_proj.weight"].tolist() == [2.0, 1.0, 0.25]
    orig["model.layers.0.input_layernorm.weight"] = torch.tensor([1.0, 1.0, 3.0])
    with pytest.raises(ModelLoadError, match="zeroes a channel"):
        norm_fold_scales(ck, orig)
    del orig["model.layers.0.input_layernorm.weight"]
    with pytest.raises(ModelLoadError, match="'model.layers.0.input_layernorm.weight' is missing"):
        norm_fold_scales(ck, orig)
