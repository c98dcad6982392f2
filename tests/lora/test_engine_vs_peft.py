"""Ladder rung: one engine batch holding many adapters (plus base-only rows) against PEFT running
each adapter alone, fp32, at prefill and through decode steps. Tolerance 1e-4 (as the model rung)."""

from __future__ import annotations

import json

import pytest
import torch
from peft_refs import make_adapters, peft_logits
from tiny_models import load_hf

from openlora import LLM, SamplingParams

ATOL = 1e-4

# (name, LoraConfig kwargs): ranks 1..64, alphas, rslora, target subsets, all-linear, rank/alpha patterns.
ADAPTERS = [
    ("r1_qv", dict(r=1, lora_alpha=2, target_modules=["q_proj", "v_proj"])),
    ("r4_all", dict(r=4, lora_alpha=16, target_modules="all-linear")),
    ("r8_attn", dict(r=8, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])),
    ("r16_mlp", dict(r=16, lora_alpha=32, target_modules=["gate_proj", "up_proj", "down_proj"])),
    ("r64_all", dict(r=64, lora_alpha=16, target_modules="all-linear")),
    ("r8_rslora", dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "o_proj", "down_proj"])),
    ("r8_pattern", dict(r=8, lora_alpha=16, target_modules="all-linear",
                        rank_pattern={"down_proj": 2, "layers.1.self_attn.q_proj": 16}, alpha_pattern={"o_proj": 3})),
    ("r4_layer1", dict(r=4, lora_alpha=8, target_modules=["k_proj", "up_proj"], layers_to_transform=[1])),
    ("r16_regex", dict(r=16, lora_alpha=8, target_modules=r".*\.(v_proj|gate_proj)")),
]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request, tiny_model_factory, tmp_path_factory):
    path = tiny_model_factory(request.param)
    adapters = make_adapters(path, tmp_path_factory.mktemp(f"adapters_{request.param}"), ADAPTERS, 100)
    return path, adapters


def test_mixed_batch_matches_peft_per_adapter(setup, run_engine):
    path, adapters = setup
    llm = LLM(str(path), dtype="float32", block_size=4, num_kv_blocks=256, max_loras=16,
              # budget 64 < total prompt tokens: chunked prefill in the mix
              max_num_batched_tokens=64, enable_prefix_caching=False)
    for name, p in adapters.items():
        llm.register_adapter(name, str(p))
    names = list(adapters)
    # 9 adapters + 3 base-only rows, different prompt lengths, two requests share an adapter.
    specs = names + [None, None, None, names[1]]
    prompts = [[(7 * i + j) % 250 + 3 for j in range(5 + 3 * i)] for i in range(len(specs))]
    outs, rows = run_engine(llm, prompts, specs)
    for i, (spec, prompt, out) in enumerate(zip(specs, prompts, outs)):
        toks = out.outputs[0].token_ids
        ref = peft_logits(path, adapters[spec] if spec else None, prompt + toks)
        got = torch.stack(rows[i])
        want = ref[len(prompt) - 1: len(prompt) - 1 + len(toks)]
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg=lambda m: f"{spec}: {m}")
    # Base-only rows are bit-identical to the same batch run with no adapter at all: exactly zero
    # LoRA contribution (same batch shapes, so the base matmuls round identically).
    _, plain_rows = run_engine(llm, prompts, [None] * len(specs))
    for i in (9, 10, 11):
        assert torch.equal(torch.stack(plain_rows[i]), torch.stack(rows[i]))


def test_weighted_composition_equals_peft_cat(setup, run_engine):
    from peft import PeftModel

    path, adapters = setup
    a, b, c = "r4_all", "r8_attn", "r16_mlp"
    weights = [0.7, -0.4, 1.3]
    llm = LLM(str(path), dtype="float32", block_size=4, num_kv_blocks=128)
    for n in (a, b, c):
        llm.register_adapter(n, str(adapters[n]))
    prompt = [5, 17, 33, 2, 90, 11]
    outs, rows = run_engine(llm, [prompt, prompt], [list(zip((a, b, c), weights)), a])
    m = PeftModel.from_pretrained(load_hf(path), str(adapters[a]), adapter_name=a)
    m.load_adapter(str(adapters[b]), adapter_name=b)
    m.load_adapter(str(adapters[c]), adapter_name=c)
    m.add_weighted_adapter([a, b, c], weights, "mix", combination_type="cat")
    m.set_adapter("mix")
    toks = outs[0].outputs[0].token_ids
    with torch.no_grad():
        ref = m(torch.tensor([prompt + toks])).logits[0]
    torch.testing.assert_close(torch.stack(rows[0]), ref[len(prompt) - 1: len(prompt) - 1 + len(toks)],
                               atol=ATOL, rtol=0)


def test_malformed_adapters_fail_alone(setup, tmp_path):
    from openlora.errors import AdapterLoadError, AdapterNotFound

    path, adapters = setup
    llm = LLM(str(path), dtype="float32", block_size=4, num_kv_blocks=128)
    llm.register_adapter("good", str(adapters["r8_attn"]))
    # Missing weights file.
    missing = tmp_path / "missing"
    missing.mkdir()
    (missing / "adapter_config.json").write_text((adapters["r8_attn"] / "adapter_config.json").read_text())
    with pytest.raises(AdapterLoadError, match="adapter_model"):
        llm.register_adapter("missing", str(missing))
    # A feature the config claims but the tensors lack (DoRA without magnitudes) is named.
    dora = tmp_path / "dora"
    dora.mkdir()
    cfg = json.loads((adapters["r8_attn"] / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (dora / "adapter_config.json").write_text(json.dumps(cfg))
    (dora / "adapter_model.safetensors").write_bytes((adapters["r8_attn"] / "adapter_model.safetensors").read_bytes())
    with pytest.raises(AdapterLoadError, match="use_dora"):
        llm.register_adapter("dora", str(dora))
    # Wrong base model: an adapter made for a model with another hidden size.
    with pytest.raises(AdapterNotFound):
        llm.generate([[3, 4, 5]], SamplingParams(max_tokens=2), adapters="nope")
    # Everyone else is still served.
    out = llm.generate([[3, 4, 5], [6, 7]], SamplingParams(temperature=0, max_tokens=3), adapters=["good", None])
    assert all(len(o.outputs[0].token_ids) == 3 for o in out)


def test_wrong_base_model_is_rejected(setup, tiny_model_factory):
    from openlora.errors import AdapterLoadError

    _, adapters = setup
    other = tiny_model_factory("llama", hidden_size=96, layers=3)
    llm = LLM(str(other), dtype="float32", block_size=4, num_kv_blocks=64)
    with pytest.raises(AdapterLoadError, match="shape"):
        llm.register_adapter("bad", str(adapters["r4_all"]))
    assert llm.generate([[3, 4]], SamplingParams(max_tokens=2))[0].outputs[0].token_ids
