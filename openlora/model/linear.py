"""Dense projections of the base model, with the CPU matmul path chosen once at start-up.

- bf16 on a CPU with AMX: our tile kernel (openlora.kernels.gemm.AMX), weights packed at load time.
- bf16 with AVX512_BF16 but no AMX (AMD Zen 4): the fp32 panel kernel with VDPBF16PS on k-pair panels
  (openlora.kernels.gemm.BF16).
- fp32 with AVX-512: our FMA kernel on 48-column weight panels (openlora.kernels.gemm.F32). It wins at
  decode sizes and loses a little at prefill sizes; decode dominates serving, and two layouts would
  double the weights' memory.
- Otherwise on CPU, oneDNN's pre-packed weights (the layout inductor uses for frozen linears); the
  packed op is private to torch, so it is probed against F.linear once and the plain path is the
  fallback (and the path on GPUs).

The measurements behind these choices, and the commands that reproduce them: bench/RESULTS.md.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from openlora.config import env
from openlora.kernels.gemm import AMX, BF16, F32

log = logging.getLogger("openlora.model")

_CHOICE: dict[tuple[str, torch.dtype], str] = {}


def _probe_packed(dtype: torch.dtype) -> bool:
    """Whether oneDNN packed linear exists here and matches F.linear for several batch sizes."""
    try:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(48, 40, generator=g).to(dtype)
        b = torch.randn(48, generator=g).to(dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 32)
        for m in (1, 5, 32, 77):
            x = torch.randn(m, 40, generator=g).to(dtype)
            got = torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
            tol = 1e-4 if dtype == torch.float32 else 5e-2
            if not torch.allclose(got.float(), F.linear(x, w, b).float(), atol=tol, rtol=tol):
                return False
        return True
    except Exception:  # op missing in this build of torch
        return False


def linear_backend(device: torch.device, dtype: torch.dtype) -> str:
    """'amx' for bf16 on AMX CPUs, 'bf16-panels' for bf16 on other AVX512_BF16 CPUs, 'f32-panels' for fp32
    on AVX-512 CPUs, else 'dnnl-packed' on CPU when available and correct, else 'torch'.
    Decided once per (device, dtype) and logged; OPENLORA_LINEAR_BACKEND forces one."""
    key = (device.type, dtype)
    forced = env("OPENLORA_LINEAR_BACKEND")
    if forced:
        return forced
    if key not in _CHOICE:
        choice = "torch"
        if device.type == "cpu" and dtype == torch.bfloat16 and AMX.available():
            choice = "amx"
        elif device.type == "cpu" and dtype == torch.bfloat16 and BF16.available():
            choice = "bf16-panels"
        elif device.type == "cpu" and dtype == torch.float32 and F32.available():
            choice = "f32-panels"
        elif device.type == "cpu" and torch.backends.mkldnn.is_available() and _probe_packed(dtype):
            choice = "dnnl-packed"
        _CHOICE[key] = choice
        log.info("dense matmuls: %s (%s, %s)", choice, device.type, dtype)
    return _CHOICE[key]


class Linear:
    """y = x @ W^T + b for x [T, in]; W given as [out, in] (Hugging Face layout)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, backend: str) -> None:
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        self.backend = backend
        n = self.out_features
        # NOTE: each backend's call is bound once here: ~121 calls per decode step, and per-call Python
        # dispatch (string compares, extension lookups) showed up in the step profile.
        if backend in ("amx", "f32-panels", "bf16-panels"):
            kern = {"amx": AMX, "f32-panels": F32, "bf16-panels": BF16}[backend]
            self.weight = kern.pack(weight)
            op, w = kern.load_extension().linear, self.weight
            self._fn = lambda x: op(x, w, bias, n)
        elif backend == "dnnl-packed":
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 32)
            op, w = torch.ops.mkldnn._linear_pointwise, self.weight
            self._fn = lambda x: op(x, w, bias, "none", [], "")
        elif backend == "mm-t":
            self.weight = w = weight.t().contiguous()  # [in, out]
            self._fn = (lambda x: torch.mm(x, w)) if bias is None else (lambda x: torch.addmm(bias, x, w))
        else:
            self.weight = w = weight.contiguous()
            self._fn = lambda x: F.linear(x, w, bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(x)
