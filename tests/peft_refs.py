"""PEFT as the reference: random adapters saved by PEFT itself, and PEFT's logits for one adapter."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from tiny_models import load_hf


def make_adapters(model_path: Path, root: Path, specs: list[tuple[str, dict[str, Any]]], seed: int) -> dict[str, Path]:
    """Save one random PEFT adapter per (name, LoraConfig kwargs) under `root`; returns name -> folder.

    Every factor is made to matter: B (zero-initialized in training) is scaled up so each adapter
    clearly moves the logits; PEFT draws both embedding factors from randn, so those are scaled down to
    keep the update O(1); DoRA's magnitude equals ||W + sBA|| at init (g = 1), so it is jittered."""
    from peft import LoraConfig, get_peft_model

    base = load_hf(model_path)
    out = {}
    for i, (name, kw) in enumerate(specs):
        torch.manual_seed(seed + i)
        pm = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, lora_dropout=0.0, **kw))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_embedding" in n:
                    p.mul_(0.3)
                elif "lora_B" in n:
                    p.mul_(3.0)
                elif "lora_magnitude_vector" in n:
                    p.mul_(torch.empty_like(p).uniform_(0.6, 1.4))
        pm.save_pretrained(str(root / name))
        out[name] = root / name
    return out


def peft_logits(model_path: Path, adapter: Path | None, ids: list[int]) -> torch.Tensor:
    """The base model (or base + one PEFT adapter) logits over `ids`, fp32 [len(ids), vocab]."""
    from peft import PeftModel

    m = load_hf(model_path)
    if adapter is not None:
        m = PeftModel.from_pretrained(m, str(adapter)).eval()
    with torch.no_grad():
        return m(torch.tensor([ids])).logits[0]
