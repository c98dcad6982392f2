"""`openlora ledger explain RECEIPT_ID --answer FILE`: re-run span-level attribution for a caller who kept
the answer, and show that the receipt's credits, and the data payouts that follow from them, are what
the answer gives.

The node keeps no text, so the caller brings the answer: a text file (tokenized with the base model's
tokenizer, `--tokenizer`), or JSON `{"token_ids": [[...], ...]}` with each sample's ids as the response
returned them. The adapters' manifests (with their datasets' contributions) come from their folders
(`--adapter NAME=DIR`). Checks, per (adapter, dataset) the receipt credits:
  1. every contributor's credit equals the one recomputed from the answer (same method, min_span, lambda);
  2. the dataset's data amount is split among its contributors exactly as `spans.blend` of the manifest's
     weights and those credits gives (`split_exact`, the receipts' rule).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from openlora.attribution.manifest import Manifest
from openlora.attribution.receipts import Receipt
from openlora.attribution.span_service import SpanAttributor
from openlora.attribution.splits import split_exact


def read_answer(path: Path, tokenizer: Any) -> list[list[int]]:
    """Each sample's token ids: JSON {"token_ids": [[...]]} as is, any other file as one text sample."""
    raw = path.read_bytes()
    try:
        doc = json.loads(raw)
        if isinstance(doc, dict) and isinstance(doc.get("token_ids"), list):
            return [[int(t) for t in s] for s in doc["token_ids"]]
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError):
        pass
    return [tokenizer(raw.decode("utf-8"), add_special_tokens=False)["input_ids"]]


def explain(receipt: Receipt, answer: list[list[int]], manifests: dict[str, Manifest], tokenizer: Any,
            cache_root: Path | None = None) -> dict[str, Any]:
    """The recomputation for `receipt` (module docstring): {"ok", "method", "datasets": [...], "spans"}."""
    if not receipt.span_method:
        return {"ok": False, "reason": "this receipt used the fixed contributor weights (no span attribution)"}
    ids = [a.adapter_id for a in receipt.adapters]
    missing = [a for a in ids if a not in manifests]
    if missing:
        return {"ok": False, "reason": f"no manifest for adapter(s) {missing}: give --adapter NAME=DIR"}
    with tempfile.TemporaryDirectory() as tmp:
        spans = SpanAttributor(tokenizer, cache_root or Path(tmp))
        try:
            for a in ids:
                spans.wait_ready(manifests[a])
            outcome = spans.attribute(ids, [manifests[a] for a in ids], answer)
        finally:
            spans.close()
    if outcome is None or outcome.method != receipt.span_method:
        return {"ok": False, "reason": f"method differs: receipt {receipt.span_method!r}, "
                                       f"recomputed {outcome.method if outcome else None!r}"}
    got = {(c.adapter_id, c.dataset_id, c.contributor): c.credit for c in outcome.credits}
    rows, ok = [], True
    for c in receipt.credits:
        again = got.get((c.adapter_id, c.dataset_id, c.contributor))
        rows.append({"adapter": c.adapter_id, "dataset": c.dataset_id, "contributor": c.contributor,
                     "credit": c.credit, "recomputed": again})
        ok &= again == c.credit
    ok &= len(got) == len(receipt.credits)
    for line in receipt.datasets:
        weights = outcome.weights.get((line.adapter_id, line.dataset_id))
        if weights is None:
            continue
        ds = next(d for d in manifests[line.adapter_id].datasets if d.id == line.dataset_id)
        want = split_exact(line.amount, [weights[c.address.lower()] for c in ds.contributors],
                           [c.address.lower() for c in ds.contributors])
        paid = {p.recipient: p.amount for p in receipt.payouts
                if p.role == "data" and p.ref == f"{line.adapter_id}/{line.dataset_id}"}
        follows = [paid.get(c.address, 0) for c in ds.contributors] == want
        rows.append({"adapter": line.adapter_id, "dataset": line.dataset_id, "data_amount": line.amount,
                     "payouts_follow_credits": follows})
        ok &= follows
    return {"ok": ok, "receipt_id": receipt.receipt_hash, "method": receipt.span_method, "checks": rows,
            "spans": outcome.spans}
