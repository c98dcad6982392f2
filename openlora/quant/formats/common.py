"""What every safetensors-based quantized format shares: the quantization config, the tensors, the
integer packing, act-order permutations and errors that name the tensor."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from openlora.errors import ModelLoadError
from openlora.model.loader import _weight_files

# Files that carry a quantization config, in the order they are looked at. AutoGPTQ writes
# quantize_config.json, AutoAWQ (older) quant_config.json; everything recent puts it in config.json.
CONFIG_FILES = ("config.json", "quantize_config.json", "quant_config.json")


def bad(path: Path | str, tensor: str, why: str) -> ModelLoadError:
    """The one error shape of the loaders: the checkpoint, the tensor, what is wrong with it."""
    return ModelLoadError(f"{path}: tensor {tensor!r}: {why}")


def quant_config(folder: Path) -> tuple[dict[str, Any], str] | None:
    """(quantization config, the file it came from) or None when the folder declares none.

    config.json's `quantization_config` wins; the stand-alone files are whole configs themselves."""
    for fname in CONFIG_FILES:
        f = folder / fname
        if not f.is_file():
            continue
        try:
            data = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{f} is not valid JSON: {e}") from e
        if fname == "config.json":
            data = data.get("quantization_config")
            if data is None:
                continue
        if not isinstance(data, dict):
            raise ModelLoadError(f"{f}: the quantization config is not a JSON object")
        return data, fname
    return None


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors files (single, sharded through the index, or loose)."""
    out: dict[str, torch.Tensor] = {}
    for f in _weight_files(folder):
        out.update(load_file(str(f)))
    return out


def need(tensors: dict[str, torch.Tensor], path: Path, name: str, dtypes: tuple[torch.dtype, ...],
         ndim: int | None = None) -> torch.Tensor:
    """tensors[name], checked for presence, dtype and rank (ModelLoadError naming it otherwise)."""
    t = tensors.get(name)
    if t is None:
        raise bad(path, name, "is missing")
    if t.dtype not in dtypes:
        raise bad(path, name, f"has dtype {t.dtype}, expected one of {[str(d) for d in dtypes]}")
    if ndim is not None and t.dim() != ndim:
        raise bad(path, name, f"has shape {tuple(t.shape)}, expected {ndim} dimensions")
    return t


def check_shape(path: Path, name: str, t: torch.Tensor, want: tuple[int, ...]) -> None:
    if tuple(t.shape) != want:
        raise bad(path, name, f"has shape {tuple(t.shape)}, expected {want}")


FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Unsigned `bits`-wide fields of int32 words, sequential order: value i of a word sits at bits
    bits*i .. bits*i+bits-1, and the values of one word are consecutive along `dim` (0 or 1).

    [R, C] int32 -> int32 [R * 32/bits, C] (dim 0) or [R, C * 32/bits] (dim 1), values in [0, 2^bits)."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)  # [per]
    # NOTE: >> on int32 is arithmetic, the mask drops the copied sign bits
    vals = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [R, C, per]
    r, c = packed.shape
    if dim == 1:
        return vals.reshape(r, c * per)
    return vals.permute(0, 2, 1).reshape(r * per, c)


def perm_from_g_idx(path: Path, name: str, g_idx: torch.Tensor, group: int) -> torch.Tensor | None:
    """The column order that makes groups contiguous (None when `g_idx` is already k // group).

    g_idx [K] says the group of each input column. Act-order checkpoints (GPTQ desc_act) scatter
    them; sorting stably by group gives stored columns W[:, perm] whose column j is in group j // group,
    provided every group holds exactly `group` columns (refused otherwise: no QuantWeight can say it)."""
    k = g_idx.numel()
    g = g_idx.to(torch.int64)
    natural = torch.arange(k, dtype=torch.int64) // group
    if torch.equal(g, natural):
        return None
    if int(g.min()) < 0 or int(g.max()) >= k // group:
        raise bad(path, name, f"has group indices outside [0, {k // group})")
    perm = torch.argsort(g, stable=True)
    if not torch.equal(g[perm], natural):
        raise bad(path, name, f"does not give every group exactly {group} columns")
    return perm
