"""Read a Hugging Face model folder's safetensors (single or sharded) into plain tensors."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from openlora.errors import ModelLoadError


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelLoadError(f"{index} is not a valid safetensors index: {e}") from e
        files = sorted({path / f for f in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise ModelLoadError(f"shard {f.name} listed in {index.name} is missing from {path}")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    others = sorted(path.glob("*.safetensors"))
    if others:
        return others
    raise ModelLoadError(f"model folder {path} has no model.safetensors (nor a sharded index)")


class CheckpointReader:
    """Name -> tensor access over all safetensors files of a checkpoint, cast on read."""

    def __init__(self, path: str | Path, dtype: torch.dtype) -> None:
        self.path = Path(path)
        self.dtype = dtype
        self._where: dict[str, Path] = {}
        for f in _weight_files(self.path):
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    self._where[k] = f

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        f = self._where.get(name)
        if f is None:
            raise ModelLoadError(f"tensor {name!r} is missing from the checkpoint in {self.path}")
        with safe_open(str(f), framework="pt") as h:
            return h.get_tensor(name).to(self.dtype)
