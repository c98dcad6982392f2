"""LoRA on a base whose activation scales were folded into its weights (AWQ, SmoothQuant).

Such a checkpoint divides a norm's weight by s and multiplies the columns of the linears it feeds by s,
so those linears see h / s where the adapter was trained on h. Where s is known per channel
(c = γ_orig / γ_ckpt, openlora.model.folded_norms), the correction is exact and free at run time:

    B A h  =  B (A diag(c)) (h / c)      so   A' = A * c   (columns, once, when the adapter is packed)

Sites whose input or output scaling cannot be recovered are refused: an adapter that targets one fails
to load with the reason (never a silently wrong delta).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from openlora.errors import UnsupportedAdapter


@dataclass(frozen=True)
class InputFix:
    """What the served base changed at each LoRA site relative to the model adapters are trained on."""

    scale: dict[str, torch.Tensor]  # site -> fp32 [num_layers, in]: A's columns are multiplied by it
    refused: dict[str, str]  # site -> why no adapter may target it on this base
    source: str  # the checkpoint and how it folded (for messages)

    def check(self, adapter) -> None:
        """Raise UnsupportedAdapter when `adapter` (openlora.lora.adapter.LoRAAdapter) targets a refused site,
        or is DoRA on a corrected one (DoRA's weight norm would need the unfolded base weights)."""
        sites = adapter.sites
        bad = [s for s in sites if s in self.refused]
        if bad:
            why = "; ".join(f"{s}: {self.refused[s]}" for s in bad)
            raise UnsupportedAdapter(f"adapter {adapter.adapter_id!r} cannot be served exactly on {self.source}: "
                                     f"{why}")
        scaled = [s for s in sites if s in self.scale]
        if adapter.dora and scaled:
            raise UnsupportedAdapter(f"adapter {adapter.adapter_id!r} is DoRA on {scaled}, whose inputs {self.source} "
                                     "scaled: DoRA's weight norm needs the unfolded base weights")

    def apply(self, site: str, a: torch.Tensor) -> torch.Tensor:
        """A [L, r, in] fp32 of one site -> A * c (a new tensor; unchanged where the site needs none)."""
        c = self.scale.get(site)
        return a if c is None else a * c.unsqueeze(1)  # [L, 1, in] broadcast over the rank rows
