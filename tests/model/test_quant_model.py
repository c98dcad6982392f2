"""A base model kept quantized (`LLM(..., quantization=...)`), checked three ways:

1. Tiny Llama and Qwen2 (q/k/v bias): for the weight-only modes the engine's fp32 logits equal transformers
   run on the dequantized weights (the same codes and scales) within 1e-4; W8A8 also quantizes the
   activations per token, so it is held to a normalized error instead (stated below).
2. LoRA stays exact on top: a mixed batch of two PEFT adapters and base rows equals PEFT on the
   dequantized base within 1e-4 (W8A16), and each row is bit-identical to its single-adapter run.
3. The real SmolLM2-135M-Instruct over real English text (teacher-forced): top-1 agreement with the
   unquantized model and the mean KL divergence, against the issue's bounds.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from engine_capture import run_engine
from tiny_models import load_hf

from openlora import LLM, SamplingParams
from openlora.model.quant_linear import quantize_for

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _dequantized_hf(path: Path, mode: str):
    """transformers' model with every base projection replaced by its quantized-then-dequantized weight."""
    m = load_hf(path)
    with torch.no_grad():
        for name, mod in m.named_modules():
            if name.split(".")[-1] in PROJ:
                mod.weight.copy_(quantize_for(mode, mod.weight.float()).dequantize())
    return m


def _engine_logits(llm: LLM, prompts: list[list[int]], adapters=None, max_tokens: int = 5):
    return run_engine(llm, prompts, adapters, max_tokens)


def _nmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).mean() / (b ** 2).mean())


PROMPTS = [[(11 * i + j) % 250 + 3 for j in range(4 + 5 * i)] for i in range(4)]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("mode", ["w8a16", "w4a16", "w8a8"])
def test_quantized_engine_equals_transformers_on_the_dequantized_weights(tiny_model_factory, arch, mode):
    path = tiny_model_factory(arch)
    llm = LLM(str(path), quantization=mode, num_kv_blocks=128, block_size=4)
    assert llm.engine.runner.model.layers[0].qkv.backend == f"quant-{mode}"
    outs, rows = _engine_logits(llm, PROMPTS)
    ref = _dequantized_hf(path, mode)
    for i, (prompt, out) in enumerate(zip(PROMPTS, outs)):
        toks = out.outputs[0].token_ids
        with torch.no_grad():
            want = ref(torch.tensor([prompt + toks])).logits[0][len(prompt) - 1:-1]
        got = torch.stack(rows[i])
        if mode == "w8a8":
            # Per-token int8 activations: ~1/127 relative steps on every projection's input; measured
            # nmse ~1e-4 on these random models, bound 2e-3.
            assert _nmse(got, want) < 2e-3, (i, _nmse(got, want))
        else:
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
            assert toks == want.argmax(-1).tolist()


def test_lora_is_exact_on_a_quantized_base(tiny_model_factory, tmp_path):
    """W8A16 base, two PEFT adapters and base rows in one batch: PEFT on the dequantized base, and each row
    bit-identical to running it alone."""
    from peft import LoraConfig, PeftModel, get_peft_model

    path = tiny_model_factory("qwen2")
    base = load_hf(path)
    ads = {}
    for i, targets in enumerate((["q_proj", "v_proj"], ["o_proj", "down_proj", "gate_proj"])):
        torch.manual_seed(40 + i)
        pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                            target_modules=targets))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.mul_(3.0)
        pm.save_pretrained(str(tmp_path / f"a{i}"))
        ads[f"a{i}"] = tmp_path / f"a{i}"
    llm = LLM(str(path), quantization="w8a16", num_kv_blocks=128, block_size=4, max_loras=4)
    for name, p in ads.items():
        llm.register_adapter(name, str(p))
    specs = ["a0", None, "a1", "a0"]
    outs, rows = _engine_logits(llm, PROMPTS, specs)
    for i, (spec, prompt, out) in enumerate(zip(specs, PROMPTS, outs)):
        toks = out.outputs[0].token_ids
        ref = _dequantized_hf(path, "w8a16")
        if spec is not None:
            ref = PeftModel.from_pretrained(ref, str(ads[spec])).eval()
        with torch.no_grad():
            want = ref(torch.tensor([prompt + toks])).logits[0][len(prompt) - 1:-1]
        torch.testing.assert_close(torch.stack(rows[i]), want, atol=1e-4, rtol=0, msg=lambda m: f"{spec}: {m}")
        _, alone = _engine_logits(llm, [prompt], [spec])
        assert all(torch.equal(a, b) for a, b in zip(rows[i], alone[0])), spec


def _real_text(tokenizer, n: int = 768) -> list[int]:
    """English from the demo's training answers (legal, pirate, json), tokenized, first n tokens."""
    import openlora.demo

    data = Path(openlora.demo.__file__).parent / "data"
    texts = [json.loads(line)["assistant"] for name in ("legal", "pirate", "json")
             for line in (data / f"{name}.jsonl").read_text().splitlines()[:25]]
    return tokenizer("\n".join(texts), add_special_tokens=False)["input_ids"][:n]


def _teacher_forced(llm: LLM, ids: list[int]) -> torch.Tensor:
    cap: list = []
    llm.engine.runner.capture_prompt_logits = cap
    try:
        llm.generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0))
    finally:
        llm.engine.runner.capture_prompt_logits = None
    return torch.cat([t for _, t in cap])  # [len(ids) - 1, vocab]


@pytest.mark.slow
def test_real_smollm2_accuracy_against_the_unquantized_model():
    """Teacher-forced over 768 tokens of real English, against the unquantized model in the same dtype (the
    issue's bounds): W8A16 top-1 agreement >= 98.5% and mean KL <= 0.002 (measured 98.7% / 0.0014); W8A8
    (int8 weights and per-token activations, both in groups of 128 or 64 columns) >= 97% and <= 0.01
    (measured 97.3% / 0.0053; per-channel weights with per-token activations measured 93.1% / 0.026)."""
    ref_llm = LLM(num_threads=2)
    ids = _real_text(ref_llm.tokenizer)
    ref = _teacher_forced(ref_llm, ids)
    del ref_llm
    logp_ref = torch.log_softmax(ref.double(), -1)
    for mode, agree_min, kl_max in (("w8a16", 0.985, 0.002), ("w8a8", 0.97, 0.01)):
        got = _teacher_forced(LLM(num_threads=2, quantization=mode), ids)
        agree = float((got.argmax(-1) == ref.argmax(-1)).double().mean())
        kl = float((logp_ref.exp() * (logp_ref - torch.log_softmax(got.double(), -1))).sum(-1).mean())
        print(f"{mode}: top-1 agreement {agree:.4f}, mean KL {kl:.5f} over {ref.shape[0]} positions")
        assert agree >= agree_min and kl <= kl_max, (mode, agree, kl)
