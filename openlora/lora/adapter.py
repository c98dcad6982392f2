"""PEFT-format LoRA adapters: parse a folder into host tensors, and write one back.

An adapter folder holds `adapter_config.json` and `adapter_model.safetensors` (or the older
`adapter_model.bin`). Tensor keys look like
`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` (PEFT drops the adapter name
`default`; other names stay as an infix: `...q_proj.lora_A.my_name.weight`).

Math of one module (PEFT `Linear.forward`): `y = base(x) + scaling * (x @ A^T) @ B^T` with
`A: [r, in_features]`, `B: [out_features, r]` and `scaling = lora_alpha / r`
(`lora_alpha / sqrt(r)` with `use_rslora`), where r and lora_alpha may be overridden per module by
`rank_pattern` / `alpha_pattern` (first pattern key `k` such that `re.match(rf"(.*\\.)?({k})$", module)`).

Other adapter types (openlora.lora.adapter_types): VeRA is converted exactly to LoRA at load; LoHa, LoKr,
OFT, IA3, AdaLoRA..., LoRA trained against a modified base (PiSSA, OLoRA, CorDA, LoftQ) and LyCORIS /
kohya files are refused with UnsupportedAdapter naming the type and the fix.

NOTE: the base-model name an adapter records (`base_model_name_or_path`) is advisory only: the same
weights are often published under several names (mirrors, local copies, quantized repos), so a name
mismatch is logged as a warning and the tensor shapes, checked against the served model's
`ModelShape`, are the real compatibility check.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from openlora.config import LORA_SITES, ModelShape
from openlora.errors import AdapterLoadError, UnsupportedAdapter
from openlora.lora.adapter_types import check_adapter_type, check_foreign_keys, vera_to_lora
from openlora.lora.file_checks import check_safetensors, check_size
from openlora.lora.heads import HEAD_SITES

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
MAX_CONFIG_BYTES = 16 << 20
DEFAULT_MAX_ADAPTER_BYTES = 4 << 30  # LoRAConfig.max_adapter_bytes (--max-adapter-bytes)


# Which submodule of a decoder layer owns each projection (Llama / Mistral / Qwen2 naming).
SITE_PARENT = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}

# `module.lora_A[.adapter_name].weight`; anything else under a LoRA module is unsupported.
_KEY_RE = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.(?P<name>[^.]+))?\.(?P<param>weight|bias)$")
# LoRA on an embedding: PEFT saves `embed_tokens.lora_embedding_A` [r, vocab] and `_B` [hidden, r].
_EMB_RE = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<kind>A|B)(?:\.(?P<name>[^.]+))?(?:\.weight)?$")
# PEFT also saves the base weight of a targeted embedding or head (`save_embedding_layers`): kept only
# to check that it is the served model's own (openlora.lora.device_slots), never used.
_HEAD_BASE_RE = re.compile(r"^(?P<module>.*(?:embed_tokens|lm_head))\.(?:base_layer|original_module)\.weight$")
# modules_to_save of an end: PEFT saves the trained copy as `module.weight` (and, when the vocabulary was
# resized, again as `module.modules_to_save.weight`).
_SAVED_RE = re.compile(r"^(?P<module>.*(?:embed_tokens|lm_head))\.(?:modules_to_save\.)?weight$")
# DoRA's magnitude: PEFT saves `module.lora_magnitude_vector` (raw state dicts: `.<adapter>.weight`).
_MAG_RE = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector(?:\.(?P<name>[^.]+))?(?:\.weight)?$")
_PREFIX = "base_model.model."


@dataclass
class LoRAModule:
    """One adapted projection: `delta(x) = scaling * (x @ a^T) @ b^T`; with DoRA (`magnitude` set) the
    whole output is rescaled per row: y = m / ||W + scaling B A||_row * (W x + delta(x)) + bias."""

    a: torch.Tensor  # fp32 [r, in_features]
    b: torch.Tensor  # fp32 [out_features, r]
    scaling: float  # lora_alpha / r (or / sqrt(r) with rslora), per module
    magnitude: torch.Tensor | None = None  # DoRA: fp32 [out_features] (PEFT's lora_magnitude_vector)

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def delta_weight(self) -> torch.Tensor:
        """The dense update `scaling * B @ A`, fp32 [out_features, in_features]."""
        return (self.b @ self.a) * self.scaling


@dataclass
class LoRAAdapter:
    """A parsed adapter: host fp32 tensors keyed by (layer index, site), plus identity."""

    adapter_id: str
    path: str | None
    config: dict[str, Any]  # the raw adapter_config.json (or a synthetic one for merges)
    base_model_name_or_path: str | None
    modules: dict[tuple[int, str], LoRAModule]
    content_hash: str = ""  # filled by __post_init__ when empty
    # LoRA on the model's ends (HEAD_SITES): "embed_tokens" with a = A [r, vocab], b = B [hidden, r];
    # "lm_head" with a = A [r, hidden], b = B [vocab, r] (openlora.lora.heads applies them).
    heads: dict[str, LoRAModule] = field(default_factory=dict)
    # PEFT's saved copies of the ends' base weights ([vocab', hidden]); their first `vocab` rows must equal
    # the served ones, and rows past them are the base rows of added tokens (openlora.lora.heads).
    head_bases: dict[str, torch.Tensor] = field(default_factory=dict)
    # modules_to_save: the adapter's whole embedding / head matrix, fp32 [vocab', hidden].
    replaced: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.content_hash:
            self.content_hash = compute_content_hash({**self.modules, **{(-1, k): m for k, m in self.heads.items()}},
                                                     {**{f"saved:{k}": t for k, t in self.replaced.items()},
                                                      **{f"base:{k}": t for k, t in self.head_bases.items()}})

    @property
    def vocab_size(self) -> int:
        """Token rows the adapter's ends cover (0 when it touches neither end); above the model's when it
        adds tokens."""
        rows = [t.shape[0] for t in (*self.replaced.values(), *self.head_bases.values())]
        rows += [m.a.shape[1] if s == "embed_tokens" else m.b.shape[0] for s, m in self.heads.items()]
        return max(rows, default=0)

    def site_rank(self, site: str) -> int:
        """Largest rank of `site` over layers (0 if the adapter does not target it)."""
        return max((m.rank for (_, s), m in self.modules.items() if s == site), default=0)

    @property
    def sites(self) -> tuple[str, ...]:
        """Targeted sites, in LORA_SITES order."""
        present = {s for _, s in self.modules}
        return tuple(s for s in LORA_SITES if s in present)

    @property
    def max_rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)

    @property
    def dora(self) -> bool:
        """Whether the adapter is DoRA (every module then has a magnitude)."""
        return any(m.magnitude is not None for m in self.modules.values())

    @property
    def nbytes(self) -> int:
        return sum(m.a.numel() * m.a.element_size() + m.b.numel() * m.b.element_size()
                   for m in (*self.modules.values(), *self.heads.values())) + sum(
            t.numel() * t.element_size() for t in self.replaced.values())

    @property
    def num_layers(self) -> int:
        """1 + the highest adapted layer index (0 for an empty adapter)."""
        return max((layer for layer, _ in self.modules), default=-1) + 1


def compute_content_hash(modules: dict[tuple[int, str], LoRAModule],
                         tensors: dict[str, torch.Tensor] | None = None) -> str:
    """sha256 over what determines the math: per module (layer, site, scaling, A, B), in sorted order.

    The adapter's name, path and cosmetic config fields are excluded, so renaming does not change the
    hash; r / lora_alpha / rslora / patterns enter through the per-module scaling and tensor shapes. A
    DoRA module adds its magnitude (plain LoRA hashes as it always did). `tensors`: whole matrices the
    adapter carries (modules_to_save, saved base rows), by name.
    """
    h = hashlib.sha256(b"openlora-lora-v1")
    for (layer, site) in sorted(modules):
        m = modules[(layer, site)]
        h.update(f"|{layer}|{site}|{float(m.scaling).hex()}|".encode())
        for t in (m.a, m.b) if m.magnitude is None else (m.a, m.b, m.magnitude):
            t = t.detach().to(torch.float32).contiguous()
            h.update(struct.pack(f"<{t.dim()}q", *t.shape))  # 2-D A, B; 1-D magnitude
            h.update(t.numpy().tobytes())
    for name in sorted(tensors or {}):
        t = tensors[name].detach().to(torch.float32).contiguous()
        h.update(f"|{name}|".encode() + struct.pack(f"<{t.dim()}q", *t.shape))
        h.update(t.numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------- loading


def _read_config(folder: Path) -> dict[str, Any]:
    cfg_path = folder / CONFIG_NAME
    if not folder.is_dir():
        raise AdapterLoadError(f"adapter folder {folder} does not exist")
    if not cfg_path.is_file():
        raise AdapterLoadError(f"adapter folder {folder} has no {CONFIG_NAME}")
    check_size(cfg_path, MAX_CONFIG_BYTES)
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterLoadError(f"{cfg_path} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise AdapterLoadError(f"{cfg_path} must hold a JSON object, got {type(cfg).__name__}")
    return cfg


def _read_tensors(folder: Path, max_bytes: int) -> tuple[Path, dict[str, torch.Tensor]]:
    """The weights file and its tensors (safetensors preferred, else torch.load(weights_only=True)),
    checked before anything is allocated: size, and a safetensors header that fits its file."""
    st, bn = folder / SAFETENSORS_NAME, folder / BIN_NAME
    try:
        if st.is_file():
            from safetensors.torch import load_file

            check_safetensors(st, max_bytes)
            return st, load_file(str(st), device="cpu")
        if bn.is_file():
            check_size(bn, max_bytes)
            sd = torch.load(str(bn), map_location="cpu", weights_only=True)
            if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
                raise AdapterLoadError(f"{bn} does not hold a flat dict of tensors")
            return bn, sd
    except AdapterLoadError as e:  # the checks above: say where
        raise AdapterLoadError(f"cannot read adapter weights in {folder}: {e}") from e
    except Exception as e:  # corrupt file, pickle refused by weights_only, truncated safetensors...
        raise AdapterLoadError(f"cannot read adapter weights in {folder}: {type(e).__name__}: {e}") from e
    raise AdapterLoadError(f"adapter folder {folder} has neither {SAFETENSORS_NAME} nor {BIN_NAME}")


def _check_config_features(cfg: dict[str, Any], cfg_path: Path) -> None:
    """Reject configs using features OpenLoRA does not implement (UnsupportedAdapter names each)."""
    where = f"adapter {cfg_path}"
    check_adapter_type(cfg, where)  # LORA or VERA; refuses LoHa, LoKr, ... and PiSSA-style inits (adapter_types)
    if cfg.get("bias", "none") != "none":
        raise UnsupportedAdapter(f"{where}: bias={cfg.get('bias')!r} is not supported (only 'none')")
    if cfg.get("lora_bias"):
        raise UnsupportedAdapter(f"{where}: lora_bias is not supported")
    mts = cfg.get("modules_to_save") or []
    if isinstance(mts, str) or not isinstance(mts, (list, tuple)):
        raise AdapterLoadError(f"{where}: modules_to_save must be a list, got {mts!r}")
    others = [m for m in mts if str(m).split(".")[-1] not in HEAD_SITES]
    if others:
        raise UnsupportedAdapter(f"{where}: modules_to_save {others!r} is not supported (only embed_tokens and "
                                 f"lm_head: a classifier head or a norm is not a language-model adapter)")
    for feat in ("target_parameters", "trainable_token_indices", "layer_replication", "megatron_config"):
        if cfg.get(feat):
            raise UnsupportedAdapter(f"{where}: {feat} is not supported")
    tm = cfg.get("target_modules")
    if isinstance(tm, (list, tuple)):
        for name in tm:
            last = str(name).split(".")[-1]
            if last not in LORA_SITES and last not in HEAD_SITES:
                raise UnsupportedAdapter(
                    f"{where}: target module {name!r} is not supported "
                    f"(only {', '.join(LORA_SITES + HEAD_SITES)})"
                )
    elif tm is not None and not isinstance(tm, str):
        raise AdapterLoadError(f"{where}: target_modules must be a list or a string, got {tm!r}")
    _check_config_types(cfg, where)


def _is_vera(cfg: dict[str, Any]) -> bool:
    return str(cfg.get("peft_type", "LORA")).upper() == "VERA"


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(x)


def _check_regex(value: Any, field: str, where: str) -> None:
    try:
        re.compile(value)
    except (re.error, TypeError) as e:
        raise AdapterLoadError(f"{where}: {field} {value!r} is not a valid regular expression: {e}") from e


def _check_config_types(cfg: dict[str, Any], where: str) -> None:
    """Every field the loader reads has the type PEFT writes (a hostile or corrupt config is a clear
    AdapterLoadError, never a TypeError or re.error from deep inside the loader)."""
    r = cfg.get("r", 8)
    if not _is_int(r) or r < 1:
        raise AdapterLoadError(f"{where}: r must be a positive integer, got {r!r}")
    if not _is_num(cfg.get("lora_alpha", 8)):
        raise AdapterLoadError(f"{where}: lora_alpha must be a number, got {cfg.get('lora_alpha')!r}")
    tm = cfg.get("target_modules")
    if isinstance(tm, str) and tm != "all-linear":
        _check_regex(tm, "target_modules", where)
    elif isinstance(tm, (list, tuple)) and not all(isinstance(t, str) for t in tm):
        raise AdapterLoadError(f"{where}: target_modules must list module names, got {tm!r}")
    ex = cfg.get("exclude_modules")
    if isinstance(ex, str):
        _check_regex(ex, "exclude_modules", where)
    elif ex is not None and not (isinstance(ex, (list, tuple)) and all(isinstance(e, str) for e in ex)):
        raise AdapterLoadError(f"{where}: exclude_modules must be a string or a list of names, got {ex!r}")
    for name, ok in (("rank_pattern", lambda v: _is_int(v) and v >= 1), ("alpha_pattern", _is_num)):
        pat = cfg.get(name)
        if pat is None:
            continue
        if not isinstance(pat, dict) or not all(isinstance(k, str) and ok(v) for k, v in pat.items()):
            raise AdapterLoadError(f"{where}: {name} must map module names to numbers, got {pat!r}")
        for key in pat:
            _check_regex(rf"(.*\.)?({key})$", f"{name} key", where)
    layers = cfg.get("layers_to_transform")
    if layers is not None and not (_is_int(layers) or (isinstance(layers, list) and all(_is_int(x) for x in layers))):
        raise AdapterLoadError(f"{where}: layers_to_transform must be an integer or a list of them, got {layers!r}")
    lp = cfg.get("layers_pattern")
    if lp is not None and not (isinstance(lp, str) or (isinstance(lp, list) and all(isinstance(x, str) for x in lp))):
        raise AdapterLoadError(f"{where}: layers_pattern must be a string or a list of them, got {lp!r}")
    for p in ([lp] if isinstance(lp, str) else lp or []):
        _check_regex(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", "layers_pattern", where)
    if not isinstance(cfg.get("use_rslora", False), bool):
        raise AdapterLoadError(f"{where}: use_rslora must be true or false, got {cfg.get('use_rslora')!r}")


def _targets(cfg: dict[str, Any], module: str) -> bool:
    """PEFT's `check_target_module_exists` for a module path such as `model.layers.0.self_attn.q_proj`."""
    ex = cfg.get("exclude_modules")
    if ex:
        if isinstance(ex, str):
            if re.fullmatch(ex, module):
                return False
        elif module in ex or any(module.endswith("." + e) for e in ex):
            return False
    tm = cfg.get("target_modules")
    if tm is None:
        return True  # PEFT filled in the architecture default; the saved tensors tell us which
    if isinstance(tm, str):
        # "all-linear" means every linear layer but the output head; heads were rejected earlier.
        return tm == "all-linear" or re.fullmatch(tm, module) is not None
    found = module in tm or any(module.endswith("." + t) for t in tm)
    layers = cfg.get("layers_to_transform")
    if found and layers is not None and (not isinstance(layers, list) or layers):
        idx = _layer_index(module, cfg.get("layers_pattern"))
        if idx is None:
            return False
        return idx == layers if isinstance(layers, int) else idx in layers
    return found


