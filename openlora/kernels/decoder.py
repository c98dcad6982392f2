"""The decoder layer loop in C++ for row-wise steps (csrc/decoder_cpu.cpp).

A step whose query rows all go to the paged attention kernel (decode tokens, short prompt chunks; see
openlora.worker.model_runner.FUSED_PREFILL_MAX_TOKENS) runs every layer in one call, LoRA deltas included
when the SGMV backend is the C++ one: the same kernels in the same order as LlamaModel's Python loop
(bit-identical results), without the Python and pybind work between the ~10 kernel calls per layer (~17
with LoRA). Other steps (long prompt chunks through SDPA, other LoRA backends, non-CPU devices, linear
backends other than our packed kernels) keep the Python loop.

    stack = DecoderStack(backend, num_heads, num_kv_heads, head_dim, intermediate, eps, scale, window, final_norm)
    stack.add_layer(input_norm, post_norm, qkv, qkv_bias, o, gate_up, down, k_cache, v_cache)  # per layer
    stack.forward(h, cos, sin, slots, block_table, seq_lens) -> final-normed hidden [T, hidden]
    stack.forward_lora(h, cos, sin, slots, block_table, seq_lens, token_idx, seg_indptr, sites, mm_min_tokens)
        sites: per LORA_SITES entry None or [a, bt, row_idx, row_indptr, row_scale] (pool tensors of all layers)

KernelConfig(layer_loop="python") (`--kernels layer_loop=python`) keeps the Python loop for every step
(A/B runs, debugging); openlora.kernels.select decides.
"""

from __future__ import annotations

import functools
from types import ModuleType

from openlora.kernels.build import build_extension, try_build

# The kernel sources the unity build compiles in (their contents name the module: see build_extension).
_INCLUDES = ("gemm_avx512.cpp", "gemm_amx.cpp", "fused_ops_cpu.cpp", "paged_attention_cpu.cpp", "sgmv_cpu.cpp")
BACKENDS = ("f32-panels", "bf16-panels", "amx")


def load_extension() -> ModuleType:
    """The compiled module; -ffp-contract=off as the fused ops need (see fused_ops.load_extension)."""
    return build_extension("decoder", "decoder_cpu.cpp", "decoder loop", ("-ffp-contract=off",), _INCLUDES)


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether the C++ loop builds here; logs the reason once when it cannot."""
    return try_build(load_extension, "decoder loop", "the decoder layers run in the Python loop")
