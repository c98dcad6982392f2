"""Dense linear layers on weights packed at load time (C++ extensions), for the small-M matmuls of
decode steps, where every weight is streamed from memory once per step.

Three kernels with the same interface:

    AMX (bf16, Intel AMX-BF16 tiles; csrc/gemm_amx.cpp): products and sums in fp32, one rounding to
        bf16 at the end (as torch's bf16 F.linear); packed as [ceil(N/32), ceil(K/32), 2, 16, 32] tiles.
    F32 (fp32, AVX-512 FMAs; csrc/gemm_avx512.cpp): packed as [ceil(N/48), K, 48] column panels.
    BF16 (bf16, AVX512_BF16 pair dot products, for CPUs without AMX such as AMD Zen 4; same file and
        loop nest as F32): fp32 sums, one rounding to bf16; packed as [ceil(N/48), ceil(K/2), 96] panels
        of k pairs.

    kernel.available() -> bool      (CPU features, OS permission, build; checked once per process)
    kernel.pack(w [N, K]) -> packed
    kernel.linear(x [M, K], packed, bias [N] | None, n=N) -> x @ w^T (+ bias), a new [M, N] tensor

Sums run in a different order from oneDNN/MKL, so results agree with F.linear to rounding, not bit for
bit (tests/kernels/test_gemm.py states the bounds). When `available()` is False callers keep oneDNN.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch

from openlora.kernels.build import build_extension, cpu_has, try_build


class PackedGemm:
    """One compiled kernel (see openlora.kernels.build for the compile-on-first-use cache)."""

    def __init__(self, stem: str, source: str, label: str, dtype: torch.dtype, *available_args: str,
                 cpu_flag: str | None = None) -> None:
        self.stem, self.source, self.label, self.dtype = stem, source, label, dtype
        self.available_args = available_args  # what the extension's available() asks (the dtype name)
        self.cpu_flag = cpu_flag  # a /proc/cpuinfo flag without which the kernel cannot run: not even built

    def cpu_supported(self) -> bool:
        return self.cpu_flag is None or cpu_has(self.cpu_flag)

    def load_extension(self) -> ModuleType:
        return build_extension(self.stem, self.source, self.source)  # one module per source file

    @functools.cache  # noqa: B019 - two module-level instances, never freed
    def available(self) -> bool:
        return (self.cpu_supported()
                and try_build(self.load_extension, self.label, "using oneDNN for these matmuls")
                and bool(self.load_extension().available(*self.available_args)))

    def pack(self, w: torch.Tensor) -> torch.Tensor:
        return self.load_extension().pack_weight(w)

    def linear(self, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, n: int) -> torch.Tensor:
        return self.load_extension().linear(x, packed, bias, n)


AMX = PackedGemm("gemm_amx", "gemm_amx.cpp", "AMX GEMM", torch.bfloat16, cpu_flag="amx_bf16")
F32 = PackedGemm("gemm_avx512", "gemm_avx512.cpp", "fp32 GEMM", torch.float32, "float32")
BF16 = PackedGemm("gemm_avx512", "gemm_avx512.cpp", "AVX512-BF16 GEMM", torch.bfloat16, "bfloat16")
