"""bf16 linear layers on Intel AMX tiles (C++ extension), for the small-M matmuls of decode steps.

    pack(w [N, K] bf16) -> packed weight (tile layout, made once at load time)
    linear(x [M, K] bf16, packed, bias [N] | None, n=N) -> x @ w^T + bias, [M, N] bf16

Products and sums in fp32, one rounding to bf16 at the end (as torch's bf16 F.linear); the sum order
differs from oneDNN's, so results agree to bf16 rounding, not bit for bit. The layout and the blocking
are described in csrc/gemm_amx.cpp. `available()` is False on CPUs without AMX-BF16 (or when the OS
refuses the tile state); callers then keep oneDNN's packed linear.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch

from openlora.kernels.build import build_extension, try_build


def load_extension() -> ModuleType:
    """The compiled module (see openlora.kernels.build)."""
    return build_extension("gemm_amx", "gemm_amx.cpp", "AMX GEMM")


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether the extension builds and this CPU/OS run AMX bf16 tiles (checked once per process)."""
    return try_build(load_extension, "AMX GEMM", "using oneDNN for bf16 matmuls") and bool(load_extension().available())


def pack(w: torch.Tensor) -> torch.Tensor:
    """w [N, K] bf16 -> [ceil(N/32), ceil(K/32), 2, 16, 32] bf16 in the tile layout."""
    return load_extension().pack_weight(w)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, n: int) -> torch.Tensor:
    """x [M, K] bf16 (last dim contiguous) -> x @ w^T (+ bias) as a new [M, n] bf16 tensor."""
    return load_extension().linear(x, packed, bias, n)
