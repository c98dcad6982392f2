"""LoRA on the model's ends (embed_tokens and lm_head) in mixed batches, against PEFT adapter by adapter:
fp32 logits within 1e-4 (as every LoRA rung), greedy tokens equal; the other rows of the batch are
bit-identical to a batch without these adapters. Llama (tied embeddings: the LoRA head sits beside the
shared matrix) and Qwen2 (untied)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft_refs import make_adapters, peft_logits

from openlora import LLM
from openlora.errors import UnsupportedAdapter

ATOL = 1e-4

ADAPTERS = [  # (name, LoraConfig kwargs)
    ("emb_q_head", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj", "lm_head"])),
    ("head_rslora", dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["lm_head"])),
    ("emb_only", dict(r=2, lora_alpha=4, target_modules=["embed_tokens"])),
    ("plain_qv", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request, tiny_model_factory, tmp_path_factory):
    path = tiny_model_factory(request.param)
    return path, make_adapters(path, tmp_path_factory.mktemp(f"heads_{request.param}"), ADAPTERS, 500)


def _llm(path: Path, adapters: dict[str, Path]) -> LLM:
    llm = LLM(str(path), dtype="float32", block_size=4, num_kv_blocks=256, max_loras=8, max_num_batched_tokens=64,
              enable_prefix_caching=False)
    for name, p in adapters.items():
        llm.register_adapter(name, str(p))
    return llm


def test_embedding_and_head_lora_match_peft_in_a_mixed_batch(setup, run_engine):
    path, adapters = setup
    llm = _llm(path, adapters)
    specs = [*adapters, None, "emb_q_head", None]
    prompts = [[(13 * i + j) % 250 + 3 for j in range(3 + 4 * i)] for i in range(len(specs))]
    outs, rows = run_engine(llm, prompts, specs)
    for i, (spec, prompt, out) in enumerate(zip(specs, prompts, outs)):
        toks = out.outputs[0].token_ids
        want = peft_logits(path, adapters[spec] if spec else None, prompt + toks)[len(prompt) - 1:-1]
        got = torch.stack(rows[i])
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg=lambda m: f"{spec}: {m}")
        assert toks == want.argmax(-1).tolist(), spec
    # Neighbours are untouched bit for bit: the same batch with the end-adapters' rows made base-only.
    plain_specs = [s if s == "plain_qv" else None for s in specs]
    _, plain = run_engine(llm, prompts, plain_specs)
    for i, spec in enumerate(specs):
        if spec in (None, "plain_qv"):
            assert all(torch.equal(a, b) for a, b in zip(rows[i], plain[i])), spec


def test_prompt_logprobs_see_the_head_lora(setup):
    from openlora import SamplingParams

    path, adapters = setup
    llm = _llm(path, adapters)
    prompt = [7, 19, 33, 41, 5, 88]
    out = llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0),
                       adapters=["head_rslora"])[0]
    want = torch.log_softmax(peft_logits(path, adapters["head_rslora"], prompt), -1)
    for pos in range(1, len(prompt)):
        got = out.prompt_logprobs[pos][prompt[pos]].logprob
        assert abs(got - float(want[pos - 1, prompt[pos]])) < 1e-4


def test_added_tokens_and_head_merges_are_refused(setup, tmp_path):
    from safetensors.torch import load_file, save_file

    path, adapters = setup
    llm = _llm(path, {})
    grown = tmp_path / "grown"
    grown.mkdir()
    (grown / "adapter_config.json").write_text((adapters["emb_only"] / "adapter_config.json").read_text())
    sd = load_file(str(adapters["emb_only"] / "adapter_model.safetensors"))
    key = next(k for k in sd if k.endswith("lora_embedding_A"))
    sd[key] = torch.cat([sd[key], torch.zeros(sd[key].shape[0], 3)], dim=1)  # three added tokens
    save_file(sd, str(grown / "adapter_model.safetensors"))
    # Added tokens without the resized base rows PEFT would use (tests/lora/test_saved_ends.py serves them).
    with pytest.raises(UnsupportedAdapter, match="adds 3 tokens but carries no"):
        llm.register_adapter("grown", str(grown))
    # PEFT saves a copy of a targeted end's base weight: it must be the served model's own.
    own = tmp_path / "own"
    own.mkdir()
    (own / "adapter_config.json").write_text((adapters["emb_q_head"] / "adapter_config.json").read_text())
    sd = load_file(str(adapters["emb_q_head"] / "adapter_model.safetensors"))
    base_keys = [k for k in sd if k.endswith("base_layer.weight")]
    assert base_keys  # (else this check tests nothing)
    sd[base_keys[0]] = sd[base_keys[0]] + 0.01
    save_file(sd, str(own / "adapter_model.safetensors"))
    with pytest.raises(UnsupportedAdapter, match="not the served model's"):
        llm.register_adapter("own", str(own))
    cfg = json.loads((adapters["emb_q_head"] / "adapter_config.json").read_text())
    assert "lm_head" in cfg["target_modules"]
    llm.register_adapter("emb_q_head", str(adapters["emb_q_head"]))
    llm.register_adapter("plain_qv", str(adapters["plain_qv"]))
    from openlora import SamplingParams

    merged = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, temperature=0),
                          merge={"adapters": ["emb_q_head", "plain_qv"], "strategy": "svd"})[0]
    assert merged.error and "embed_tokens or lm_head" in merged.error
