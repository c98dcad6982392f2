"""Every dense-matmul backend of openlora.model.linear.Linear against F.linear, with and without bias.

Tolerances: fp32 1e-5 (sum order differs between backends); bf16 one rounding step (2^-8 relative)
plus the fp32 sum's error, as in tests/kernels/test_gemm.py. Backends that this CPU lacks are skipped.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from openlora.kernels.select import linear_usable
from openlora.model.linear import Linear

CASES = [("torch", torch.float32), ("mm-t", torch.float32), ("dnnl-packed", torch.float32),
         ("dnnl-packed", torch.bfloat16), ("amx", torch.bfloat16), ("f32-panels", torch.float32),
         ("bf16-panels", torch.bfloat16)]


def usable(backend: str, dtype: torch.dtype) -> bool:
    return backend == "mm-t" or linear_usable(backend, torch.device("cpu"), dtype) is None


@pytest.mark.parametrize("backend,dtype", CASES, ids=[f"{b}-{str(d)[6:]}" for b, d in CASES])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("m", [1, 32, 70])
def test_backend_matches_f_linear(backend: str, dtype: torch.dtype, bias: bool, m: int) -> None:
    if not usable(backend, dtype):
        pytest.skip(f"{backend} unavailable for {dtype} here")
    g = torch.Generator().manual_seed(m)
    w = torch.randn(100, 72, generator=g).to(dtype)
    b = torch.randn(100, generator=g).to(dtype) if bias else None
    x = torch.randn(m, 72, generator=g).to(dtype)
    lin = Linear(w, b, backend)
    got = lin(x)
    assert got.dtype == dtype and got.shape == (m, 100) and (lin.out_features, lin.in_features) == (100, 72)
    ref = F.linear(x.double(), w.double(), b.double() if b is not None else None)
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
    else:
        mag = x.double().abs() @ w.double().abs().t() + (b.double().abs() if b is not None else 0.0)
        assert bool(((got.double() - ref).abs() <= ref.abs() * 2.0 ** -8 + 1e-5 * mag).all())
