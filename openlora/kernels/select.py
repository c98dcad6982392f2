"""`select_kernels`: the one place the engine's kernels are chosen, once at start-up, in one log line.

    plan = select_kernels(config.kernels, device, dtype)
    # kernels: linear=bf16-panels lora=cpp attention=paged fused=on loop=cpp

"auto" picks, per part of a step:
- linear: bf16 on AMX CPUs -> amx; bf16 on other AVX512_BF16 CPUs -> bf16-panels; fp32 on AVX-512 CPUs
  -> f32-panels; else on CPU oneDNN's packed linear when it exists and matches F.linear -> dnnl-packed;
  else torch (and on GPUs). openlora.model.linear describes each.
- lora (SGMV): CUDA -> triton (torch without triton); CPU -> the C++ extension (torch if it cannot build).
- attention for row-wise query rows: CPU -> the C++ paged kernel when it builds; else gather + SDPA.
- fused elementwise ops (RMSNorm, RoPE, SiLU-mul, KV write, argmax): CPU -> the C++ extension when it
  builds; else the torch composites.
- layer loop: the C++ loop over all layers (openlora.kernels.decoder) when every kernel it calls was
  chosen above (packed GEMM, paged attention, fused ops) and it builds; else the Python loop. The runner
  still decides per step (`KernelPlan.cpp_loop_for`): steps with SDPA prompt chunks keep Python.

A forced choice (KernelConfig) that cannot run here raises ValueError naming the part and the reason;
"auto" falls back and logs why (a build failure) - OPENLORA_REQUIRE_KERNELS=1 turns that into a test failure.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from openlora.config import KernelConfig
from openlora.kernels import attention_cpu, decoder, fused_ops
from openlora.kernels.backend import LoRABackend, make_backend
from openlora.kernels.fused_ops import FusedOps
from openlora.kernels.gemm import AMX, BF16, F32

log = logging.getLogger("openlora.kernels")


@dataclass(frozen=True)
class KernelPlan:
    """What runs each part of a step on this engine's device (owned by the model runner)."""

    linear: str  # a KERNEL_CHOICES["linear"] name other than auto
    lora: LoRABackend  # the SGMV backend the adapter pool is applied with
    attention: str  # "paged" (C++ kernel reads K/V in place) | "sdpa" (gather + SDPA)
    ops: FusedOps  # the fused elementwise ops (ext None: torch composites)
    layer_loop: str  # "cpp" | "python"

    def describe(self) -> str:
        return (f"linear={self.linear} lora={self.lora.name} attention={self.attention} "
                f"fused={'on' if self.ops.enabled else 'off'} loop={self.layer_loop}")

    @property
    def paged_attention(self) -> bool:
        return self.attention == "paged"

    def cpp_loop_for(self, num_tokens: int, num_rowwise: int, has_prefills: bool, has_lora: bool) -> bool:
        """Whether this step runs all layers in the C++ loop: every row goes to the paged kernel, and any
        LoRA rows use the C++ SGMV the loop calls."""
        return (self.layer_loop == "cpp" and not has_prefills and 0 < num_rowwise == num_tokens
                and (not has_lora or self.lora.name == "cpp"))


def _probe_packed(dtype: torch.dtype) -> bool:
    """Whether oneDNN packed linear exists here and matches F.linear for several batch sizes."""
    import torch.nn.functional as F

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
    except Exception:  # noqa: BLE001 - the op is private and missing in some builds: not usable
        return False


