"""Which checkpoints folded activation scales into neighbouring weights, and recovering them.

AWQ (scale_ln_fcs / scale_fc_fc) and SmoothQuant divide a norm's weight by s and multiply the columns
of the linears it feeds by s, so those linears see x / s. A LoRA trained on the original model must
then be applied as A' = A diag(s) (research/quantization.md §3.3). What a checkpoint tells us:
  - AWQ: always folded (AutoAWQ / llm-awq apply the scales before quantizing); the values are not stored.
  - compressed-tensors: folded when llm-compressor's saved recipe (recipe.yaml, or a `recipe` in the
    config) names SmoothQuantModifier or AWQModifier; unknown when no recipe was saved.
  - GPTQ, our own quantize-at-load, plain float folders: not folded.
  - GGUF: reported not folded, but a file made with llama.cpp's AWQ path would carry folded weights
    and record nothing about it (undetectable).
s itself is only recoverable for norm-fed linears (q/k/v from input_layernorm, gate/up from
post_attention_layernorm), given the original model's norm weights: s = γ_orig / γ_ckpt. The v -> o and
up -> down scales live inside quantized rows and cannot be recovered from the checkpoint.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from openlora.errors import ModelLoadError

NORM_FED = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}
HIDDEN = ("self_attn.o_proj", "mlp.down_proj")  # scales folded from v and up: not recoverable
_MODIFIERS = re.compile(r"(SmoothQuantModifier|AWQModifier)")


@dataclass(frozen=True)
class FoldedScales:
    """What a checkpoint says about folded scales. `folded` is None when it cannot tell."""

    folded: bool | None
    method: str  # "awq", "smoothquant", "none" or "unknown"
    evidence: str  # where the answer comes from, for logs
    norm_fed: tuple[str, ...] = field(default=())  # linear suffixes whose input is x / s, recoverable
    hidden: tuple[str, ...] = field(default=())  # linear suffixes with scales that cannot be recovered


def _recipe_text(folder: Path) -> tuple[str, str] | None:
    for name in ("recipe.yaml", "recipe.yml", "recipe.json"):
        if (folder / name).is_file():
            return (folder / name).read_text(), name
    cfg = folder / "config.json"
    if cfg.is_file() and "recipe" in (text := cfg.read_text()):
        return text, "config.json"
    return None


def folded_scales(path: str | Path) -> FoldedScales:
    """Report whether the checkpoint at `path` folded activation scales (module docstring)."""
    from openlora.quant.formats import detect

    fmt = detect(path)
    linears = tuple(x for v in NORM_FED.values() for x in v)
    if fmt == "awq":
        return FoldedScales(True, "awq", "AWQ always folds scales into input/post-attention norms (and v->o, "
                            "up->down)", linears, HIDDEN)
    if fmt == "compressed-tensors":
        found = _recipe_text(Path(path))
        if found is None:
            return FoldedScales(None, "unknown", "compressed-tensors checkpoint without a saved recipe; W8A8 "
                                "recipes usually run SmoothQuant")
        text, name = found
        m = _MODIFIERS.search(text)
        if m is None:
            return FoldedScales(False, "none", f"{name} names no smoothing modifier")
        method = "smoothquant" if m.group(1) == "SmoothQuantModifier" else "awq"
        return FoldedScales(True, method, f"{name} names {m.group(1)}", linears, HIDDEN)
    if fmt == "gguf":
        return FoldedScales(False, "none", "GGUF records no smoothing (a llama.cpp AWQ conversion would be "
                            "undetectable)")
    return FoldedScales(False, "none", f"format {fmt or 'float'} does not fold scales")


def norm_fold_scales(checkpoint_norms: dict[str, torch.Tensor], original_norms: dict[str, torch.Tensor]
                     ) -> dict[str, torch.Tensor]:
    """{linear weight name: s [K] fp32} with s = γ_orig / γ_ckpt for every norm-fed linear.

    Both dicts are keyed by HF norm names (`model.layers.{i}.input_layernorm.weight`). A LoRA A [r, K]
    for that linear becomes A * s (broadcast over rows). Where both γ are 0, s = 1."""
    out: dict[str, torch.Tensor] = {}
    for name, g_ckpt in checkpoint_norms.items():
        m = re.fullmatch(r"(model\.layers\.\d+)\.(\w+)\.weight", name)
        if m is None or m.group(2) not in NORM_FED:
            continue
        if name not in original_norms:
            raise ModelLoadError(f"original norm weight {name!r} is missing")
        g_orig, g_ck = original_norms[name].double(), g_ckpt.double()
        if g_orig.shape != g_ck.shape:
            raise ModelLoadError(f"norm {name!r}: original shape {tuple(g_orig.shape)} != {tuple(g_ck.shape)}")
        if bool(((g_ck == 0) & (g_orig != 0)).any()):
            raise ModelLoadError(f"norm {name!r}: the checkpoint zeroes a channel the original keeps")
        s = torch.where(g_ck == 0, torch.ones_like(g_ck), g_orig / torch.where(g_ck == 0, 1.0, g_ck)).float()
        for lin in NORM_FED[m.group(2)]:
            out[f"{m.group(1)}.{lin}.weight"] = s
    return out
