"""Proof of Attribution: every request becomes a signed receipt that names base model, adapter
versions, datasets and contributors, and splits the fee exactly; receipts are kept in an
append-only, hash-chained SQLite ledger and grouped into Merkle-rooted epochs.

Consumes `openlora.outputs.UsageEvent`; the engine never imports this package.

Modules: manifest (per-adapter attribution.json), identity (node key), splits (integer math),
eip712 (fast typed-data encoder), receipts (fee rule + signing), ledger (SQLite), epochs
(Merkle roots and proofs), service (AttributionService), cli (`openlora ledger ...`).
"""

from openlora.attribution.epochs import Epoch, EpochManager, merkle_root, verify_proof
from openlora.attribution.identity import NodeIdentity
from openlora.attribution.ledger import BadReceipt, Ledger, LedgerError
from openlora.attribution.manifest import DefaultPolicy, Manifest, load_manifest, parse_manifest
from openlora.attribution.receipts import Receipt, build_receipt, verify_receipt
from openlora.attribution.service import AttributionService, ReceiptNotFound
from openlora.attribution.splits import split_exact, weights_to_ppm

__all__ = [
    "AttributionService", "BadReceipt", "DefaultPolicy", "Epoch", "EpochManager", "Ledger",
    "LedgerError", "Manifest", "NodeIdentity", "Receipt", "ReceiptNotFound", "build_receipt",
    "load_manifest", "merkle_root", "parse_manifest", "split_exact", "verify_proof",
    "verify_receipt", "weights_to_ppm",
]
