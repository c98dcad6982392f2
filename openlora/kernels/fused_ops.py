"""Fused elementwise ops of the decoder layer on the CPU (C++ extension, torch-composite fallback).

Semantics (each fused op equals the torch composite of the same name below, `*_ref`):

    rms_norm(x [T, h], weight [h], eps) -> [T, h]
        xf = x.float(); xf = xf * rsqrt(mean(xf^2, -1) + eps); weight * xf.to(x.dtype)
    add_rms_norm_(h [T, h], delta [T, h], weight, eps) -> [T, h]
        h += delta (in place, rounded to h's dtype like `h + delta`); then rms_norm(h, weight, eps)
    rope_(t [T, heads, d], cos [T, d], sin [T, d]) -> t (rotated in place)
        rot = cat(-t[..., d/2:], t[..., :d/2]); t = t * cos[:, None] + rot * sin[:, None]
    silu_mul(gu [T, 2i]) -> [T, i]
        silu(gu[:, :i]) * gu[:, i:]

fp32 or bf16, all operands of one call in the same dtype; every last dim contiguous, row (and head)
strides free: `delta` may be a column slice, `t` a head view of a column slice of the fused qkv buffer.

Exactness: the kernel replays torch's rounding steps (bf16: widen, compute in fp32, round to nearest even
once per torch op; RMSNorm's sum of squares in ATen's cascade-sum order; SiLU with the same Sleef exp as
ATen's AVX-512 kernels), so on an AVX-512 torch build all four ops are bit-identical to the composites in
fp32 and bf16 (tests/kernels/test_fused_ops.py checks equality). On other builds (ATen AVX2, no AVX-512
in the extension) the sum order / exp may differ: fp32 stays within 1e-6 relative, bf16 within 1 ulp.

NOTE: the point is call overhead, not FLOPs: each composite is several torch ops, each fused op one
call (figures: bench/RESULTS.md, from bench/fused_ops_micro.py). Small calls run on one thread (below
`min_parallel_elems` elements the OpenMP fork/join costs more than the work).
"""

from __future__ import annotations

import functools
import logging
from types import ModuleType

import torch
import torch.nn.functional as F

from openlora.kernels.build import build_extension, try_build

logger = logging.getLogger("openlora.kernels")



def load_extension() -> ModuleType:
    """The compiled C++ fused ops module (see openlora.kernels.build). -ffp-contract=off: torch
    rounds t * cos and rot * sin separately; an FMA would not."""
    return build_extension("fused_ops", "fused_ops_cpu.cpp", "fused ops", ("-ffp-contract=off",))


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether the C++ kernels can be used (built and loaded); logs the reason once when they cannot."""
    return try_build(load_extension, "fused ops", "using torch composites")


# --- fused entry points -----------------------------------------------------------------------------------
# NOTE: the extension checks device, dtype, shapes and strides itself and returns None (rope_: False) when
# its inputs are outside its domain; the composite then runs (and raises the errors). Checking in Python
# would cost about twice the call itself (bench/RESULTS.md).


class FusedOps:
    """The fused ops through one choice made at start-up (openlora.kernels.select): the C++ extension
    `ext`, or None for the torch composites everywhere (`fused_ops=off`, or no extension here)."""

    def __init__(self, ext: ModuleType | None) -> None:
        self.ext = ext

    @property
    def enabled(self) -> bool:
        return self.ext is not None

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """RMSNorm of x [T, h] (row stride free) with weight [h] -> new contiguous [T, h] (see module doc)."""
        ext = self.ext
        if ext is not None:
            out = ext.rms_norm(x, weight, eps)
            if out is not None:
                return out
        return rms_norm_ref(x, weight, eps)

    def add_rms_norm_(self, h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """h += delta in place (h, delta [T, hd]), then return rms_norm(h, weight, eps) as a new [T, hd]."""
        ext = self.ext
        if ext is not None:
            out = ext.add_rms_norm_(h, delta, weight, eps)
            if out is not None:
                return out
        h.add_(delta)
        return rms_norm_ref(h, weight, eps)

    def rope_(self, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate t [T, heads, d] (a view; row/head strides free) in place with cos/sin [T, d]; returns t."""
        ext = self.ext
        if ext is None or not ext.rope_(t, cos, sin):
            t.copy_(rope_ref(t, cos, sin))
        return t

    def silu_mul(self, gu: torch.Tensor) -> torch.Tensor:
        """silu(gu[:, :i]) * gu[:, i:] for gu [T, 2i] (row stride free) -> new contiguous [T, i]."""
        ext = self.ext
        if ext is not None:
            out = ext.silu_mul(gu)
            if out is not None:
                return out
        return silu_mul_ref(gu)

    def write_kv_(self, k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  slot_mapping: torch.Tensor) -> None:
        """Store k, v [T, KVH, d] at the flat cache rows slot_mapping [T] of k_cache/v_cache [nb, bs, KVH, d]."""
        ext = self.ext
        if ext is None or not ext.write_kv_(k_cache, v_cache, k, v, slot_mapping):
            write_kv_ref(k_cache, v_cache, k, v, slot_mapping)

    def argmax(self, x: torch.Tensor) -> torch.Tensor:
        """torch.argmax(x, dim=1) for x [B, V] fp32/bf16 (row stride free) -> int64 [B], same result
        (first maximum; NaN counts as the maximum, as in torch)."""
        ext = self.ext
        if ext is not None:
            out = ext.argmax_rows(x)
            if out is not None:
                return out
        return x.argmax(dim=1)


COMPOSITES = FusedOps(None)  # the torch composites: the fallback, and fused_ops=off


@functools.lru_cache(maxsize=None)
def default_ops() -> FusedOps:
    """The extension when it builds here, else the composites (what `fused_ops=auto` selects)."""
    return FusedOps(load_extension() if available() else None)


# Module-level forms of the ops over default_ops() (kernel tests, benchmarks).
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return default_ops().rms_norm(x, weight, eps)


def add_rms_norm_(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return default_ops().add_rms_norm_(h, delta, weight, eps)


def rope_(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return default_ops().rope_(t, cos, sin)


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    return default_ops().silu_mul(gu)


def write_kv_(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              slot_mapping: torch.Tensor) -> None:
    default_ops().write_kv_(k_cache, v_cache, k, v, slot_mapping)


def argmax(x: torch.Tensor) -> torch.Tensor:
    return default_ops().argmax(x)


def set_min_parallel_elems(n: int) -> None:
    """Calls touching fewer than n elements (rows x row length) run on the calling thread (bench knob)."""
    ext = default_ops().ext
    if ext is not None:
        ext.set_min_parallel_elems(int(n))


# --- torch composites: the fallback and the tests' oracle (as openlora/model/llama.py and rope.py) -------


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32 and cast back (as transformers does)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, d]; cos/sin: [T, d] -> new [T, heads, d]."""
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rot * sin[:, None, :]


def write_kv_ref(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """Two index_copy_ over the caches viewed as [nb * bs, KVH, d] rows."""
    kvh, d = k.shape[1], k.shape[2]
    k_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, v)


def silu_mul_ref(gu: torch.Tensor) -> torch.Tensor:
    """gu [T, 2i] -> silu(gate) * up [T, i]."""
    i = gu.shape[-1] // 2
    return F.silu(gu[:, :i]) * gu[:, i:]
