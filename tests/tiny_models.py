"""Tiny random Hugging Face models (saved to disk with a real tokenizer) for parity tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, PreTrainedTokenizerFast, Qwen2Config

VOCAB = 256
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}assistant : {% endif %}")

ARCHS = {
    # GQA, tied embeddings
    "llama": (LlamaConfig, dict(tie_word_embeddings=True)),
    # sliding window smaller than the test sequences is not used: window 4096
    "mistral": (MistralConfig, dict(tie_word_embeddings=False, sliding_window=4096)),
    # q/k/v bias, untied
    "qwen2": (Qwen2Config, dict(tie_word_embeddings=False, use_sliding_window=False)),
    # Llama-3 rope scaling and an explicit head_dim different from hidden/heads
    "llama3": (LlamaConfig, dict(tie_word_embeddings=False, head_dim=24, rope_theta=500000.0,
                                 rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
}


def write_tokenizer(path: Path, vocab: int = VOCAB) -> None:
    """A word-level tokenizer whose vocabulary covers every model id (t0 .. t{vocab-1})."""
    words = {"<s>": 0, "</s>": 1, "<unk>": 2}
    for i in range(3, vocab):
        words[f"t{i}"] = i
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)


def make_tiny_model(path: Path, arch: str = "llama", *, seed: int = 0, layers: int = 2, **over) -> Path:
    """Save a random-init model of `arch` (see ARCHS) with a tokenizer into `path`."""
    cls, extra = ARCHS[arch]
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
              bos_token_id=0, eos_token_id=1, pad_token_id=None)
    kw.update(extra)
    kw.update(over)
    cfg = cls(**kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    with torch.no_grad():  # larger-than-default init so logits are not all near zero
        for p in model.parameters():
            if p.dim() >= 1:
                p.normal_(0.0, 0.08)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.8, 1.2)
    model.save_pretrained(path, safe_serialization=True)
    write_tokenizer(path)
    cfgj = json.loads((path / "config.json").read_text())
    assert cfgj["architectures"][0] in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
    return path


def load_hf(path: Path, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype).eval()
