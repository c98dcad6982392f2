"""A whole GGUF file -> {HF name: QuantWeight} + {HF name: float tensor}.

Names follow what transformers' GGUF loading (which openlora/model/gguf.py converts through) produces
for llama/mistral/qwen2: `blk.{i}.attn_q.weight` -> `model.layers.{i}.self_attn.q_proj.weight`, and so on.
llama.cpp's converter permutes the rows of attn_q / attn_k for architecture "llama" (rotary halves
interleaved per head); like transformers we undo it, here by reordering rows of the codes and of the
per-row block parameters, which is exact. Q8_0/Q4_0/Q4_1 2-D tensors stay quantized; F32/F16 are
returned as stored; every other type (BF16, K-quants, ...) is dequantized to fp32 by `gguf.quants`.
Tensors with no HF counterpart (e.g. llama 3's rope_freqs) are skipped and logged.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from openlora.errors import ModelLoadError
from openlora.model.gguf import ARCHITECTURES
from openlora.quant.formats.gguf_blocks import QUANT_TYPES, blocks_to_quant
from openlora.quant.types import QuantWeight

logger = logging.getLogger("openlora.quant")

_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_BLK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_name(gguf_name: str) -> str | None:
    """GGUF tensor name -> Hugging Face parameter name (None when there is none)."""
    m = _BLK.fullmatch(gguf_name)
    if m:
        part = _BLOCK.get(m.group(2))
        return f"model.layers.{m.group(1)}.{part}.{m.group(3)}" if part else None
    base, _, kind = gguf_name.rpartition(".")
    part = _GLOBAL.get(base)
    return f"{part}.{kind}" if part and kind in ("weight", "bias") else None


def unpermute_rows(n_rows: int, n_head: int) -> torch.Tensor:
    """Row gather index undoing llama.cpp's q/k permutation: hf = gguf[idx].

    The converter wrote gguf = hf.reshape(h, 2, d/2, K).swapaxes(1, 2); the inverse reads the GGUF rows
    as [h, d/2, 2] and swaps back."""
    if n_rows % (2 * n_head):
        raise ModelLoadError(f"{n_rows} rows do not split into {n_head} heads of rotary pairs")
    return torch.arange(n_rows).reshape(n_head, n_rows // n_head // 2, 2).transpose(1, 2).reshape(n_rows)


def _rows(qw: QuantWeight, idx: torch.Tensor) -> QuantWeight:
    """The same weight with its output rows gathered by idx (codes and every per-row parameter)."""
    def pick(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[idx].contiguous()

    return QuantWeight(q=pick(qw.q), scale=pick(qw.scale), zero=pick(qw.zero), bits=qw.bits, group=qw.group,
                       min=pick(qw.min), perm=qw.perm)


def _field(reader: Any, key: str) -> Any:
    """A metadata value (None when absent)."""
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def load_gguf(path: Path) -> tuple[dict[str, QuantWeight], dict[str, torch.Tensor]]:
    """Read every tensor of a GGUF file (module docstring)."""
    from gguf import GGMLQuantizationType, GGUFReader, quants

    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # bad magic, truncated tables, unknown type codes: gguf raises several kinds
        raise ModelLoadError(f"{path} is not a readable GGUF file: {type(e).__name__}: {e}") from e
    arch = str(_field(reader, "general.architecture") or "")
    if arch not in ARCHITECTURES:
        raise ModelLoadError(f"{path}: GGUF architecture {arch!r} is not supported (supported: "
                             f"{', '.join(ARCHITECTURES)})")
    n_head = _field(reader, f"{arch}.attention.head_count")
    n_kv = _field(reader, f"{arch}.attention.head_count_kv") or n_head
    quant: dict[str, QuantWeight] = {}
    floats: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            logger.info("%s: GGUF tensor %s has no Hugging Face counterpart; skipped", path, t.name)
            continue
        tname = t.tensor_type.name
        dims = [int(x) for x in t.shape]  # (ne0, ne1, ...): ne0 = K is the fastest
        if tname in QUANT_TYPES and len(dims) == 2:
            try:
                value: QuantWeight | torch.Tensor = blocks_to_quant(t.data, tname, dims[1], dims[0], name)
            except ValueError as e:
                raise ModelLoadError(f"{path}: tensor {t.name!r} ({tname}): {e}") from e
        elif t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            value = torch.from_numpy(np.array(t.data))  # a copy: the reader's arrays map the file
        else:
            value = torch.from_numpy(quants.dequantize(t.data, t.tensor_type).astype(np.float32))
        if arch == "llama" and n_head and (".attn_q." in t.name or ".attn_k." in t.name):
            heads = int(n_head) if ".attn_q." in t.name else int(n_kv)
            idx = unpermute_rows(dims[-1] if len(dims) == 2 else dims[0], heads)
            value = _rows(value, idx) if isinstance(value, QuantWeight) else value[idx].contiguous()
        (quant if isinstance(value, QuantWeight) else floats)[name] = value  # type: ignore[index]
    return quant, floats
