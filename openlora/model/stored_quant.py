"""Base projections served from a checkpoint's own quantized codes: no dequantize and re-quantize round trip.

Two sources (EngineConfig.quantization):
    "gguf"        a GGUF file's Q8_0 / Q4_0 / Q4_1 blocks; every other tensor from the converted HF folder
    "checkpoint"  a model folder whose config declares gptq, awq or compressed-tensors (found at start-up
                  when quantization is left unset: `resolve_quantization`); embeddings, norms, the head and
                  biases from the same folder's float tensors

Each projection's parts (q/k/v, gate/up) are fused into one QuantLinear when they share one layout (bits,
group, act-order permutation); otherwise each run of parts that does fuse is its own projection
(`SplitLinear`), logged. A part stored in float stays a float Linear. The kernel mode per weight: "w8a8"
where a compressed-tensors config quantizes activations to int8 and the kernel takes the weight; else
"w8a16" / "w4a16" by bits (openlora.model.quant_linear.mode_for).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from openlora.errors import ModelLoadError
from openlora.model.linear import Linear
from openlora.model.quant_linear import QuantLinear, cat_rows, mode_for
from openlora.quant.types import QuantWeight

log = logging.getLogger("openlora.model")

SERVABLE = ("gptq", "awq", "compressed-tensors")  # folder formats "checkpoint" serves


def resolve_quantization(requested: str | None, folder: str, gguf_file: str | None
                         ) -> tuple[str | None, str | None]:
    """(quantization, source) for EngineConfig from what the user asked and what the model is.

    A folder that declares a quantization config is served from its own codes ("checkpoint", source =
    the folder) whether `requested` is None or "checkpoint"; asking it for w8a16 / w4a16 / w8a8 would
    re-quantize dequantized weights and is refused, and so is a method we cannot serve."""
    from openlora.quant.formats import detect

    if gguf_file is not None:
        return ("gguf" if requested == "checkpoint" else requested), gguf_file
    fmt = detect(folder)
    if fmt is None:
        if requested == "checkpoint":
            raise ModelLoadError(f"quantization 'checkpoint' serves a quantized checkpoint's own codes, but "
                                 f"{folder} declares no quantization (no quantization_config in config.json)")
        return requested, None
    if fmt not in SERVABLE:
        raise ModelLoadError(f"{folder}: quantization method {fmt!r} is not supported "
                             f"(quantized checkpoints served: {', '.join(SERVABLE)}, and GGUF files)")
    if requested not in (None, "checkpoint"):
        raise ModelLoadError(f"{folder} is already quantized ({fmt}); quantization={requested!r} would dequantize "
                             f"and re-quantize it: leave quantization unset (or 'checkpoint') to serve its own codes")
    log.info("%s: a %s checkpoint, served from its own quantized codes", folder, fmt)
    return "checkpoint", folder


def _int8_activations(folder: Path) -> bool:
    """Whether a compressed-tensors config quantizes every group's input activations to int8 (W8A8).

    Run per token (and per kernel group) at run time: a static scheme's input_scale is not used."""
    from openlora.quant.formats.common import quant_config

    found = quant_config(folder)
    cfg = found[0] if found else {}
    if str(cfg.get("quant_method", "")).lower() != "compressed-tensors":
        return False
    acts = [g.get("input_activations") for g in (cfg.get("config_groups") or {}).values()]
    acts = [a for a in acts if a]
    if not acts:
        return False
    if all(a.get("type", "int") == "int" and a.get("num_bits") == 8 for a in acts):
        if any(a.get("dynamic") is False for a in acts):
            log.warning("%s: static int8 activation scales (input_scale) are not used: activations are "
                        "quantized per token at run time", folder)
        return True
    log.warning("%s: input activations %s are not run by any kernel here: served in the model dtype (weights "
                "keep their own codes)", folder, acts)
    return False


