"""Tiny random Llama / Qwen2 models and PEFT adapters for the adapter and merge tests, and the helpers
that run the engine and a reference model side by side.

Test files get the helpers through fixtures (`save_peft`, `tiny_base`, `run_engine`, `hf_logits`):
tests/ has no __init__.py, so conftest is not importable as a module.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from engine_capture import run_engine

from openlora.config import ModelShape

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, VOCAB = 64, 128, 2, 4, 2, 128


def tiny_base(arch: str = "llama", seed: int = 0) -> torch.nn.Module:
    """A 2-layer, hidden-64 random causal LM (GQA: 4 query heads, 2 kv heads), fp32, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kw = dict(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
              num_key_value_heads=KV_HEADS, vocab_size=VOCAB, max_position_embeddings=64)
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**kw))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**kw))
    return model.float().eval()


def tiny_shape() -> ModelShape:
    head_dim = HIDDEN // HEADS
    return ModelShape(num_layers=LAYERS, hidden_size=HIDDEN, q_size=HEADS * head_dim,
                      kv_size=KV_HEADS * head_dim, intermediate_size=INTER, vocab_size=VOCAB)


def peft_model(base: torch.nn.Module, seed: int, **lora_kw: Any):
    """Wrap a deep copy of `base` with a random (init_lora_weights=False) LoRA adapter named "default"."""
    from peft import LoraConfig, get_peft_model

    lora_kw.setdefault("target_modules", ["q_proj", "v_proj"])
    cfg = LoraConfig(init_lora_weights=False, lora_dropout=0.0, task_type="CAUSAL_LM", **lora_kw)
    torch.manual_seed(seed)
    return get_peft_model(copy.deepcopy(base), cfg).eval()


def save_peft(base: torch.nn.Module, folder: Path, seed: int, **lora_kw: Any):
    """Create a random PEFT adapter and save it to `folder`; returns the PeftModel."""
    pm = peft_model(base, seed, **lora_kw)
    pm.save_pretrained(str(folder))
    return pm


def hf_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """A Hugging Face / PEFT model's logits over `ids` in one forward, [len(ids), vocab]."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.fixture(scope="session", name="run_engine")
def run_engine_fixture():
    """The `run_engine(llm, prompts, adapters, max_tokens=6) -> (outputs, rows)` helper."""
    return run_engine


@pytest.fixture(scope="session", name="hf_logits")
def hf_logits_fixture():
    """The `hf_logits(model, ids) -> [len(ids), vocab]` helper."""
    return hf_logits


@pytest.fixture(scope="session", name="save_peft")
def save_peft_fixture():
    """The `save_peft(base, folder, seed, **lora_kw)` helper."""
    return save_peft


@pytest.fixture(scope="session", name="tiny_base")
def tiny_base_fixture():
    """The `tiny_base(arch, seed)` model factory."""
    return tiny_base


@pytest.fixture(scope="module")
def llama_base() -> torch.nn.Module:
    return tiny_base("llama")


@pytest.fixture(scope="module")
def shape() -> ModelShape:
    return tiny_shape()
