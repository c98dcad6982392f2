"""Small Llama GGUF files written with the `gguf` package, one weight type per file, for the loader tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter, quants

# Dimensions: every 2-D weight's row length (the input dim) is a multiple of 256, the K-quant block.
HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 256, 512, 2, 4, 2, 64
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _byte_tokens() -> list[str]:
    """GPT-2's byte-level alphabet: one printable character per byte (the gpt2 tokenizer model's vocab)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


TOKENS = [*_byte_tokens(), "Ġt", "he", "Ġthe", *SPECIALS]
MERGES = ["Ġ t", "h e", "Ġt he"]
VOCAB = len(TOKENS)  # 262


def _q4_k_blocks(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random Q4_K blocks (144 bytes per 256 weights) with small finite fp16 scales d and dmin."""
    blocks = rng.integers(0, 256, size=(rows * cols // 256, 144), dtype=np.uint8)
    blocks[:, 0:2] = np.frombuffer(np.float16(0.0004).tobytes(), np.uint8)  # d
    blocks[:, 2:4] = np.frombuffer(np.float16(0.0002).tobytes(), np.uint8)  # dmin
    return blocks.reshape(rows, cols // 256 * 144)


def _add_weight(w: GGUFWriter, name: str, arr: np.ndarray, kind: str, rng: np.random.Generator) -> None:
    """Write `arr` ([out, in] fp32) as tensor `name` in type `kind`."""
    if kind == "F32":
        w.add_tensor(name, arr)
    elif kind == "F16":
        w.add_tensor(name, arr.astype(np.float16))
    elif kind == "Q4_K":  # the gguf package dequantizes K-quants but cannot quantize them: raw blocks
        w.add_tensor(name, _q4_k_blocks(*arr.shape, rng), raw_dtype=T.Q4_K)
    else:
        qt = T[kind]
        w.add_tensor(name, quants.quantize(arr, qt), raw_dtype=qt)


def write_tiny_llama_gguf(path: Path, kind: str = "F32", seed: int = 0, arch: str = "llama") -> Path:
    """A 2-layer Llama (hidden 256) whose 2-D weights are all of type `kind`; norms stay F32."""
    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{kind}")
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(VOCAB)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(TOKENS)
    w.add_token_types([1] * (VOCAB - len(SPECIALS)) + [3] * len(SPECIALS))  # 1 normal, 3 control
    w.add_token_merges(MERGES)
    w.add_bos_token_id(TOKENS.index("<|im_start|>"))
    w.add_eos_token_id(TOKENS.index("<|im_end|>"))
    w.add_chat_template(CHAT_TEMPLATE)

    def mat(o: int, i: int) -> np.ndarray:
        return (rng.standard_normal((o, i)) * 0.08).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    _add_weight(w, "token_embd.weight", mat(VOCAB, HIDDEN), kind, rng)
    for i in range(LAYERS):
        w.add_tensor(f"blk.{i}.attn_norm.weight", norm(HIDDEN))
        for n, o, k in (("attn_q", HEADS * HEAD_DIM, HIDDEN), ("attn_k", KV_HEADS * HEAD_DIM, HIDDEN),
                        ("attn_v", KV_HEADS * HEAD_DIM, HIDDEN), ("attn_output", HIDDEN, HEADS * HEAD_DIM),
                        ("ffn_gate", INTER, HIDDEN), ("ffn_up", INTER, HIDDEN), ("ffn_down", HIDDEN, INTER)):
            _add_weight(w, f"blk.{i}.{n}.weight", mat(o, k), kind, rng)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", norm(HIDDEN))
    w.add_tensor("output_norm.weight", norm(HIDDEN))
    _add_weight(w, "output.weight", mat(VOCAB, HIDDEN), kind, rng)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
