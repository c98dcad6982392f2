"""The LoRA (SGMV) backend interface and its implementations by name (chosen in openlora.kernels.select)."""

from __future__ import annotations

import abc
from typing import Any, Callable

import torch

from openlora.lora.batch import LoRABatch, SiteRows

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
        self, y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, batch: LoRABatch, site: str,
        layer: int = 0,
    ) -> None:
        """Add this step's LoRA deltas of `site` into y (a view) in place; DoRA segments also rescale
        their rows with layer `layer` of the row-scale tables."""

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
        self, y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, batch: LoRABatch, site: str,
        layer: int = 0,
    ) -> None:
        from openlora.kernels.reference import sgmv_reference

        sgmv_reference(y, x, a, bt, batch, site, layer)


def make_backend(name: str) -> LoRABackend:
    """Build the backend `name` (reference, torch, cpp or triton); raises if it cannot work here.
    openlora.kernels.select chooses which."""
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
    raise ValueError(f"LoRA backend {name!r}; expected one of {', '.join(BACKEND_NAMES)}")
