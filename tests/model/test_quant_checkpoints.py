"""Quantized checkpoints (GPTQ, AWQ, compressed-tensors) served from their own codes, against transformers.

A tiny random Llama / Qwen2 is quantized by tests/quant_writers.py into each format; `LLM(folder)` finds the
quantization_config and serves the stored codes. The reference is transformers on the same model with every
projection replaced by its dequantized weight (the format's documented rule, computed by the writer):
weight-only schemes within 1e-4 fp32 with equal greedy tokens, W8A8 (per-token int8 activations) within a
normalized error. PEFT adapters on top must equal PEFT on the dequantized model within 1e-4; on an AWQ-style
checkpoint with scales folded into the norms, only when the original norms are given, and refused otherwise.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from engine_capture import run_engine
from peft_refs import make_adapters
from quant_writers import write_quantized
from safetensors.torch import load_file, save_file
from tiny_models import load_hf

from openlora import LLM
from openlora.errors import ModelLoadError, UnsupportedAdapter

PROMPTS = [[(11 * i + j) % 250 + 3 for j in range(4 + 5 * i)] for i in range(4)]
OPTS = dict(num_kv_blocks=128, block_size=4, max_loras=4)


def _nmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).mean() / (b ** 2).mean())


def _compare(llm: LLM, ref, prompts=PROMPTS, adapters=None, ads: dict | None = None, nmse: float | None = None) -> None:
    """Engine logits (mixed batch) against `ref` (transformers, or PEFT on it per adapter)."""
    from peft import PeftModel

    outs, rows = run_engine(llm, prompts, adapters, 5)
    specs = adapters if isinstance(adapters, list) else [adapters] * len(prompts)
    for i, (spec, prompt, out) in enumerate(zip(specs, prompts, outs)):
        toks = out.outputs[0].token_ids
        model = ref if spec is None else PeftModel.from_pretrained(copy.deepcopy(ref), str(ads[spec])).eval()
        with torch.no_grad():
            want = model(torch.tensor([prompt + toks])).logits[0][len(prompt) - 1:-1]
        got = torch.stack(rows[i])
        if nmse is not None:
            assert _nmse(got, want) < nmse, (i, _nmse(got, want))
            continue
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0, msg=lambda m: f"{spec}: {m}")
        assert toks == want.argmax(-1).tolist()


def _adapters(base_folder: Path, root: Path, targets: dict[str, list[str]]) -> dict[str, Path]:
    """One random PEFT adapter (rank 4) per name, targeting the given projections."""
    specs = [(name, dict(r=4, lora_alpha=8, target_modules=mods)) for name, mods in targets.items()]
    return make_adapters(base_folder, root, specs, 60)


def _backends(llm: LLM) -> set[str]:
    layer = llm.engine.runner.model.layers[0]
    return {lin.backend for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)}


@pytest.mark.parametrize("arch, fmt, kw, want", [
    ("llama", "gptq", dict(v1=True, shared_order=True), {"quant-w4a16"}),  # act-order, zero points, v1
    ("qwen2", "gptq", dict(v1=False, shared_order=False), None),  # one order per projection: split q/k/v
    ("llama", "awq", {}, {"quant-w4a16"}),
    ("qwen2", "ct-int4", {}, {"quant-w4a16"}),
])
def test_weight_only_checkpoint_equals_transformers(tiny_model_factory, tmp_path, arch, fmt, kw, want):
    src = tiny_model_factory(arch)
    dst = write_quantized(src, tmp_path / fmt, fmt, **kw)
    llm = LLM(str(dst), **OPTS)
    assert llm.config.quantization == "checkpoint" and llm.config.source == str(dst)
    if want is not None:
        assert _backends(llm) == want
    else:  # q/k/v and gate/up parts with different act-orders: separate quantized projections, no float
        layer = llm.engine.runner.model.layers[0]
        assert layer.qkv.backend == "split(quant-w4a16,quant-w4a16,quant-w4a16)"
        assert layer.gate_up.backend == "split(quant-w4a16,quant-w4a16)"
    _compare(llm, load_hf(tmp_path / f"{fmt}-deq"))


def test_w8a8_checkpoint_runs_the_int8_kernel(tiny_model_factory, tmp_path):
    """compressed-tensors W8A8 (per-channel int8 weights, dynamic per-token int8 activations): mode w8a8 with
    the stored codes. Activations are quantized at run time, so the bound is a normalized error: measured
    ~1e-4 on these random models (as in tests/model/test_quant_model.py), bound 2e-3."""
    src = tiny_model_factory("llama")
    dst = write_quantized(src, tmp_path / "w8a8", "ct-w8a8")
    llm = LLM(str(dst), **OPTS)
    assert _backends(llm) == {"quant-w8a8"}
    _compare(llm, load_hf(tmp_path / "w8a8-deq"), nmse=2e-3)


def test_peft_on_a_gptq_base_equals_peft_on_the_dequantized_base(tiny_model_factory, tmp_path):
    src = tiny_model_factory("qwen2")
    dst = write_quantized(src, tmp_path / "gptq", "gptq")
    ads = _adapters(src, tmp_path, {"a0": ["q_proj", "v_proj", "down_proj"], "a1": ["k_proj", "o_proj", "up_proj"]})
    llm = LLM(str(dst), **OPTS)
    for name, p in ads.items():
        llm.register_adapter(name, str(p))
    _compare(llm, load_hf(tmp_path / "gptq-deq"), adapters=["a0", None, "a1", "a0"], ads=ads)


def _fold(src: Path, seed: int = 3) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """AWQ-style folding of known scales: each RMSNorm weight divided by s and the columns of the linears it
    feeds multiplied by s; up_proj's rows divided by t and down_proj's columns multiplied by t. Returns
    (folded state, {norm name: s})."""
    state = load_file(str(src / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    scales = {}
    for name in list(state):
        for norm, linears in (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                              ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))):
            if name.endswith(f"{norm}.weight"):
                s = torch.rand(state[name].shape, generator=g) * 1.5 + 0.5
                scales[name] = s
                state[name] = state[name] / s
                layer = name[: -len(f"{norm}.weight")]
                for lin in linears:
                    state[f"{layer}{lin}.weight"] = state[f"{layer}{lin}.weight"] * s
        if name.endswith("mlp.up_proj.weight"):
            t = torch.rand(state[name].shape[0], generator=g) + 0.5
            state[name] = state[name] / t[:, None]
            down = name.replace("up_proj", "down_proj")
            state[down] = state[down] * t
    return state, scales


def _unfolded(ref: Path, src: Path, out: Path) -> Path:
    """The folded, dequantized reference with its norms back to the original ones and the norm-fed columns
    divided by c = γ_orig / γ_ckpt (the same function of the input, as PEFT adapters were trained on it).
    up/down keep their fold: it cancels inside the MLP and no adapter below targets them."""
    state, orig = load_file(str(ref / "model.safetensors")), load_file(str(src / "model.safetensors"))
    for name in [n for n in state if n.endswith("layernorm.weight")]:
        c = orig[name] / state[name]
        layer = name.rsplit(".", 2)[0]
        feeds = ("q_proj", "k_proj", "v_proj") if "input" in name else ("gate_proj", "up_proj")
        for lin in feeds:
            key = next(k for k in state if k.startswith(layer + ".") and k.endswith(f"{lin}.weight"))
            state[key] = state[key] / c
        state[name] = orig[name]
    out.mkdir()
    for f in ref.iterdir():
        if f.suffix != ".safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    save_file(state, str(out / "model.safetensors"))
    return out


def test_awq_folded_norms_corrected_with_the_original_norms(tiny_model_factory, tmp_path):
    src = tiny_model_factory("llama")
    folded, _ = _fold(src)
    dst = write_quantized(src, tmp_path / "awq", "awq", state=folded)
    ref = load_hf(_unfolded(tmp_path / "awq-deq", src, tmp_path / "unfolded"))
    ads = _adapters(src, tmp_path, {"qkg": ["q_proj", "k_proj", "gate_proj"], "v": ["v_proj"],
                                    "o": ["o_proj"], "down": ["down_proj"]})
    llm = LLM(str(dst), original_norms=str(src), **OPTS)
    llm.register_adapter("qkg", str(ads["qkg"]))
    _compare(llm, ref, adapters=["qkg", None, "qkg"], ads=ads, prompts=PROMPTS[:3])
    # v -> o and up -> down folds live inside quantized rows: those sites are refused even with the norms
    for name, site in (("v", "v_proj"), ("o", "o_proj"), ("down", "down_proj")):
        with pytest.raises(UnsupportedAdapter, match=f"cannot be served exactly.*{site}: its (input|output)"):
            llm.register_adapter(name, str(ads[name]))
    # the original norms given as one safetensors file work the same
    norms = {k: v for k, v in load_file(str(src / "model.safetensors")).items() if "layernorm" in k}
    save_file(norms, str(tmp_path / "norms.safetensors"))
    llm2 = LLM(str(dst), original_norms=str(tmp_path / "norms.safetensors"), **OPTS)
    llm2.register_adapter("qkg", str(ads["qkg"]))
    _compare(llm2, ref, adapters="qkg", ads=ads, prompts=PROMPTS[:1])


def test_awq_folded_without_the_original_norms_refuses_adapters(tiny_model_factory, tmp_path, caplog):
    src = tiny_model_factory("llama")
    dst = write_quantized(src, tmp_path / "awq", "awq", state=_fold(src)[0])
    ads = _adapters(src, tmp_path, {"q": ["q_proj"]})
    with caplog.at_level("WARNING", logger="openlora.model"):
        llm = LLM(str(dst), **OPTS)
    assert any("folded activation scales" in r.getMessage() for r in caplog.records)
    with pytest.raises(UnsupportedAdapter, match=r"q_proj: its input is input_layernorm with folded scales; give "
                                                 r"the original model's norm weights"):
        llm.register_adapter("q", str(ads["q"]))
    _compare(llm, load_hf(tmp_path / "awq-deq"), prompts=PROMPTS[:2])  # the base model itself is served


def test_malformed_and_unsupported_checkpoints_are_clear_errors(tiny_model_factory, tmp_path):
    src = tiny_model_factory("llama")
    dst = write_quantized(src, tmp_path / "gptq", "gptq")
    state = load_file(str(dst / "model.safetensors"))
    del state["model.layers.1.mlp.down_proj.scales"]
    save_file(state, str(dst / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"'model.layers.1.mlp.down_proj.scales': is missing"):
        LLM(str(dst), **OPTS)
    cfg_path = dst / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="quantization method 'bitsandbytes' is not supported"):
        LLM(str(dst), **OPTS)
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemv"}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="AWQ version 'gemv' is not supported"):
        LLM(str(dst), **OPTS)
    with pytest.raises(ModelLoadError, match="already quantized.*would dequantize and re-quantize"):
        LLM(str(dst), quantization="w8a16", **OPTS)
    with pytest.raises(ModelLoadError, match="declares no quantization"):
        LLM(str(src), quantization="checkpoint", **OPTS)
    with pytest.raises(ValueError, match="original_norms corrects LoRA inputs"):
        LLM(str(src), original_norms=str(src), **OPTS)
