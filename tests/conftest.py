"""Shared fixtures: tiny random models on disk (built once per session)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """tiny_model_factory(arch, **overrides) -> Path, cached per (arch, overrides)."""
    from tiny_models import make_tiny_model

    made: dict = {}

    def make(arch: str = "llama", **over) -> Path:
        key = (arch, tuple(sorted(over.items(), key=lambda kv: kv[0])).__repr__())
        if key not in made:
            p = tmp_path_factory.mktemp(f"tiny_{arch}")
            made[key] = make_tiny_model(p, arch, **over)
        return made[key]

    return make
