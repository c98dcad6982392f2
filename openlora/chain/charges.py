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
    # span-level attribution: (adapter index, datanet index, lambda ppm, credit per contributor)
    spans: tuple[tuple[int, int, int, tuple[int, ...]], ...] = ()

    def as_tuple(self) -> tuple:
        return (self.seq, bytes.fromhex(self.receipt_id[2:]), self.auth_index, self.prompt_tokens,
                self.completion_tokens, [(name_id_bytes(a), w) for a, w in self.adapters], self.price_version)


def span_tuples(charges: list[Charge]) -> list[tuple]:
    """The batch's span lines as `settle` takes them: (charge index, adapter index, datanet index,
    lambda ppm, credits), sorted by charge index."""
    return [(i, a, d, lam, list(c)) for i, ch in enumerate(charges) for a, d, lam, c in ch.spans]


def charge_for(receipt: Receipt, auth_index: int, price_version: int = 1) -> Charge:
    """The charge for one receipt (same billable-token rule as `receipts.compute_fee_lines`)."""
    p_tok = receipt.prompt_tokens if receipt.status == "finished" else 0
    return Charge(receipt.seq, receipt.receipt_hash, auth_index, p_tok, receipt.completion_tokens,
                  tuple((a.adapter_id, a.weight_ppm) for a in receipt.adapters), price_version,
                  span_lines(receipt))


def span_lines(receipt: Receipt) -> tuple[tuple[int, int, int, tuple[int, ...]], ...]:
    """The receipt's span credits as the contract takes them: per (adapter, dataset) that was matched,
    its indexes in the receipt (= registry order), lambda (from the signed method) and the credits in
    contributor order."""
    if not receipt.span_method:
        return ()
    lam = {}
    for part in receipt.span_method.split(";")[1:]:  # "<adapter>:min_span=6,lambda_ppm=500000"
        name, _, params = part.rpartition(":")
        lam[name] = int(dict(kv.split("=") for kv in params.split(","))["lambda_ppm"])
    credits: dict[tuple[str, str], list[int]] = {}
    for c in receipt.credits:
        credits.setdefault((c.adapter_id, c.dataset_id), []).append(c.credit)
    out = []
    for ai, a in enumerate(receipt.adapters):
        lines = [d for d in receipt.datasets if d.adapter_id == a.adapter_id]
        for di, d in enumerate(lines):
            got = credits.get((a.adapter_id, d.dataset_id))
            if got is not None:
                out.append((ai, di, lam[a.adapter_id], tuple(got)))
    return tuple(out)


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
