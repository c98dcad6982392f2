"""Receipts -> the Settlement contract's compact charges, and manifests -> registry entries.

A charge carries only what the contract cannot look up: the receipt's seq and id, which
authorization pays it, the billable token counts and the adapters with their ppm weights. The
contract prices and splits it from the registries, by the same rules as `receipts.py`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from openlora.attribution.ids import name_id_bytes
from openlora.attribution.manifest import Manifest
from openlora.attribution.receipts import Receipt


@dataclass(frozen=True)
class Charge:
    """One receipt as `settle` takes it."""

    seq: int
    receipt_id: str
    auth_index: int
    prompt_tokens: int  # billable: 0 when the request did not finish
    completion_tokens: int
    adapters: tuple[tuple[str, int], ...]  # (adapter name, weight ppm)
    price_version: int = 1  # the node's base price version at the time the request was admitted

    def as_tuple(self) -> tuple:
        return (self.seq, bytes.fromhex(self.receipt_id[2:]), self.auth_index, self.prompt_tokens,
                self.completion_tokens, [(name_id_bytes(a), w) for a, w in self.adapters], self.price_version)


def charge_for(receipt: Receipt, auth_index: int, price_version: int = 1) -> Charge:
    """The charge for one receipt (same billable-token rule as `receipts.compute_fee_lines`)."""
    p_tok = receipt.prompt_tokens if receipt.status == "finished" else 0
    return Charge(receipt.seq, receipt.receipt_hash, auth_index, p_tok, receipt.completion_tokens,
                  tuple((a.adapter_id, a.weight_ppm) for a in receipt.adapters), price_version)


def hash32(text: str) -> bytes:
    """A content hash as 32 bytes: 'sha256:<hex>' / '0x<64 hex>' / '<64 hex>' as is, else sha256."""
    t = text.removeprefix("sha256:").removeprefix("0x")
    if len(t) == 64:
        try:
            return bytes.fromhex(t)
        except ValueError:
            pass
    return hashlib.sha256(text.encode()).digest()


def manifest_hash(m: Manifest) -> bytes:
    """sha256 of the manifest's economic terms in canonical JSON (what the registry pins)."""
    terms = {
        "owner": m.owner.lower(), "base_model": m.base_model,
        "price_per_1k_prompt_tokens": m.price_per_1k_prompt_tokens,
        "price_per_1k_completion_tokens": m.price_per_1k_completion_tokens,
        "split": [m.split.operator, m.split.owner, m.split.data],
        "datasets": [{"id": d.id, "ref": d.ref, "weight": d.weight,
                      "contributors": [[c.address.lower(), c.weight] for c in d.contributors]}
                     for d in m.datasets],
    }
    return hashlib.sha256(json.dumps(terms, sort_keys=True, separators=(",", ":")).encode()).digest()
