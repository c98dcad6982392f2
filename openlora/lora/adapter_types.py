"""Adapter types beside plain PEFT LoRA: VeRA is converted exactly to LoRA at load; the rest are refused
with a message naming the type and the way to a servable adapter.

VeRA (PEFT `peft_type: "VERA"`, peft/tuners/vera): every adapted projection shares two frozen random
matrices, `vera_A: [R, max_in]` and `vera_B: [max_out, R]` (saved once per file as `base_model.vera_A` /
`base_model.vera_B` when `save_projection=True`), and trains two vectors per module,
`vera_lambda_d: [r]` and `vera_lambda_b: [out]`. PEFT's forward is

    delta(x) = lambda_b * (B[:out, :r] @ (lambda_d * (A[:r, :in] @ x)))

with no alpha scaling, which is LoRA with `A' = diag(lambda_d) A[:r, :in]`, `B' = diag(lambda_b) B[:out, :r]`
and scaling 1.0. The slices need the served model's in/out features, so conversion takes its ModelShape.

Adapters trained against a modified base (PiSSA, OLoRA, CorDA, LoRA-GA, LoftQ: PEFT rewrites the base
weights at init) are refused: OpenLoRA serves every adapter on the one original base. PEFT's
`save_pretrained(..., path_initial_model_for_weight_conversion=...)` turns them into ordinary LoRA
(rank 2r, `init_lora_weights: true`, nothing else marks them), which loads like any other.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from openlora.config import LORA_SITES, ModelShape
from openlora.errors import AdapterLoadError, UnsupportedAdapter

SERVED_TYPES = ("LORA", "VERA")

# Why each refused PEFT type cannot be served as LoRA (the message says what to do instead).
_REFUSED_WHY = {
    "LOHA": "LoHa's update is a Hadamard product of two low-rank pairs, not a low-rank product",
    "LOKR": "LoKr's update is a Kronecker product, not a low-rank product",
    "OFT": "OFT multiplies the base weights by a learned rotation",
    "BOFT": "BOFT multiplies the base weights by a learned butterfly rotation",
    "IA3": "IA3 rescales activations instead of adding a low-rank update",
    "ADALORA": "AdaLoRA stores an SVD-form update with per-layer rank budgets",
}
_MERGE_HINT = ("merge it into the base model (PEFT `merge_and_unload()`) and serve the merged model, "
               "or train a LoRA adapter (peft_type LORA)")

# init_lora_weights values whose adapters assume modified base weights (PEFT's LoraLayer.update_layer
# tests `startswith("pissa")`, `startswith("corda")`, and `== "olora"` / `"loftq"` / `"lora_ga"`).
_MUTATING_PREFIXES = {"pissa": "PiSSA", "corda": "CorDA", "olora": "OLoRA", "lora_ga": "LoRA-GA", "loftq": "LoftQ"}
_CONVERT_HINT = (
    "Convert it to plain LoRA with PEFT: save the adapter once right after get_peft_model (before training), "
    "then save the trained one with `model.save_pretrained(out, path_initial_model_for_weight_conversion="
    "<that initial folder>)`; the result is an ordinary LoRA (rank 2r, init_lora_weights true) valid on the "
    "original base model"
)

# LyCORIS / kohya (sd-scripts) key suffixes, most specific first: (suffix, what the file is).
_FOREIGN_KEYS = (
    (".hada_w1_a", "a LyCORIS LoHa file"), (".lokr_w1", "a LyCORIS LoKr file"),
    (".oft_blocks", "a LyCORIS OFT file"), (".oft_diag", "a LyCORIS OFT file"),
    (".lora_down.weight", "a kohya / LyCORIS LoRA file (lora_down / lora_up keys)"),
    (".diff", "a LyCORIS full-weight diff file"),
)

_VERA_LAMBDA_RE = re.compile(r"^(?P<module>.+)\.vera_lambda_(?P<kind>b|d)(?:\.(?P<name>[^.]+))?$")
_VERA_PROJ_RE = re.compile(r"^base_model\.vera_(?P<kind>A|B)(?:\.(?P<name>[^.]+))?$")
_PREFIX = "base_model.model."


def check_adapter_type(cfg: dict[str, Any], where: str) -> str:
    """The upper-cased peft_type when OpenLoRA serves it (LORA, VERA); UnsupportedAdapter otherwise,
    and for LoRA trained against modified base weights (see the module doc)."""
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type not in SERVED_TYPES:
        why = _REFUSED_WHY.get(peft_type)
        fix = (f"{why}; {_MERGE_HINT}" if why else
               "it is not a LoRA-family adapter; train a LoRA adapter (peft_type LORA), or merge it into the base "
               "model where PEFT can (`merge_and_unload()`) and serve the merged model")
        raise UnsupportedAdapter(
            f"{where}: peft_type {cfg.get('peft_type')!r} is not supported (OpenLoRA serves LORA and VERA): {fix}"
        )
    if peft_type == "LORA":
        _check_lora_init(cfg, where)
    return peft_type


def _check_lora_init(cfg: dict[str, Any], where: str) -> None:
    """Refuse init_lora_weights values (and a LoftQ config) that rewrite the base weights."""
    init = cfg.get("init_lora_weights", True)
    low = init.lower() if isinstance(init, str) else ""
    method = next((name for prefix, name in _MUTATING_PREFIXES.items() if low.startswith(prefix)), None)
    shown = repr(init)
    if method is None and cfg.get("loftq_config"):  # PEFT empties loftq_config unless init is "loftq"
        method, shown = "LoftQ", f"{init!r} with a non-empty loftq_config"
    if method is None:
        return
    extra = ""
    if method == "LoftQ":
        extra = (" (for LoftQ the conversion is approximate: it is off by LoftQ's quantization residual; "
                 "exact serving needs the LoftQ base weights, i.e. merge into that base and serve the result)")
    raise UnsupportedAdapter(
        f"{where}: init_lora_weights={shown} ({method}) trains the adapter against modified base weights "
        f"(PEFT rewrites the base at init), so it is wrong on the original base model that OpenLoRA serves. "
        f"{_CONVERT_HINT}{extra}"
    )


def check_foreign_keys(sd: dict[str, torch.Tensor], wpath: Path) -> None:
    """Refuse LyCORIS / kohya files by their keys, DoRA first (`dora_scale`), naming what they are."""
    for key, t in sd.items():
        if key.endswith(".dora_scale") or key == "dora_scale":
            raise UnsupportedAdapter(
                f"{wpath}: key {key!r}: a LyCORIS / kohya DoRA file ({_dora_axis(t)}); this weight-decomposed "
                f"LoRA is not PEFT's use_dora and is not supported: merge it into the base model with the tool "
                f"that trained it and serve the merged model, or train a PEFT LoRA adapter"
            )
    for key in sd:
        for suffix, what in _FOREIGN_KEYS:
            if key.endswith(suffix):
                raise UnsupportedAdapter(
                    f"{wpath}: key {key!r}: {what}, not a PEFT adapter; OpenLoRA loads PEFT-format adapters "
                    f"(lora_A / lora_B keys with adapter_config.json): convert it to PEFT format, or merge it "
                    f"into the base model and serve the merged model"
                )


def _dora_axis(t: torch.Tensor) -> str:
    """Which axis a `dora_scale` normalizes, from its shape ([out, 1]: per output row; [1, in]: per input
    column, the LyCORIS default that differs from PEFT's per-output magnitude)."""
    shape = tuple(t.shape)
    if len(shape) >= 2 and shape[0] == 1 and shape[1] != 1:
        return f"dora_scale {shape}: magnitude normalized per input column"
    if len(shape) >= 2 and shape[1] == 1:
        return f"dora_scale {shape}: magnitude normalized per output row"
    return f"dora_scale {shape}"


# ----------------------------------------------------------------------------------------------- VeRA


def vera_to_lora(sd: dict[str, torch.Tensor], cfg: dict[str, Any], shape: ModelShape, wpath: Path,
                 max_bytes: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A VeRA state dict as LoRA tensors (`<module>.lora_A.weight` / `.lora_B.weight`, fp32) and the config
    the LoRA loader should read for the math (lora_alpha = r: scaling 1.0, no rslora, no patterns).

    Raises UnsupportedAdapter when the shared projections are missing (save_projection=False) or a key is
    not VeRA's, AdapterLoadError on shapes that do not fit the served model or non-finite values.
    """
    r: int = cfg.get("r", 256)  # VeraConfig's default; checked to be a positive int by the caller
    proj: dict[str, tuple[str, torch.Tensor]] = {}
    lambdas: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    names: set[str] = set()
    for key, t in sd.items():
        if (m := _VERA_PROJ_RE.match(key)) is not None:
            proj[m.group("kind")] = (key, t)
        elif (m := _VERA_LAMBDA_RE.match(key)) is not None:
            module = m.group("module").removeprefix(_PREFIX)
            lambdas.setdefault(module, {})[m.group("kind")] = (key, t)
        else:
            raise UnsupportedAdapter(f"{wpath}: key {key!r} is not a VeRA lambda or projection (peft_type VERA)")
        if m.group("name"):
            names.add(m.group("name"))
    if len(names) > 1:
        raise AdapterLoadError(f"{wpath}: tensors of several adapters in one file: {sorted(names)}")
    if set(proj) != {"A", "B"}:
        raise UnsupportedAdapter(
            f"{wpath}: VeRA adapter without its shared projections vera_A / vera_B (saved with "
            f"save_projection=False; PEFT would regenerate them from projection_prng_key, which is not "
            f"reproducible across systems): re-save it with VeraConfig(save_projection=True)"
        )
    (ka, a_shared), (kb, b_shared) = proj["A"], proj["B"]
    if a_shared.dim() != 2 or b_shared.dim() != 2 or a_shared.shape[0] < r or b_shared.shape[1] < r:
        raise AdapterLoadError(
            f"{wpath}: VeRA projections {ka!r} {tuple(a_shared.shape)} / {kb!r} {tuple(b_shared.shape)} "
            f"do not fit r={r} (expected [>= r, in] and [out, >= r])"
        )
    _check_finite(((ka, a_shared), (kb, b_shared)), wpath)

    plan: list[tuple[str, str, tuple[str, torch.Tensor], tuple[str, torch.Tensor], int, int]] = []
    for module, parts in lambdas.items():
        if set(parts) != {"b", "d"}:
            have = next(iter(parts.values()))[0]
            raise AdapterLoadError(f"{wpath}: key {have!r} has no matching vera_lambda_"
                                   f"{'d' if 'b' in parts else 'b'} tensor")
        site = module.split(".")[-1]
        if site not in LORA_SITES:
            raise UnsupportedAdapter(
                f"{wpath}: key {parts['b'][0]!r}: target module {site!r} is not supported "
                f"(only {', '.join(LORA_SITES)})"
            )
        in_f, out_f = shape.site_dims(site)
        for (key, t), want in ((parts["b"], (out_f,)), (parts["d"], (r,))):
            if tuple(t.shape) != want:
                raise AdapterLoadError(f"{wpath}: key {key!r} has shape {tuple(t.shape)}, expected {want} "
                                       f"(r={r}, {site} out features {out_f})")
        if a_shared.shape[1] < in_f or b_shared.shape[0] < out_f:
            raise AdapterLoadError(
                f"{wpath}: VeRA projections {tuple(a_shared.shape)} / {tuple(b_shared.shape)} are smaller than "
                f"{site}'s in/out features {in_f}/{out_f} (an adapter for another base model?)"
            )
        _check_finite((parts["b"], parts["d"]), wpath)
        plan.append((module, site, parts["b"], parts["d"], in_f, out_f))

    need = sum(4 * r * (in_f + out_f) for *_, in_f, out_f in plan)  # fp32 LoRA bytes, before allocating
    if need > max_bytes:
        raise AdapterLoadError(f"{wpath}: the VeRA adapter expands to {need} bytes of LoRA tensors, above the "
                               f"limit of {max_bytes} bytes (--max-adapter-bytes)")
    a32, b32 = a_shared.detach().to(torch.float32), b_shared.detach().to(torch.float32)
    out: dict[str, torch.Tensor] = {}
    for module, _site, (_, lam_b), (_, lam_d), in_f, out_f in plan:
        # A' [r, in] = lambda_d[:, None] * A[:r, :in];  B' [out, r] = lambda_b[:, None] * B[:out, :r]
        out[f"{_PREFIX}{module}.lora_A.weight"] = (lam_d.to(torch.float32)[:, None] * a32[:r, :in_f]).contiguous()
        out[f"{_PREFIX}{module}.lora_B.weight"] = (lam_b.to(torch.float32)[:, None] * b32[:out_f, :r]).contiguous()
    math_cfg = {**cfg, "r": r, "lora_alpha": r, "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {}}
    return out, math_cfg


def _check_finite(items: Any, wpath: Path) -> None:
    for key, t in items:
        if not torch.is_floating_point(t):
            raise AdapterLoadError(f"{wpath}: key {key!r} has dtype {t.dtype}, expected a float tensor")
        if not torch.isfinite(t).all():
            raise AdapterLoadError(f"{wpath}: key {key!r} holds NaN or infinite values")
