"""Dense projections of the base model over the matmul backend chosen at start-up (openlora.kernels.select).

- bf16 on a CPU with AMX: our tile kernel (openlora.kernels.gemm.AMX), weights packed at load time.
- bf16 with AVX512_BF16 but no AMX (AMD Zen 4): the fp32 panel kernel with VDPBF16PS on k-pair panels
  (openlora.kernels.gemm.BF16).
- fp32 with AVX-512: our FMA kernel on 48-column weight panels (openlora.kernels.gemm.F32). It wins at
  decode sizes and loses a little at prefill sizes; decode dominates serving, and two layouts would
  double the weights' memory.
- Otherwise on CPU, oneDNN's pre-packed weights (the layout inductor uses for frozen linears); the
  packed op is private to torch, so it is probed against F.linear once and the plain path (`torch`) is
  the fallback (and the path on GPUs).

The measurements behind these choices, and the commands that reproduce them: bench/RESULTS.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from openlora.kernels.gemm import AMX, BF16, F32


class Linear:
    """y = x @ W^T + b for x [T, in]; W given as [out, in] (Hugging Face layout)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, backend: str) -> None:
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        self.backend = backend
        # ||W_o||^2 per output row, fp32 [out], from the served weights (DoRA's norm needs it, and the
        # packed layouts below do not keep W in rows).
        self.row_sq = weight.float().pow(2).sum(1)
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
