"""LoRA kernels: the plain-loop reference, the CPU paths (C++ / torch) and Triton; `select_backend`
picks one at start-up."""

from openlora.kernels.backend import LoRABackend, select_backend
from openlora.kernels.reference import sgmv_reference

__all__ = ["LoRABackend", "select_backend", "sgmv_reference"]
