"""LoRA inputs on a quantized checkpoint whose activation scales were folded into its weights.

AWQ and SmoothQuant divide each RMSNorm weight by s and multiply the columns of the linears it feeds by s
(openlora.quant.formats.folding), so q/k/v and gate/up see h / s. Given the original model's norm weights,
c = γ_orig / γ_ckpt = s per channel, and an adapter's A becomes A * c once at load (openlora.lora.input_fix).
AWQ also folds v_proj -> o_proj and up_proj -> down_proj: the rows of v / up are divided by a scale and
the columns of o / down multiplied by it, so a LoRA on o / down sees a scaled input and one on v / up adds
to a scaled output. Those scales live inside quantized rows, not in any norm: such sites are refused.

    lora_input_fix(config) -> InputFix | None    (None: nothing to correct or refuse)

Policy, from folded_scales(checkpoint):
    not folded (GPTQ, plain compressed-tensors)   None
    folded, original norms given                  q/k/v/gate/up inputs scaled; o/down and v/up refused
    folded, no original norms                     every site refused (a warning at model load)
    unknown (compressed-tensors, no recipe)       with original norms: folded iff some c != 1; without: a
                                                  warning that deltas may be wrong, nothing refused
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from openlora.config import EngineConfig
from openlora.errors import ModelLoadError
from openlora.lora.input_fix import InputFix
from openlora.model.loader import CheckpointReader

log = logging.getLogger("openlora.model")

NORMS = ("input_layernorm", "post_attention_layernorm")
# a linear whose input scale was folded out of a producer's rows -> that producer, whose output is scaled
PRODUCERS = {"self_attn.o_proj": "self_attn.v_proj", "mlp.down_proj": "mlp.up_proj"}


def read_norms(path: str, names: list[str]) -> dict[str, torch.Tensor]:
    """The named tensors (fp32) of a model folder or one safetensors file; missing names are left out
    (norm_fold_scales names the first one it needs)."""
    from safetensors import safe_open

    p = Path(path)
    if p.is_dir():
        reader = CheckpointReader(p, torch.float32)
        return {n: reader.get(n) for n in names if n in reader}
    if not p.is_file():
        raise ModelLoadError(f"original norms {path!r}: no such folder or safetensors file")
    try:
        with safe_open(str(p), framework="pt") as h:
            keys = set(h.keys())
            return {n: h.get_tensor(n).float() for n in names if n in keys}
    except Exception as e:  # safetensors raises its own error kinds on a file that is not one
        raise ModelLoadError(f"original norms {path!r} is not a readable safetensors file: {e}") from e


def _site(linear: str) -> str:
    return linear.rpartition(".")[2]  # "self_attn.q_proj" -> "q_proj"


def _norm_scales(config: EngineConfig, names: list[str]) -> dict[str, torch.Tensor]:
    """{site: c fp32 [L, in]} from the original norms, sites where some c != 1 only."""
    from openlora.quant.formats.folding import NORM_FED, norm_fold_scales

    ckpt = CheckpointReader(config.source, torch.float32)
    per_linear = norm_fold_scales({n: ckpt.get(n) for n in names}, read_norms(config.original_norms, names))
    out = {}
    for linear in (x for v in NORM_FED.values() for x in v):
        c = torch.stack([per_linear[f"model.layers.{i}.{linear}.weight"] for i in range(config.model.num_layers)])
        if not bool((c == 1).all()):
            out[_site(linear)] = c  # [L, in]
    return out


def lora_input_fix(config: EngineConfig) -> InputFix | None:
    """The corrections and refusals LoRA needs on this base (module docstring); logs what it decided."""
    if config.quantization != "checkpoint":
        return None
    from openlora.quant.formats.folding import HIDDEN, NORM_FED, folded_scales

    report = folded_scales(config.source)
    what = f"{config.source} ({report.method}: {report.evidence})"
    if report.folded is False:
        if config.original_norms:
            log.info("%s folded no scales: original norms %s not needed", what, config.original_norms)
        return None
    names = [f"model.layers.{i}.{n}.weight" for i in range(config.model.num_layers) for n in NORMS]
    scale = _norm_scales(config, names) if config.original_norms else {}
    folded = report.folded if report.folded is not None else (bool(scale) if config.original_norms else None)
    if folded is None:
        log.warning("%s: cannot tell whether activation scales were folded into the norms; if they were, LoRA "
                    "deltas are wrong. Give the original model's norm weights (original_norms, --original-norms) "
                    "to check and correct them", what)
        return None
    if not folded:
        log.info("%s: the original norms equal the checkpoint's: no scales were folded into them", what)
        return None
    refused: dict[str, str] = {}
    for linear in report.hidden or HIDDEN:
        refused[_site(linear)] = ("its input carries scales folded out of the preceding projection's rows, which "
                                  "no norm weight records")
        refused[_site(PRODUCERS[linear])] = (f"its output carries scales folded into {_site(linear)}'s columns, "
                                             "which no norm weight records")
    if not config.original_norms:
        for norm, linears in NORM_FED.items():
            for linear in linears:
                refused.setdefault(_site(linear), f"its input is {norm} with folded scales; give the original model's "
                                                  "norm weights (original_norms=..., --original-norms) to correct it")
    log.warning("%s folded activation scales: LoRA inputs corrected at %s; adapters on %s are refused", what,
                sorted(set(scale) - set(refused)) or "no site", sorted(refused))
    return InputFix({s: c for s, c in scale.items() if s not in refused}, refused, what)
