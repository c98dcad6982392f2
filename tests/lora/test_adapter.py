"""PEFT adapter parsing (openlora.lora.adapter) against PEFT's own LoRA layers."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from openlora.config import LORA_SITES, ModelShape
from openlora.errors import AdapterLoadError, UnsupportedAdapter
from openlora.lora.adapter import LoRAAdapter, LoRAModule, infer_shape, load_peft_adapter, save_peft_adapter

TOL = dict(atol=1e-5, rtol=1e-5)


def peft_lora_layers(pm) -> dict[tuple[int, str], torch.nn.Module]:
    """(layer, site) -> PEFT LoraLayer wrapping that projection."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for i, layer in enumerate(pm.base_model.model.model.layers):
        for site in LORA_SITES:
            parent = layer.self_attn if hasattr(layer.self_attn, site) else layer.mlp
            mod = getattr(parent, site)
            if isinstance(mod, LoraLayer) and "default" in mod.lora_A:
                out[(i, site)] = mod
    return out


def assert_matches_peft(adapter: LoRAAdapter, pm) -> None:
    """Every module's `x @ (scaling * B A)^T` equals PEFT's `lora_layer(x) - base_layer(x)`."""
    layers = peft_lora_layers(pm)
    assert set(adapter.modules) == set(layers)
    g = torch.Generator().manual_seed(1)
    for key, mod in layers.items():
        x = torch.randn(5, mod.in_features, generator=g)  # [tokens, in_features]
        with torch.no_grad():
            want = mod(x) - mod.base_layer(x)  # [tokens, out_features]
        got = x @ adapter.modules[key].delta_weight().T
        torch.testing.assert_close(got, want, **TOL)
        assert adapter.modules[key].scaling == pytest.approx(mod.scaling["default"])


CASES = [
    dict(lora_alpha=16),
    dict(lora_alpha=7, use_rslora=True),
    dict(lora_alpha=32, target_modules="all-linear"),
    dict(lora_alpha=8, target_modules=r".*\.(q_proj|down_proj)"),
    dict(lora_alpha=4, target_modules=["q_proj", "k_proj", "gate_proj"], layers_to_transform=[1]),
    dict(lora_alpha=4, target_modules=["o_proj", "up_proj"], layers_to_transform=[0], layers_pattern="layers"),
    dict(lora_alpha=16, target_modules="all-linear",
         rank_pattern={"q_proj": 2, "model.layers.1.mlp.down_proj": 3},
         alpha_pattern={"v_proj": 5, "layers.0.mlp.up_proj": 9}),
]


@pytest.mark.parametrize("r", [1, 4, 8, 16, 64])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_load_matches_peft_llama(save_peft, tmp_path: Path, llama_base, shape: ModelShape, r: int,
                                 case: int) -> None:
    kw = dict(CASES[case])
    if r in (1, 64) and case not in (0, 1, 6):
        pytest.skip("extreme ranks run on the main cases only (keeps the suite small)")
    pm = save_peft(llama_base, tmp_path, seed=r + case, r=r, **kw)
    adapter = load_peft_adapter(tmp_path, "a", shape)
    assert_matches_peft(adapter, pm)
    assert adapter.adapter_id == "a" and adapter.path == str(tmp_path)
    assert adapter.config["r"] == r


def test_load_matches_peft_qwen2(save_peft, tiny_base, tmp_path: Path, shape: ModelShape) -> None:
    base = tiny_base("qwen2")
    pm = save_peft(base, tmp_path, seed=3, r=8, lora_alpha=16, target_modules="all-linear", use_rslora=True)
    assert_matches_peft(load_peft_adapter(tmp_path, "q", shape), pm)


def test_load_bin_and_adapter_name_infix(save_peft, tmp_path: Path, llama_base, shape: ModelShape) -> None:
    pm = save_peft(llama_base, tmp_path / "bin", seed=4, r=4, lora_alpha=8)
    pm.save_pretrained(str(tmp_path / "bin"), safe_serialization=False)
    (tmp_path / "bin" / "adapter_model.safetensors").unlink()
    assert (tmp_path / "bin" / "adapter_model.bin").is_file()
    from_bin = load_peft_adapter(tmp_path / "bin", "b", shape)
    assert_matches_peft(from_bin, pm)

    # Keys with an adapter-name infix (`lora_A.default.weight`) parse to the same modules.
    pm.save_pretrained(str(tmp_path / "st"))
    sd = load_file(str(tmp_path / "st" / "adapter_model.safetensors"))
    sd = {k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v for k, v in sd.items()}
    save_file(sd, str(tmp_path / "st" / "adapter_model.safetensors"))
    infix = load_peft_adapter(tmp_path / "st", "c", shape)
    assert_matches_peft(infix, pm)
    assert infix.content_hash == from_bin.content_hash


