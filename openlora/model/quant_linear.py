"""Base projections kept quantized (`LLM(..., quantization=...)`, `openlora serve --quantization`).

The float weights are quantized once at load and only the packed codes stay resident
(openlora.kernels.quant_gemm):
    w8a16  int8 in groups of 64 input columns, activations in the model dtype. Measured on
           SmolLM2-135M-Instruct (tests/model/test_quant_model.py): per output channel 97.5% top-1
           agreement and KL 0.0027, short of the 98.5% / 0.002 target; groups of 64: 98.7% / 0.0014 at
           1.125 bytes per weight resident (0.56x bf16); groups of 32: 99.1% / 0.0012 but 0.625x bf16.
    w4a16  int4 in groups of 128 input columns (64 or 32 where the width is not a multiple of 128)
    w8a8   int8 in groups of 128 input columns (64 or 32 where the width is not a multiple of 128), the
           activations quantized at run time per token and per group of the same columns (int32 sums per
           group). Measured on SmolLM2-135M-Instruct (teacher-forced, 2,048 tokens of the demo's text,
           against fp32): per-channel weights and per-token activations 92.9% top-1 / KL 0.026 (per-channel
           int8 weights alone already cost 2.4%: 97.6% / 0.0027); SmoothQuant-style smoothing (alpha 0.5,
           calibrated) 96.0% / 0.011; these groups, with no calibration, 97.4% / 0.0051.
    gguf   a GGUF file's own Q8_0 / Q4_0 / Q4_1 codes (openlora.quant.formats), served as they are by the
           w8a16 / w4a16 kernels: no dequantize and re-quantize round trip (other tensor types stay float)
    checkpoint  a GPTQ / AWQ / compressed-tensors folder's own codes (openlora.model.stored_quant), each
           projection in the mode its layout fits (mode_for; compressed-tensors int8 activations: w8a8)
LoRA stays exact on top: the adapters' deltas are computed by SGMV from the unquantized activation, as
on a float base, so only the base projection carries the quantization error.
"""

from __future__ import annotations

import torch

from openlora.kernels import quant_gemm
from openlora.quant.quantize import quantize_int4_groups, quantize_int8_groups
from openlora.quant.types import QuantWeight

MODES = quant_gemm.MODES


def quantize_for(mode: str, w: torch.Tensor) -> QuantWeight:
    """W [N, K] float -> the QuantWeight `mode` serves (module docstring)."""
    if mode == "w4a16":
        return quantize_int4_groups(w, _group(w.shape[1], (128, 64, 32)))
    if mode == "w8a16":
        return quantize_int8_groups(w, _group(w.shape[1], (64, 32)))
    if mode == "w8a8":  # activations are grouped like the weights (the kernel's int32 sums are per group)
        return quantize_int8_groups(w, _group(w.shape[1], (128, 64, 32)))
    raise ValueError(f"quantization must be one of {', '.join(MODES)}, got {mode!r}")


def mode_for(qw: QuantWeight) -> str:
    """The A16 kernel that serves a checkpoint's own codes (GGUF Q8_0: w8a16; Q4_0 / Q4_1: w4a16)."""
    return "w4a16" if qw.bits == 4 else "w8a16"


def cat_rows(parts: list[QuantWeight]) -> QuantWeight | None:
    """Stack the output rows of several quantized weights (fused q/k/v, gate/up), or None when they do
    not share one layout (bits, group, column order). Parts with one act-order permutation fuse: q/k/v and
    gate/up read the same input, so GPTQ's desc_act gives them the same order."""
    first = parts[0]
    if any(p.bits != first.bits or p.group != first.group for p in parts):
        return None
    if first.perm is None:
        if any(p.perm is not None for p in parts):
            return None
    elif any(p.perm is None or not torch.equal(p.perm, first.perm) for p in parts):
        return None
    if len(parts) == 1:
        return first

    def cat(name: str, fill: float) -> torch.Tensor | None:
        ts = [getattr(p, name) for p in parts]
        if all(t is None for t in ts):
            return None
        return torch.cat([t.float() if t is not None else torch.full_like(p.scale, fill)
                          for t, p in zip(ts, parts)])

    return QuantWeight(q=torch.cat([p.q for p in parts]), scale=torch.cat([p.scale.float() for p in parts]),
                       zero=cat("zero", 0.0), bits=first.bits, group=first.group, min=cat("min", 0.0),
                       perm=first.perm)


def _group(k: int, sizes: tuple[int, ...]) -> int:
    """The first group size that divides the input width k."""
    g = next((g for g in sizes if k % g == 0), None)
    if g is None:
        raise ValueError(f"quantized groups need an input width that is a multiple of {sizes[-1]}, got {k}")
    return g


class QuantLinear:
    """y = x @ W^T + b for x [T, in] with W kept quantized; the interface of openlora.model.linear.Linear.
    CPU weights run the C++ kernels (openlora.kernels.quant_gemm), CUDA weights the Triton ones
    (openlora.kernels.triton_quant), with the same semantics."""

    def __init__(self, qw: QuantWeight, bias: torch.Tensor | None, mode: str) -> None:
        self.out_features, self.in_features = qw.shape
        self.bias = bias
        # ||W_o||^2 of the served (dequantized) weights: DoRA's norm must see what is served.
        self.row_sq = qw.dequantize().pow(2).sum(1)
        if qw.q.is_cuda:
            from openlora.kernels import triton_quant

            self.backend = f"triton-{mode}"
            self.weight = packed = triton_quant.pack(qw, mode, qw.q.device)
            self._fn = lambda x: triton_quant.linear(x, packed, bias)
        else:
            self.backend = f"quant-{mode}"
            self.weight = packed = quant_gemm.pack(qw, mode)
            self._fn = lambda x: quant_gemm.linear(x, packed, bias)
        self.nbytes = packed.nbytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(x)
