"""The served base model's projections by LoRA site, as DoRA's row scale needs them
(openlora.lora.dora.BaseProjections): through the very Linear objects (and weights) that serve requests."""

from __future__ import annotations

import torch

from openlora.model.linear import Linear


class ServedProjections:
    """(layer, site) -> the fused Linear that computes it and the site's column range in its output."""

    def __init__(self, model) -> None:
        self.model = model  # openlora.model.llama.LlamaModel
        layer = model.layers[0] if len(model.layers) else None
        q, kv, i = (layer.q_size, layer.kv_size, layer.inter) if layer is not None else (0, 0, 0)
        self._where = {  # site -> (attribute of the layer, first column, last column)
            "q_proj": ("qkv", 0, q), "k_proj": ("qkv", q, q + kv), "v_proj": ("qkv", q + kv, q + 2 * kv),
            "o_proj": ("o", 0, None), "gate_proj": ("gate_up", 0, i), "up_proj": ("gate_up", i, 2 * i),
            "down_proj": ("down", 0, None),
        }

    def _lin(self, layer: int, site: str) -> tuple[Linear, slice]:
        attr, lo, hi = self._where[site]
        return getattr(self.model.layers[layer], attr), slice(lo, hi)

    @torch.no_grad()
    def project(self, layer: int, site: str, x: torch.Tensor) -> torch.Tensor:
        lin, cols = self._lin(layer, site)
        y = lin(x.to(self.model.dtype).contiguous()).float()  # [n, fused out]
        if lin.bias is not None:
            y -= lin.bias.float()
        return y[:, cols]

    def row_sq(self, layer: int, site: str) -> torch.Tensor:
        lin, cols = self._lin(layer, site)
        return lin.row_sq[cols]

    def end_weight(self, site: str) -> torch.Tensor | None:
        """The served embedding ("embed_tokens") or output head ("lm_head") matrix, [vocab, hidden]."""
        return {"embed_tokens": self.model.embed, "lm_head": self.model.lm_head}.get(site)

    def bias(self, layer: int, site: str) -> torch.Tensor | None:
        lin, cols = self._lin(layer, site)
        return None if lin.bias is None else lin.bias.float()[cols]