def test_helpers_and_content_hash(save_peft, tmp_path: Path, llama_base, shape: ModelShape) -> None:
    save_peft(llama_base, tmp_path / "a", seed=5, r=8, lora_alpha=16, target_modules="all-linear",
              rank_pattern={"k_proj": 2, "model.layers.1.self_attn.q_proj": 12})
    a = load_peft_adapter(tmp_path / "a", "a", shape)
    assert a.site_rank("q_proj") == 12 and a.site_rank("k_proj") == 2 and a.site_rank("down_proj") == 8
    assert a.sites == LORA_SITES and a.num_layers == 2 and a.max_rank == 12
    assert a.nbytes == sum(4 * (m.a.numel() + m.b.numel()) for m in a.modules.values())
    assert all(m.a.dtype == torch.float32 and m.b.dtype == torch.float32 for m in a.modules.values())

    # Renaming (id and folder) does not change the hash.
    renamed = load_peft_adapter(tmp_path / "a", "other-name", shape)
    assert renamed.content_hash == a.content_hash
    # Changing alpha or one weight does.
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    cfg["lora_alpha"] = 17
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    assert load_peft_adapter(tmp_path / "a", "a", shape).content_hash != a.content_hash
    mods = {k: LoRAModule(m.a.clone(), m.b.clone(), m.scaling) for k, m in a.modules.items()}
    mods[(0, "q_proj")].b[0, 0] += 1e-3
    assert LoRAAdapter("a", None, {}, None, mods).content_hash != a.content_hash
    partial = {k: m for k, m in a.modules.items() if k[1] == "q_proj"}
    assert LoRAAdapter("p", None, {}, None, partial).sites == ("q_proj",)
    assert LoRAAdapter("p", None, {}, None, partial).site_rank("v_proj") == 0


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("kw", [
    dict(r=8, lora_alpha=16, target_modules="all-linear",
         rank_pattern={"q_proj": 2, "model.layers.1.mlp.down_proj": 3}, alpha_pattern={"v_proj": 5}),
    dict(r=4, lora_alpha=3, use_rslora=True, target_modules=["q_proj", "down_proj"]),
    dict(r=4, lora_alpha=8, target_modules=["k_proj", "up_proj"], layers_to_transform=[1]),
])
def test_save_round_trip_through_peft(save_peft, tmp_path: Path, llama_base, shape: ModelShape,
                                      kw: dict) -> None:
    from peft import PeftModel

    pm = save_peft(llama_base, tmp_path / "src", seed=6, **kw)
    adapter = load_peft_adapter(tmp_path / "src", "a", shape)
    save_peft_adapter(adapter, tmp_path / "out", base_model_name_or_path="tiny-llama")
    reloaded = PeftModel.from_pretrained(copy.deepcopy(llama_base), str(tmp_path / "out")).eval()
    assert_matches_peft(adapter, reloaded)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(reloaded, ids), _logits(pm, ids), **TOL)
    ours = load_peft_adapter(tmp_path / "out", "a2", shape)
    assert ours.content_hash == adapter.content_hash
    assert ours.base_model_name_or_path == "tiny-llama"


def test_save_mixed_layer_coverage(tmp_path: Path, llama_base, shape: ModelShape) -> None:
    """Sites covering different layers are written as a regex target_modules that PEFT honours."""
    from peft import PeftModel

    g = torch.Generator().manual_seed(2)
    mods = {
        (0, "q_proj"): LoRAModule(torch.randn(3, 64, generator=g), torch.randn(64, 3, generator=g), 0.5),
        (1, "q_proj"): LoRAModule(torch.randn(5, 64, generator=g), torch.randn(64, 5, generator=g), 1.25),
        (1, "down_proj"): LoRAModule(torch.randn(3, 128, generator=g), torch.randn(64, 3, generator=g), 0.5),
    }
    adapter = LoRAAdapter("m", None, {}, "tiny", mods)
    save_peft_adapter(adapter, tmp_path)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(llama_base), str(tmp_path)).eval()
    assert_matches_peft(adapter, reloaded)


