"""Kernels: the LoRA (SGMV) reference, CPU (C++ / torch) and Triton paths, the CPU GEMMs, paged attention,
fused ops and the C++ layer loop. `openlora.kernels.select.select_kernels` picks them once at start-up."""

from openlora.kernels.backend import LoRABackend, make_backend
from openlora.kernels.reference import sgmv_reference

__all__ = ["LoRABackend", "make_backend", "sgmv_reference"]