class SplitLinear:
    """Several projections over one input whose outputs are concatenated: the parts of a fused projection
    (q/k/v, gate/up) that do not share one quantized layout. The interface of openlora.model.linear.Linear."""

    def __init__(self, parts: list[Linear | QuantLinear]) -> None:
        self.parts = parts
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)
        biases = [p.bias for p in parts]
        self.bias = None if all(b is None for b in biases) else torch.cat(biases)  # parts add their own
        self.backend = "split(" + ",".join(p.backend for p in parts) + ")"
        self.row_sq = torch.cat([p.row_sq for p in parts])
        self.weight = None  # no one matrix (the C++ layer loop only runs float bases)
        self.nbytes = sum(p.nbytes if isinstance(p, QuantLinear) else p.weight.numel() * p.weight.element_size()
                          for p in parts)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)  # [T, sum of the parts' out]


class StoredWeights:
    """A quantized checkpoint's tensors by Hugging Face name: projections kept in their own codes, every
    other tensor (embeddings, norms, head, biases) as floats."""

    def __init__(self, quant: dict[str, QuantWeight], float_get: Callable[[str], torch.Tensor], int8_acts: bool,
                 device: torch.device) -> None:
        self.quant = quant
        self.get = float_get  # name -> float tensor in the model dtype
        self.int8_acts = int8_acts
        self.device = device

    @classmethod
    def open(cls, quantization: str | None, source: str | None, reader, device: torch.device
             ) -> StoredWeights | None:
        """The stored codes for quantization "gguf" / "checkpoint" (module docstring), else None."""
        from openlora.quant.formats import load_quant_weights

        if quantization == "gguf":
            return cls(load_quant_weights(source)[0], reader.get, False, device)
        if quantization != "checkpoint":
            return None
        quant, floats = load_quant_weights(source)

        def get(name: str) -> torch.Tensor:
            if name in floats:
                return floats[name].to(reader.dtype)
            if name in quant:  # e.g. a quantized lm_head: adapters' ends need the head as a float matrix
                log.info("%s: %s is quantized in the checkpoint; served dequantized (not a projection)", source, name)
                return quant[name].dequantize().to(reader.dtype)
            raise ModelLoadError(f"tensor {name!r} is missing from the quantized checkpoint in {source}")

        return cls(quant, get, _int8_activations(Path(source)), device)

    def _quant_linear(self, qw: QuantWeight, bias: torch.Tensor | None, what: str) -> QuantLinear:
        mode = mode_for(qw)
        if self.int8_acts and qw.bits == 8:
            try:
                return QuantLinear(qw, bias, "w8a8")
            except ValueError as e:  # a layout the int8 x int8 kernel does not take (zero points, -128 codes)
                log.warning("%s: served as w8a16, not w8a8: %s", what, e)
        return QuantLinear(qw, bias, mode)

    def projection(self, names: list[str], bias: torch.Tensor | None, backend: str
                   ) -> Linear | QuantLinear | SplitLinear:
        """The projection computing the checkpoint weights `names` stacked by rows (fused in this order)."""
        parts: list[QuantWeight | torch.Tensor] = [self.quant.get(n) for n in names]
        parts = [p if p is not None else self.get(n).to(self.device) for p, n in zip(parts, names)]
        runs: list[list[int]] = []  # consecutive parts served by one projection
        for i, p in enumerate(parts):
            prev = runs[-1] if runs else None
            if prev is not None and isinstance(p, QuantWeight) == isinstance(parts[prev[0]], QuantWeight) and (
                    not isinstance(p, QuantWeight) or cat_rows([parts[j] for j in prev] + [p]) is not None):
                prev.append(i)
            else:
                runs.append([i])
        rows = [p.shape[0] for p in parts]
        offsets = [sum(rows[:i]) for i in range(len(rows) + 1)]
        lins: list[Linear | QuantLinear] = []
        for run in runs:
            b = None if bias is None else bias[offsets[run[0]]:offsets[run[-1] + 1]]
            what = "+".join(names[j] for j in run)
            if isinstance(parts[run[0]], QuantWeight):
                lins.append(self._quant_linear(cat_rows([parts[j] for j in run]), b, what))
            else:
                lins.append(Linear(torch.cat([parts[j] for j in run]), b, backend))
        if len(lins) == 1:
            return lins[0]
        log.info("%s: parts stored in different layouts (bits, groups, act-order or float); served as %d "
                 "projections: %s", ", ".join(names), len(lins), ", ".join(x.backend for x in lins))
        return SplitLinear(lins)