# ----------------------------------------------------------------------------------- rejections


def _write_config(folder: Path, **changes) -> None:
    p = folder / "adapter_config.json"
    cfg = json.loads(p.read_text())
    cfg.update(changes)
    p.write_text(json.dumps(cfg))


@pytest.fixture()
def good(save_peft, tmp_path: Path, llama_base) -> Path:
    save_peft(llama_base, tmp_path, seed=7, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return tmp_path


@pytest.mark.parametrize("change, feature", [
    (dict(bias="lora_only"), "bias"),
    (dict(modules_to_save=["score"]), "modules_to_save"),
    (dict(target_modules=["q_proj", "fc1"]), "fc1"),
    (dict(peft_type="IA3"), "IA3"),
])
def test_rejects_unsupported_config(good: Path, shape: ModelShape, change: dict, feature: str) -> None:
    _write_config(good, **change)
    with pytest.raises(UnsupportedAdapter, match=feature):
        load_peft_adapter(good, "x", shape)


@pytest.mark.parametrize("suffix, feature", [
    ("self_attn.q_proj.lora_B.bias", "lora_bias"),
    ("mlp.fc1.lora_A.weight", "fc1"),
])
def test_rejects_unsupported_keys(good: Path, shape: ModelShape, suffix: str, feature: str) -> None:
    p = good / "adapter_model.safetensors"
    sd = load_file(str(p))
    sd[f"base_model.model.model.layers.0.{suffix}"] = torch.zeros(4)
    save_file(sd, str(p))
    with pytest.raises(UnsupportedAdapter, match=feature):
        load_peft_adapter(good, "x", shape)


def test_embedding_and_head_tensors_load_as_heads(save_peft, tmp_path: Path, llama_base,
                                                  shape: ModelShape) -> None:
    """LoRA on embed_tokens and lm_head loads into `heads` (the model's ends), beside the layer modules;
    the shapes follow PEFT (embedding: A [r, vocab], B [hidden, r]; head: A [r, hidden], B [vocab, r])."""
    save_peft(llama_base, tmp_path / "e", seed=8, r=4, lora_alpha=8, target_modules=r".*(q_proj|embed_tokens)")
    ad = load_peft_adapter(tmp_path / "e", "x", shape)
    assert set(ad.heads) == {"embed_tokens"} and ad.modules
    assert ad.heads["embed_tokens"].a.shape == (4, shape.vocab_size)
    save_peft(llama_base, tmp_path / "h", seed=8, r=4, lora_alpha=8, target_modules=r".*(v_proj|lm_head)")
    ad = load_peft_adapter(tmp_path / "h", "x", shape)
    assert set(ad.heads) == {"lm_head"} and ad.heads["lm_head"].b.shape == (shape.vocab_size, 4)
    assert ad.content_hash != load_peft_adapter(tmp_path / "e", "x", shape).content_hash



def test_dora_config_and_tensors_must_agree(save_peft, tmp_path: Path, llama_base, shape: ModelShape) -> None:
    """DoRA loads (its magnitudes kept per module); magnitudes without use_dora, use_dora without
    magnitudes, or a magnitude of the wrong length fail that adapter with the key named."""
    save_peft(llama_base, tmp_path / "d", seed=8, r=4, lora_alpha=8, use_dora=True)
    ad = load_peft_adapter(tmp_path / "d", "x", shape)
    assert ad.dora and all(m.magnitude is not None and m.magnitude.shape == m.b.shape[:1] for m in ad.modules.values())
    _write_config(tmp_path / "d", use_dora=False)  # the magnitude tensors alone are refused
    with pytest.raises(AdapterLoadError, match="lora_magnitude_vector"):
        load_peft_adapter(tmp_path / "d", "x", shape)
    save_peft(llama_base, tmp_path / "p", seed=8, r=4, lora_alpha=8)
    _write_config(tmp_path / "p", use_dora=True)
    with pytest.raises(AdapterLoadError, match="no lora_magnitude_vector"):
        load_peft_adapter(tmp_path / "p", "x", shape)
    p = tmp_path / "d" / "adapter_model.safetensors"
    _write_config(tmp_path / "d", use_dora=True)
    sd = load_file(str(p))
    key = next(k for k in sd if "magnitude" in k)
    sd[key] = sd[key][:-1]
    save_file(sd, str(p))
    with pytest.raises(AdapterLoadError, match="expected"):
        load_peft_adapter(tmp_path / "d", "x", shape)


def test_missing_files_and_bad_json(tmp_path: Path, good: Path, shape: ModelShape) -> None:
    with pytest.raises(AdapterLoadError, match="does not exist"):
        load_peft_adapter(tmp_path / "nope", "x", shape)
    (good / "adapter_model.safetensors").rename(good / "moved.safetensors")
    with pytest.raises(AdapterLoadError, match="neither adapter_model.safetensors nor adapter_model.bin"):
        load_peft_adapter(good, "x", shape)
    (good / "moved.safetensors").rename(good / "adapter_model.safetensors")
    (good / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterLoadError, match="not valid JSON"):
        load_peft_adapter(good, "x", shape)
    (good / "adapter_config.json").unlink()
    with pytest.raises(AdapterLoadError, match="no adapter_config.json"):
        load_peft_adapter(good, "x", shape)


def test_corrupt_weights(good: Path, shape: ModelShape) -> None:
    (good / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(AdapterLoadError, match="cannot read adapter weights"):
        load_peft_adapter(good, "x", shape)


def test_shape_errors_name_file_key_and_shapes(good: Path, shape: ModelShape) -> None:
    wrong = ModelShape(num_layers=2, hidden_size=64, q_size=64, kv_size=16, intermediate_size=128, vocab_size=128)
    with pytest.raises(AdapterLoadError) as e:
        load_peft_adapter(good, "x", wrong)
    msg = str(e.value)
    assert "adapter_model.safetensors" in msg and "v_proj.lora_B.weight" in msg
    assert "(32, 4)" in msg and "(16, 4)" in msg
    one_layer = ModelShape(1, 64, 64, 32, 128, 128)
    with pytest.raises(AdapterLoadError, match=r"layer 1 does not exist \(the model has 1 layers\)"):
        load_peft_adapter(good, "x", one_layer)
    # A rank that disagrees with the config's r is a shape error too.
    _write_config(good, r=8)
    with pytest.raises(AdapterLoadError, match=r"shape \(4, 64\), expected \(8, 64\)"):
        load_peft_adapter(good, "x", shape)


def test_missing_partner_tensor(good: Path, shape: ModelShape) -> None:
    p = good / "adapter_model.safetensors"
    sd = load_file(str(p))
    del sd["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    save_file(sd, str(p))
    with pytest.raises(AdapterLoadError, match="no matching lora_B"):
        load_peft_adapter(good, "x", shape)


def test_base_model_mismatch_is_only_a_warning(good: Path, shape: ModelShape, caplog) -> None:
    _write_config(good, base_model_name_or_path="org/model-a")
    with caplog.at_level(logging.WARNING, logger="openlora.lora.adapter"):
        a = load_peft_adapter(good, "x", shape, expected_base_model="org/model-b")
    assert a.base_model_name_or_path == "org/model-a"
    assert "org/model-b" in caplog.text and "org/model-a" in caplog.text


def test_untargeted_tensors_are_ignored_like_peft(good: Path, shape: ModelShape) -> None:
    _write_config(good, target_modules=["q_proj"])
    a = load_peft_adapter(good, "x", shape)
    assert a.sites == ("q_proj",)


def test_infer_shape(save_peft, tmp_path: Path, llama_base, shape: ModelShape) -> None:
    save_peft(llama_base, tmp_path / "a", seed=9, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    save_peft(llama_base, tmp_path / "b", seed=9, r=2, lora_alpha=8, target_modules=["v_proj"])
    got = infer_shape([tmp_path / "a", tmp_path / "b"])
    assert got == ModelShape(2, 64, 64, 32, 128, 0)
    only_q = infer_shape([tmp_path / "b"])
    assert only_q.kv_size == 32 and only_q.intermediate_size == 0
    (tmp_path / "c").mkdir()
    sd = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    save_file({k: torch.cat([v, v], dim=-1) if "lora_A" in k else v for k, v in sd.items()},
              str(tmp_path / "c" / "adapter_model.safetensors"))
    (tmp_path / "c" / "adapter_config.json").write_text((tmp_path / "b" / "adapter_config.json").read_text())
    with pytest.raises(AdapterLoadError, match="disagree"):
        infer_shape([tmp_path / "a", tmp_path / "c"])
