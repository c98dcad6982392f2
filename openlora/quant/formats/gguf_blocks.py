"""GGUF (llama.cpp) Q8_0 / Q4_0 / Q4_1 tensors -> QuantWeight, straight from the blocks.

A 2-D GGUF tensor has dims (ne0, ne1) = (K, N): ne0, the row length, is the fastest dimension, so the
bytes are N rows of K/32 blocks each, exactly the Hugging Face [N, K] layout. Blocks of 32 weights
(ggml-common.h):
    Q8_0  34 bytes  {fp16 d; int8 qs[32]}             x = d * q
    Q4_0  18 bytes  {fp16 d; uint8 qs[16]}            x = d * (q - 8)
    Q4_1  20 bytes  {fp16 d; fp16 m; uint8 qs[16]}    x = d * q + m
In the 4-bit types the low nibble of qs[j] is element j and the high nibble element j + 16. The codes
and the fp16 parameters (widened to fp32, exactly) are taken as they are: no dequantize/re-quantize.

In a Llama GGUF every 2-D weight (token_embd, attn_q/k/v/output, ffn_gate/up/down, output) carries the
file's quantized type (mixed files keep some, often token_embd/output, in Q6_K or F16); 1-D tensors
(norms, biases) are F32.
"""

from __future__ import annotations

import numpy as np
import torch

from openlora.errors import ModelLoadError
from openlora.quant.types import QuantWeight

BLOCK = 32
QUANT_TYPES = ("Q8_0", "Q4_0", "Q4_1")  # the types kept quantized
_TYPE_SIZE = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}


def _fp16_field(blocks: np.ndarray, offset: int) -> torch.Tensor:
    """Bytes offset..offset+1 of every block as fp16, widened to fp32: [N, G] (exact)."""
    raw = np.ascontiguousarray(blocks[..., offset:offset + 2])  # [N, G, 2] uint8
    return torch.from_numpy(raw.view(np.float16)[..., 0].astype(np.float32))


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """uint8 [N, G, 16] -> codes uint8 [N, G, 32]: low nibbles are elements 0..15, high ones 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def blocks_to_quant(data: np.ndarray, type_name: str, n: int, k: int, name: str) -> QuantWeight:
    """One GGUF tensor's bytes (uint8, N rows of K/32 blocks) -> QuantWeight [N, K] with group 32."""
    if type_name not in _TYPE_SIZE:
        raise ModelLoadError(f"tensor {name!r}: GGUF type {type_name} is not kept quantized "
                             f"(supported: {', '.join(QUANT_TYPES)})")
    ts = _TYPE_SIZE[type_name]
    if k % BLOCK or data.size != n * (k // BLOCK) * ts:
        raise ModelLoadError(f"tensor {name!r}: {data.size} bytes do not hold [{n}, {k}] in {type_name} blocks")
    blocks = np.asarray(data, dtype=np.uint8).reshape(n, k // BLOCK, ts)  # [N, G, bytes]
    d = _fp16_field(blocks, 0)  # [N, G] fp32
    if type_name == "Q8_0":
        codes = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(n, k)
        return QuantWeight(q=torch.from_numpy(codes), scale=d, zero=None, bits=8, group=BLOCK)
    if type_name == "Q4_0":
        codes = _nibbles(blocks[..., 2:]).reshape(n, k).astype(np.int8)  # 0..15
        zero = torch.full((n, k // BLOCK), 8, dtype=torch.int8)
        return QuantWeight(q=torch.from_numpy(codes), scale=d, zero=zero, bits=4, group=BLOCK)
    m = _fp16_field(blocks, 2)  # Q4_1: the block minimum
    codes = _nibbles(blocks[..., 4:]).reshape(n, k).astype(np.int8)
    return QuantWeight(q=torch.from_numpy(codes), scale=d, zero=None, bits=4, group=BLOCK, min=m)
