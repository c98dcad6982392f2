"""Quantized base weights: the common form every checkpoint format loads into (`types`), the loaders
(`formats`), and the GEMM kernels that run on it (openlora.kernels)."""