def _layer_index(module: str, layers_pattern: str | list[str] | None) -> int | None:
    """The first numbered path segment (after `layers_pattern` if given), as PEFT finds it."""
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        pats = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        m = None
        for p in pats:
            m = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module)
            if m:
                break
    return int(m.group("idx")) if m else None


def pattern_lookup(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching the end of `module`."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _group_keys(sd: dict[str, torch.Tensor], wpath: Path) -> dict[str, dict[str, tuple[str, torch.Tensor]]]:
    """module path -> {"lora_A"/"lora_B": (key, tensor)}; rejects keys of unsupported features."""
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    names: set[str] = set()
    for key, t in sd.items():
        if (mm := _MAG_RE.match(key)) is not None:  # DoRA: checked against use_dora by the caller
            module = mm.group("module")
            module = module[len(_PREFIX):] if module.startswith(_PREFIX) else module
            if mm.group("name"):
                names.add(mm.group("name"))
            groups.setdefault(module, {})["magnitude"] = (key, t)
            continue
        if (ms := _SAVED_RE.match(key)) is not None:  # modules_to_save of an end: checked by the caller
            module = ms.group("module")
            module = module[len(_PREFIX):] if module.startswith(_PREFIX) else module
            groups.setdefault(module, {})["saved"] = (key, t)
            continue
        if "modules_to_save" in key:
            raise UnsupportedAdapter(f"{wpath}: key {key!r}: modules_to_save is only supported for embed_tokens "
                                     f"and lm_head")
        if (me := _EMB_RE.match(key)) is not None:
            module = me.group("module")
            module = module[len(_PREFIX):] if module.startswith(_PREFIX) else module
            if module.split(".")[-1] != "embed_tokens":
                raise UnsupportedAdapter(f"{wpath}: key {key!r}: LoRA on embedding {module!r} is not supported")
            if me.group("name"):
                names.add(me.group("name"))
            groups.setdefault(module, {})["lora_" + me.group("kind")] = (key, t)
            continue
        if (mb := _HEAD_BASE_RE.match(key)) is not None:  # PEFT's copy of an end's base weight
            module = mb.group("module")
            module = module[len(_PREFIX):] if module.startswith(_PREFIX) else module
            groups.setdefault(module, {})["base_layer"] = (key, t)
            continue
        m = _KEY_RE.match(key)
        if m is None:
            raise UnsupportedAdapter(f"{wpath}: key {key!r} is not a lora_A / lora_B weight")
        if m.group("param") == "bias":
            raise UnsupportedAdapter(f"{wpath}: key {key!r}: lora_bias is not supported")
        if m.group("name"):
            names.add(m.group("name"))
        module = m.group("module")
        module = module[len(_PREFIX):] if module.startswith(_PREFIX) else module
        site = module.split(".")[-1]
        if site not in LORA_SITES and site != "lm_head":
            raise UnsupportedAdapter(
                f"{wpath}: key {key!r}: target module {site!r} is not supported "
                f"(only {', '.join(LORA_SITES + HEAD_SITES)})"
            )
        groups.setdefault(module, {})[m.group("kind")] = (key, t)
    if len(names) > 1:
        raise AdapterLoadError(f"{wpath}: tensors of several adapters in one file: {sorted(names)}")
    return groups


def load_peft_adapter(
    path: str | Path, adapter_id: str, shape: ModelShape, *, expected_base_model: str | None = None,
    max_bytes: int = DEFAULT_MAX_ADAPTER_BYTES,
) -> LoRAAdapter:
    """Parse a PEFT LoRA (or VeRA, converted exactly: adapter_types) folder into fp32 host tensors, checked
    against the served model's shape.

    Raises UnsupportedAdapter (DoRA, embed_tokens / lm_head, bias, modules_to_save, other targets, other
    adapter types, PiSSA-style inits, LyCORIS / kohya files) or
    AdapterLoadError (missing files, bad JSON, shape or layer mismatches; messages name file and key).
    A differing `expected_base_model` only logs a warning (see the module NOTE). A weights file above
    `max_bytes`, a malformed safetensors header, or NaN / infinite values are AdapterLoadError too.
    """
    folder = Path(path)
    cfg = _read_config(folder)
    cfg_path = folder / CONFIG_NAME
    _check_config_features(cfg, cfg_path)
    wpath, sd = _read_tensors(folder, max_bytes)
    check_foreign_keys(sd, wpath)  # LyCORIS / kohya files (DoRA's dora_scale, LoHa, lora_down...)
    math_cfg = cfg  # what r / alpha / patterns are read from: VeRA becomes LoRA with scaling 1.0
    if _is_vera(cfg):
        sd, math_cfg = vera_to_lora(sd, cfg, shape, wpath, max_bytes)
    groups = _group_keys(sd, wpath)

    r_default: int = math_cfg.get("r", 8)
    alpha_default: float = math_cfg.get("lora_alpha", 8)
    rank_pattern: dict[str, int] = math_cfg.get("rank_pattern") or {}
    alpha_pattern: dict[str, float] = math_cfg.get("alpha_pattern") or {}
    rslora = bool(math_cfg.get("use_rslora", False))

    modules: dict[tuple[int, str], LoRAModule] = {}
    heads: dict[str, LoRAModule] = {}
    head_bases: dict[str, torch.Tensor] = {}
    replaced: dict[str, torch.Tensor] = {}
    saved_sites = {str(m).split(".")[-1] for m in cfg.get("modules_to_save") or []}
    for module, parts in groups.items():
        site = module.split(".")[-1]
        if "saved" in parts:
            key, t = parts.pop("saved")
            if site not in saved_sites:
                raise AdapterLoadError(f"{wpath}: key {key!r}: {site} is not in the config's modules_to_save")
            replaced[site] = _end_matrix(key, t, shape, wpath)
        if "base_layer" in parts and site in saved_sites:  # original_module: the resized base
            head_bases[site] = _end_matrix(*parts.pop("base_layer"), shape, wpath)
        if not parts:
            continue
        if not _targets(cfg, module):
            # PEFT would not create this module, so it ignores the tensors too ("unexpected keys").
            logger.warning("%s: %s is not targeted by the adapter config; its tensors are ignored", wpath, module)
            continue
        if "base_layer" in parts:
            head_bases[site] = _end_matrix(*parts.pop("base_layer"), shape, wpath)
            if not parts:
                continue
        dora = bool(cfg.get("use_dora"))
        if ("magnitude" in parts) != dora:
            key = next(iter(parts.values()))[0]
            raise AdapterLoadError(
                f"{wpath}: key {key!r}: the config says use_dora={dora} but the module "
                + ("has no lora_magnitude_vector" if dora else "has a lora_magnitude_vector"))
        if "lora_A" not in parts or "lora_B" not in parts:
            have = next(iter(parts.values()))[0]
            missing = "lora_B" if "lora_A" in parts else "lora_A"
            raise AdapterLoadError(f"{wpath}: key {have!r} has no matching {missing} tensor")
        (ka, a), (kb, b) = parts["lora_A"], parts["lora_B"]
        site = module.split(".")[-1]
        if site in HEAD_SITES:
            if dora:
                raise UnsupportedAdapter(f"{wpath}: key {ka!r}: DoRA on {site} is not supported")
            r = pattern_lookup(rank_pattern, module, r_default)
            alpha = pattern_lookup(alpha_pattern, module, alpha_default)
            heads[site] = _head_module(site, ka, a, kb, b, r, alpha, rslora, shape, wpath)
            continue
        layer = _layer_index(module, cfg.get("layers_pattern"))
        if layer is None:
            raise AdapterLoadError(f"{wpath}: key {ka!r}: cannot find a layer index in {module!r}")
        if layer >= shape.num_layers:
            raise AdapterLoadError(
                f"{wpath}: key {ka!r}: layer {layer} does not exist (the model has {shape.num_layers} layers)"
            )
        r = pattern_lookup(rank_pattern, module, r_default)
        alpha = pattern_lookup(alpha_pattern, module, alpha_default)
        in_f, out_f = shape.site_dims(site)
        for key, t, want in ((ka, a, (r, in_f)), (kb, b, (out_f, r))):
            if tuple(t.shape) != want:
                raise AdapterLoadError(
                    f"{wpath}: key {key!r} has shape {tuple(t.shape)}, expected {want} "
                    f"(r={r}, {site} in/out features {in_f}/{out_f})"
                )
        checked = [(ka, a), (kb, b)]
        mag = None
        if dora:
            km, mag = parts["magnitude"]
            if tuple(mag.shape) != (out_f,):
                raise AdapterLoadError(f"{wpath}: key {km!r} has shape {tuple(mag.shape)}, expected ({out_f},) "
                                       f"({site} out features)")
            checked.append((km, mag))
            mag = mag.detach().to(torch.float32).contiguous()
        for key, t in checked:
            if not torch.isfinite(t).all():
                raise AdapterLoadError(f"{wpath}: key {key!r} holds NaN or infinite values")
        scaling = alpha / math.sqrt(r) if rslora else alpha / r
        modules[(layer, site)] = LoRAModule(
            a=a.detach().to(torch.float32).contiguous(), b=b.detach().to(torch.float32).contiguous(),
            scaling=float(scaling), magnitude=mag,
        )
    missing = saved_sites - set(replaced)
    if missing:
        raise AdapterLoadError(f"{wpath}: the config's modules_to_save names {sorted(missing)} but the file has no "
                               f"weights for them")
    if not modules and not heads and not replaced:
        raise AdapterLoadError(f"{wpath}: no LoRA tensors for any of {', '.join(LORA_SITES + HEAD_SITES)}")

    base = cfg.get("base_model_name_or_path")
    if expected_base_model and base and base != expected_base_model:
        logger.warning(
            "adapter %s was trained on %r, serving it on %r (shapes match; the name is advisory)",
            adapter_id, base, expected_base_model,
        )
    return LoRAAdapter(adapter_id=adapter_id, path=str(folder), config=cfg, base_model_name_or_path=base,
                       modules=modules, heads=heads, head_bases=head_bases,
                       replaced=replaced)


def _head_module(site: str, ka: str, a: torch.Tensor, kb: str, b: torch.Tensor, r: int, alpha: float, rslora: bool,
                 shape: ModelShape, wpath: Path) -> LoRAModule:
    """LoRA on embed_tokens (A [r, vocab], B [hidden, r]) or lm_head (A [r, hidden], B [vocab, r]),
    checked against the model; an adapter that adds tokens has more token rows (openlora.lora.heads)."""
    hidden = shape.hidden_size
    got_vocab = a.shape[-1] if site == "embed_tokens" else b.shape[0]
    vocab = max(shape.vocab_size, got_vocab) if a.dim() == 2 and b.dim() == 2 else shape.vocab_size
    want_a, want_b = ((r, vocab), (hidden, r)) if site == "embed_tokens" else ((r, hidden), (vocab, r))
    for key, t, want in ((ka, a, want_a), (kb, b, want_b)):
        if vocab and tuple(t.shape) != want:
            raise AdapterLoadError(f"{wpath}: key {key!r} has shape {tuple(t.shape)}, expected {want} (r={r})")
        if not torch.isfinite(t).all():
            raise AdapterLoadError(f"{wpath}: key {key!r} holds NaN or infinite values")
    scaling = alpha / math.sqrt(r) if rslora else alpha / r
    return LoRAModule(a=a.detach().to(torch.float32).contiguous(), b=b.detach().to(torch.float32).contiguous(),
                      scaling=float(scaling))


def _end_matrix(key: str, t: torch.Tensor, shape: ModelShape, wpath: Path) -> torch.Tensor:
    """A whole embedding / head matrix carried by the adapter, checked: [vocab' >= vocab, hidden], finite."""
    if t.dim() != 2 or (shape.hidden_size and t.shape[1] != shape.hidden_size) or t.shape[0] < shape.vocab_size:
        raise AdapterLoadError(f"{wpath}: key {key!r} has shape {tuple(t.shape)}, expected ({shape.vocab_size} or "
                               f"more token rows, {shape.hidden_size})")
    if not torch.isfinite(t).all():
        raise AdapterLoadError(f"{wpath}: key {key!r} holds NaN or infinite values")
    return t.detach().to(torch.float32).contiguous()


def infer_shape(paths: list[str | Path]) -> ModelShape:
    """A ModelShape consistent with the adapters' own tensors (for tools that have no base model).

    Dimensions no adapter reveals are 0 (nothing targets them, so nothing is checked against them);
    num_layers is 1 + the highest adapted layer index; vocab_size is 0 (adapters never touch it).
    Disagreeing adapters raise AdapterLoadError.
    """
    dims: dict[str, tuple[int, str]] = {}  # dim name -> (value, evidence key)
    num_layers = 0
    # For each site: (name of in_features dim, name of out_features dim).
    site_dims = {
        "q_proj": ("hidden", "q"), "k_proj": ("hidden", "kv"), "v_proj": ("hidden", "kv"), "o_proj": ("q", "hidden"),
        "gate_proj": ("hidden", "inter"), "up_proj": ("hidden", "inter"), "down_proj": ("inter", "hidden"),
    }

    def note(dim: str, value: int, evidence: str) -> None:
        if dim in dims and dims[dim][0] != value:
            raise AdapterLoadError(
                f"adapters disagree on the model shape: {evidence} implies {dim}={value}, "
                f"{dims[dim][1]} implies {dims[dim][0]}"
            )
        dims.setdefault(dim, (value, evidence))

    for p in paths:
        folder = Path(p)
        cfg = _read_config(folder)
        _check_config_features(cfg, folder / CONFIG_NAME)
        if _is_vera(cfg):
            raise UnsupportedAdapter(
                f"adapter {folder}: a VeRA adapter does not reveal the model's shape (its projections are shared "
                f"and sliced per module): give the base model folder (--base-model) to check it against"
            )
        wpath, sd = _read_tensors(folder, DEFAULT_MAX_ADAPTER_BYTES)
        check_foreign_keys(sd, wpath)
        for module, parts in _group_keys(sd, wpath).items():
            site = module.split(".")[-1]
            if site in HEAD_SITES:
                continue  # its vocabulary side is the model's, which a tool without the model does not check
            layer = _layer_index(module, cfg.get("layers_pattern"))
            if layer is not None:
                num_layers = max(num_layers, layer + 1)
            din, dout = site_dims[site]
            if "lora_A" in parts:
                key, a = parts["lora_A"]
                note(din, int(a.shape[-1]), f"{wpath}:{key}")
            if "lora_B" in parts:
                key, b = parts["lora_B"]
                note(dout, int(b.shape[0]), f"{wpath}:{key}")
    get = lambda d: dims.get(d, (0, ""))[0]  # noqa: E731
    return ModelShape(num_layers=num_layers, hidden_size=get("hidden"), q_size=get("q"), kv_size=get("kv"),
                      intermediate_size=get("inter"), vocab_size=0)


# ------------------------------------------------------------------------------------------ saving


def _num(x: float) -> int | float:
    """Write integral floats as ints (PEFT configs conventionally hold ints)."""
    return int(x) if float(x).is_integer() else float(x)


def _target_config(adapter: LoRAAdapter) -> dict[str, Any]:
    """target_modules (+ layers_to_transform) selecting exactly the adapter's (layer, site) set."""
    by_site: dict[str, set[int]] = {}
    for layer, site in adapter.modules:
        by_site.setdefault(site, set()).add(layer)
    sites = [s for s in LORA_SITES if s in by_site]
    layer_sets = {frozenset(v) for v in by_site.values()}
    if len(layer_sets) == 1:
        layers = sorted(next(iter(layer_sets)))
        return {"target_modules": sites, "layers_to_transform": layers, "layers_pattern": "layers"}
    # Different layers per site: one regex alternative per group of sites sharing a layer set
    # (PEFT fullmatches a string target_modules against paths like `model.layers.0.self_attn.q_proj`).
    groups: dict[frozenset[int], list[str]] = {}
    for s in sites:
        groups.setdefault(frozenset(by_site[s]), []).append(s)
    alts = [
        rf"(?:.*\.)?layers\.(?:{'|'.join(str(i) for i in sorted(ls))})\.[^.]+\.(?:{'|'.join(ss)})"
        for ls, ss in groups.items()
    ]
    return {"target_modules": "|".join(f"(?:{a})" for a in alts), "layers_to_transform": None, "layers_pattern": None}


def save_peft_adapter(adapter: LoRAAdapter, out_dir: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write `adapter` as a PEFT LoRA folder that `PeftModel.from_pretrained` loads to the same math.

    r / lora_alpha are the most common (rank, scaling) pair; other modules get rank_pattern /
    alpha_pattern entries (per site when all its layers agree, else per module path) so every
    module's scaling round-trips (use_rslora is always written as False: alpha = scaling * r).
    """
    from safetensors.torch import save_file

    if not adapter.modules:
        raise AdapterLoadError(f"adapter {adapter.adapter_id} has no modules to save")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pairs = Counter((m.rank, m.scaling) for m in adapter.modules.values())
    r0, s0 = pairs.most_common(1)[0][0]
    alpha0 = s0 * r0

    def module_path(layer: int, site: str) -> str:
        return f"model.layers.{layer}.{SITE_PARENT[site]}.{site}"

    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, int | float] = {}
    for site in adapter.sites:
        items = sorted((layer, m) for (layer, s), m in adapter.modules.items() if s == site)
        uniform = len({(m.rank, m.scaling) for _, m in items}) == 1
        for layer, m in items[:1] if uniform else items:
            # A site key ("q_proj") matches that site in every layer; a module key only itself.
            key = site if uniform else re.escape(module_path(layer, site))
            if m.rank != r0:
                rank_pattern[key] = m.rank
            if m.scaling * m.rank != alpha0:
                alpha_pattern[key] = _num(m.scaling * m.rank)

    cfg: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or adapter.base_model_name_or_path,
        "r": r0,
        "lora_alpha": _num(alpha0),
        "use_rslora": False,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        **_target_config(adapter),
    }
    tensors: dict[str, torch.Tensor] = {}
    for (layer, site), m in sorted(adapter.modules.items()):
        prefix = f"{_PREFIX}{module_path(layer, site)}"
        tensors[f"{prefix}.lora_A.weight"] = m.a.detach().to(torch.float32).contiguous()
        tensors[f"{prefix}.lora_B.weight"] = m.b.detach().to(torch.float32).contiguous()
    save_file(tensors, str(out / SAFETENSORS_NAME), metadata={"format": "pt"})
    (out / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out
