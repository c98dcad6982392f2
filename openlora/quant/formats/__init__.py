"""Quantized checkpoints -> QuantWeight, bit-exact: one entry point over the format modules.

    detect(path)              -> "gguf" | "gptq" | "awq" | "compressed-tensors" | other quant_method | None
    load_quant_weights(path)  -> ({HF name: QuantWeight}, {HF name: float tensor})

The first dict holds every quantized linear under its Hugging Face weight name
(`model.layers.0.self_attn.q_proj.weight`); the second everything else (norms, embeddings and heads left
unquantized, biases, static input scales) in its stored dtype. Loaders keep the stored codes and
parameters (no dequantize/re-quantize), so `QuantWeight.dequantize()` equals each format's own rule
bit for bit. `folded_scales(path)` says whether scales were folded into norms (AWQ, SmoothQuant).
"""

from __future__ import annotations

from pathlib import Path

import torch

from openlora.errors import ModelLoadError
from openlora.quant.formats.awq import load_awq
from openlora.quant.formats.common import quant_config, read_tensors
from openlora.quant.formats.compressed import load_compressed
from openlora.quant.formats.folding import FoldedScales, folded_scales, norm_fold_scales
from openlora.quant.formats.gguf_file import load_gguf
from openlora.quant.formats.gptq import load_gptq
from openlora.quant.types import QuantWeight

__all__ = ["FoldedScales", "detect", "folded_scales", "load_quant_weights", "norm_fold_scales"]

_LOADERS = {"gptq": load_gptq, "awq": load_awq, "compressed-tensors": load_compressed}


def _is_gguf_file(p: Path) -> bool:
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


def _gguf_in(folder: Path) -> Path | None:
    """The folder's only .gguf file when it has no config.json (a GGUF download), else None."""
    files = sorted(folder.glob("*.gguf"))
    return files[0] if len(files) == 1 and not (folder / "config.json").is_file() else None


def detect(path: str | Path) -> str | None:
    """Which quantized format the checkpoint at `path` (a file or a folder) is; None for plain floats.

    Folders answer from their quantization config (config.json's `quantization_config`,
    quantize_config.json from AutoGPTQ, quant_config.json from AutoAWQ); an unknown `quant_method` is
    returned as written so the caller can name it."""
    p = Path(path)
    if p.is_file():
        return "gguf" if _is_gguf_file(p) else None
    if not p.is_dir():
        raise ModelLoadError(f"checkpoint {str(p)!r} does not exist")
    found = quant_config(p)
    if found is None:
        return "gguf" if _gguf_in(p) else None
    cfg, source = found
    method = str(cfg.get("quant_method") or "").lower()
    if method:
        return method
    return {"quantize_config.json": "gptq", "quant_config.json": "awq"}.get(source)


def load_quant_weights(path: str | Path) -> tuple[dict[str, QuantWeight], dict[str, torch.Tensor]]:
    """(quantized linears, other tensors) of the checkpoint at `path`, keyed by HF parameter name."""
    p = Path(path)
    fmt = detect(p)
    if fmt == "gguf":
        return load_gguf(p if p.is_file() else _gguf_in(p))  # type: ignore[arg-type]
    if fmt is None:
        raise ModelLoadError(f"{p} is not a quantized checkpoint (no GGUF file, no quantization config)")
    if fmt not in _LOADERS:
        raise ModelLoadError(f"{p}: quantization method {fmt!r} is not supported "
                             f"(supported: gguf, {', '.join(_LOADERS)})")
    cfg, source = quant_config(p)  # type: ignore[misc]
    return _LOADERS[fmt](read_tensors(p), p, cfg, source)
