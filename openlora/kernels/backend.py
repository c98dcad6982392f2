"""The LoRA backend interface and `select_backend`, the one place a backend is chosen (once, logged)."""

from __future__ import annotations

import abc
import logging
from typing import Any, Callable

import torch

from openlora.config import env
from openlora.lora.batch import LoRABatch, SiteRows

logger = logging.getLogger("openlora.kernels")

BACKEND_NAMES = ("reference", "torch", "cpp", "triton")


class LoRABackend(abc.ABC):
    """Applies LoRA deltas for one (site, layer) per call: `sgmv(y, x, a, bt, batch, site)` adds into y.

    Subclasses implement `sgmv` with the semantics of `openlora.kernels.reference.sgmv_reference`.
    `_plan` caches host-side per-step metadata derived from a batch (e.g. padded row tables), so it is
    built once per step and site and reused by all layers.
    """

    name: str = "abstract"

    def __init__(self) -> None:
        self._plan_batch: LoRABatch | None = None  # strong ref: its id() cannot be reused while cached
        self._plans: dict[tuple[str, str], Any] = {}

    @abc.abstractmethod
    def sgmv(
        self, y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, batch: LoRABatch, site: str
    ) -> None:
        """Add this step's LoRA deltas of `site` into y (a view) in place."""

    def _plan(self, batch: LoRABatch, site: str, kind: str, build: Callable[[LoRABatch, SiteRows], Any]) -> Any:
        """The cached `build(batch, batch.sites[site])` for the current batch (cache reset on a new batch)."""
        if batch is not self._plan_batch:
            self._plan_batch = batch
            self._plans = {}
        key = (site, kind)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = build(batch, batch.sites[site])
        return plan

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class ReferenceBackend(LoRABackend):
    """The plain-loop oracle as a backend (debugging only: a Python loop over tokens)."""

    name = "reference"

    def sgmv(
        self, y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, batch: LoRABatch, site: str
    ) -> None:
        from openlora.kernels.reference import sgmv_reference

        sgmv_reference(y, x, a, bt, batch, site)


def _make(name: str) -> LoRABackend:
    """Build the backend `name`; raises if it cannot work here."""
    if name == "reference":
        return ReferenceBackend()
    if name == "torch":
        from openlora.kernels.cpu import TorchBackend

        return TorchBackend()
    if name == "cpp":
        from openlora.kernels.cpu import CppBackend

        return CppBackend()
    if name == "triton":
        from openlora.kernels.triton_lora import TritonBackend

        return TritonBackend()
    raise ValueError(f"OPENLORA_LORA_BACKEND={name!r}; expected one of {', '.join(BACKEND_NAMES)}")


def select_backend(device: torch.device) -> LoRABackend:
    """Choose the LoRA backend for `device` once, at start-up, and log the choice.

    OPENLORA_LORA_BACKEND=reference|torch|cpp|triton forces one (an error if it cannot be built).
    Otherwise: CUDA with triton importable -> triton (else torch); CPU -> the C++ extension, compiled on
    first use, falling back to the pure-torch path if compilation fails (the reason is logged).
    """
    device = torch.device(device)
    forced = env("OPENLORA_LORA_BACKEND")
    if forced:
        backend = _make(forced.strip().lower())
        logger.info("LoRA backend %s for %s (forced by OPENLORA_LORA_BACKEND)", backend.name, device)
        return backend
    if device.type == "cuda":
        try:
            backend = _make("triton")
        except ImportError as e:
            logger.warning("triton unavailable (%s); LoRA uses the pure-torch backend on %s", e, device)
            backend = _make("torch")
    elif device.type == "cpu":
        try:
            backend = _make("cpp")
        except Exception as e:  # noqa: BLE001 - any build failure means: use the fallback, and say why
            logger.warning("C++ SGMV extension unavailable (%s: %s); LoRA uses the slower pure-torch backend",
                           type(e).__name__, str(e).strip().splitlines()[-1] if str(e).strip() else "")
            backend = _make("torch")
    else:
        backend = _make("torch")
    logger.info("LoRA backend %s for %s", backend.name, device)
    return backend