def linear_usable(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None when linear backend `name` runs here, else why not."""
    cpu = device.type == "cpu"
    if name == "torch":
        return None
    if name in ("amx", "bf16-panels", "f32-panels"):
        kern, want = {"amx": (AMX, torch.bfloat16), "bf16-panels": (BF16, torch.bfloat16),
                      "f32-panels": (F32, torch.float32)}[name]
        if not cpu or dtype != want:
            return f"it runs {want} on the CPU only"
        return None if kern.available() else "its extension does not build or this CPU lacks its instructions"
    if name == "dnnl-packed":
        if not cpu or not torch.backends.mkldnn.is_available():
            return "it needs oneDNN on the CPU"
        return None if _probe_packed(dtype) else "oneDNN's packed linear is missing or wrong in this torch build"
    return "unknown backend"


def _linear(choice: str, device: torch.device, dtype: torch.dtype) -> str:
    if choice != "auto":
        return _forced("linear", choice, linear_usable(choice, device, dtype))
    for name in ("amx", "bf16-panels", "f32-panels", "dnnl-packed"):
        if linear_usable(name, device, dtype) is None:
            return name
    return "torch"


def _lora(choice: str, device: torch.device) -> LoRABackend:
    if choice != "auto":
        try:
            return make_backend(choice)
        except Exception as e:  # noqa: BLE001 - a forced backend that cannot build: say why
            _forced("lora", choice, f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}")
    if device.type == "cuda":
        try:
            return make_backend("triton")
        except ImportError as e:
            log.warning("triton unavailable (%s); LoRA uses the pure-torch backend on %s", e, device)
    elif device.type == "cpu":
        try:
            return make_backend("cpp")
        except Exception as e:  # noqa: BLE001 - any build failure means: use the fallback, and say why
            msg = str(e).strip()
            log.warning("C++ SGMV extension unavailable (%s: %s); LoRA uses the slower pure-torch backend",
                        type(e).__name__, msg.splitlines()[-1] if msg else "")
    return make_backend("torch")


def _attention(choice: str, device: torch.device) -> str:
    why = None if device.type == "cpu" and attention_cpu.available() else "the C++ paged kernel runs on CPU " \
        "only and must build"
    if choice == "paged":
        return _forced("attention", choice, why)
    if choice == "sdpa":
        return "sdpa"
    return "paged" if why is None else "sdpa"


def _fused(choice: str, device: torch.device) -> FusedOps:
    if choice == "off":
        return fused_ops.COMPOSITES
    why = None if device.type == "cpu" and fused_ops.available() else "the C++ fused ops run on CPU only and " \
        "must build"
    if choice == "on":
        _forced("fused_ops", choice, why)
    return fused_ops.default_ops() if why is None else fused_ops.COMPOSITES


def _loop(choice: str, device: torch.device, linear: str, attention: str, ops: FusedOps) -> str:
    if choice == "python":
        return "python"
    why = None
    if device.type != "cpu":
        why = "it runs on the CPU only"
    elif linear not in decoder.BACKENDS:
        why = f"it needs linear in {', '.join(decoder.BACKENDS)}, not {linear}"
    elif attention != "paged":
        why = "it needs attention=paged"
    elif not ops.enabled:
        why = "it needs fused_ops on"
    elif not decoder.available():
        why = "its extension does not build"
    if choice == "cpp":
        return _forced("layer_loop", choice, why)
    return "cpp" if why is None else "python"


def _forced(part: str, choice: str, why: str | None) -> str:
    """A forced choice: returned when it runs here, else a ValueError naming the part and the reason."""
    if why is not None:
        raise ValueError(f"kernels {part}={choice} cannot run here: {why}")
    return choice


def select_kernels(config: KernelConfig, device: torch.device | str, dtype: torch.dtype) -> KernelPlan:
    """Resolve every "auto" in `config` for `device` and `dtype`, check forced choices, log the plan."""
    device = torch.device(device)
    linear = _linear(config.linear, device, dtype)
    lora = _lora(config.lora, device)
    attention = _attention(config.attention, device)
    ops = _fused(config.fused_ops, device)
    loop = _loop(config.layer_loop, device, linear, attention, ops)
    plan = KernelPlan(linear=linear, lora=lora, attention=attention, ops=ops, layer_loop=loop)
    log.info("kernels: %s (%s, %s)", plan.describe(), device, str(dtype).removeprefix("torch."))
    return plan
