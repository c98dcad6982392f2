"""Epochs: consecutive receipts grouped under one Merkle root, with cumulative totals per address.

Merkle tree (OpenZeppelin `MerkleProof.verify` compatible):
* leaf = keccak256(receipt_hash), receipt hashes (32 bytes) taken in seq order. Hashing the leaf
  once more means no 64-byte internal node can ever pass for a leaf (second-preimage safety);
* parent = keccak256(min(a, b) || max(a, b)) (sorted pairs: a proof is just the list of siblings,
  no left/right flags);
* a level with an odd count promotes its last node unchanged (no duplication, so no
  CVE-2012-2459-style ambiguity); the root of a one-receipt epoch is that receipt's leaf.
On chain: `MerkleProof.verify(proof, root, keccak256(abi.encodePacked(receiptHash)))`.

An epoch closes when `epoch_size` receipts are waiting (`maybe_close`, called by the service after
each commit) or explicitly (`close`). Each epoch row stores first/last seq, the root, the hash of
its last receipt, per-epoch and cumulative totals per address, and (when the manager has a node
identity) an EIP-712 signature over all of these. Epoch rows are append-only like receipts.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from eth_account import Account

from openlora.attribution import eip712
from openlora.attribution.identity import NodeIdentity
from openlora.attribution.ledger import Ledger
from openlora.attribution.receipts import DOMAIN_VERSION, ZERO_HASH
from openlora.errors import InvalidRequest

EPOCH_SCHEMA = """
CREATE TABLE IF NOT EXISTS epochs (
    epoch             INTEGER PRIMARY KEY,   -- 1, 2, 3, ...
    first_seq         INTEGER NOT NULL,
    last_seq          INTEGER NOT NULL,
    merkle_root       TEXT NOT NULL,
    last_receipt_hash TEXT NOT NULL,
    totals            TEXT NOT NULL,         -- JSON {address: amount} for this epoch
    cumulative        TEXT NOT NULL,         -- JSON {address: amount} up to and including it
    closed_at_ms      INTEGER NOT NULL,
    signature         TEXT NOT NULL          -- node's EIP-712 signature ('' if unsigned)
);
CREATE TRIGGER IF NOT EXISTS epochs_no_update BEFORE UPDATE ON epochs
BEGIN SELECT RAISE(ABORT, 'epochs are append-only'); END;
CREATE TRIGGER IF NOT EXISTS epochs_no_delete BEFORE DELETE ON epochs
BEGIN SELECT RAISE(ABORT, 'epochs are append-only'); END;
CREATE TRIGGER IF NOT EXISTS epochs_contiguous BEFORE INSERT ON epochs
WHEN NEW.first_seq IS NOT (SELECT COALESCE(MAX(last_seq), 0) + 1 FROM epochs)
  OR NEW.last_seq < NEW.first_seq
BEGIN SELECT RAISE(ABORT, 'epochs must be contiguous'); END;
"""

_EPOCH_TYPES = {
    "EIP712Domain": [{"name": "name", "type": "string"}, {"name": "version", "type": "string"}],
    "Epoch": [
        {"name": "epoch", "type": "uint64"},
        {"name": "firstSeq", "type": "uint64"},
        {"name": "lastSeq", "type": "uint64"},
        {"name": "merkleRoot", "type": "bytes32"},
        {"name": "lastReceiptHash", "type": "bytes32"},
        {"name": "cumulativeHash", "type": "bytes32"},  # keccak of the canonical cumulative JSON
    ],
}


def _b(h: str) -> bytes:
    return bytes.fromhex(h[2:] if h.startswith("0x") else h)


def _hex(b: bytes) -> str:
    return "0x" + b.hex()


def _pair(a: bytes, b: bytes) -> bytes:
    return eip712.keccak256(a + b if a <= b else b + a)


def leaf_hash(receipt_hash: str) -> bytes:
    """The Merkle leaf for a receipt: keccak256(receipt_hash bytes)."""
    return eip712.keccak256(_b(receipt_hash))


def merkle_levels(receipt_hashes: list[str]) -> list[list[bytes]]:
    """All tree levels, leaves first, root level last."""
    if not receipt_hashes:
        raise InvalidRequest("cannot build a Merkle tree over zero receipts")
    levels = [[leaf_hash(h) for h in receipt_hashes]]
    while len(levels[-1]) > 1:
        cur = levels[-1]
        nxt = [_pair(cur[i], cur[i + 1]) for i in range(0, len(cur) - 1, 2)]
        if len(cur) % 2:
            nxt.append(cur[-1])  # odd node promoted unchanged
        levels.append(nxt)
    return levels


def merkle_root(receipt_hashes: list[str]) -> str:
    """Root over receipt hashes in order."""
    return _hex(merkle_levels(receipt_hashes)[-1][0])


def merkle_proof(receipt_hashes: list[str], index: int) -> list[str]:
    """Sibling hashes from the leaf at `index` up to the root."""
    proof: list[str] = []
    for level in merkle_levels(receipt_hashes)[:-1]:
        sib = index ^ 1
        if sib < len(level):  # no sibling: the node was promoted
            proof.append(_hex(level[sib]))
        index //= 2
    return proof


def verify_proof(leaf: str, proof: list[str], root: str) -> bool:
    """True if the receipt hash `leaf` is in the tree with `root` according to `proof`."""
    try:
        h = leaf_hash(leaf)
        for s in proof:
            h = _pair(h, _b(s))
        return _hex(h) == root.lower()
    except ValueError:  # malformed hex
        return False


@dataclass(frozen=True)
class Epoch:
    """One closed epoch."""

    epoch: int
    first_seq: int
    last_seq: int
    merkle_root: str
    last_receipt_hash: str
    totals: dict[str, int] = field(compare=False)
    cumulative: dict[str, int] = field(compare=False)
    closed_at_ms: int = 0
    signature: str = ""

    def typed_data(self) -> dict[str, Any]:
        cum = json.dumps(self.cumulative, sort_keys=True, separators=(",", ":"))
        return {
            "types": _EPOCH_TYPES, "primaryType": "Epoch",
            "domain": {"name": "OpenLoRA Epoch", "version": DOMAIN_VERSION},
            "message": {
                "epoch": self.epoch, "firstSeq": self.first_seq, "lastSeq": self.last_seq,
                "merkleRoot": _b(self.merkle_root), "lastReceiptHash": _b(self.last_receipt_hash),
                "cumulativeHash": eip712.keccak256(cum.encode()),
            },
        }

    def signer(self) -> str:
        """Address that signed this epoch."""
        return Account.recover_message(eip712.encode(self.typed_data()), signature=_b(self.signature))


class EpochManager:
    """Closes epochs over a ledger and answers inclusion proofs."""

    def __init__(self, ledger: Ledger, identity: NodeIdentity | None = None, epoch_size: int = 1000) -> None:
        if epoch_size < 1:
            raise InvalidRequest("epoch_size must be >= 1")
        self.ledger = ledger
        self.identity = identity
        self.epoch_size = epoch_size
        self._lock = threading.Lock()
        ledger.ensure_schema(EPOCH_SCHEMA)

    def epochs(self) -> list[Epoch]:
        """All closed epochs, oldest first."""
        rows = self.ledger.read_conn().execute("SELECT * FROM epochs ORDER BY epoch").fetchall()
        return [_row_to_epoch(r) for r in rows]

    def last(self) -> Epoch | None:
        row = self.ledger.read_conn().execute("SELECT * FROM epochs ORDER BY epoch DESC LIMIT 1").fetchone()
        return _row_to_epoch(row) if row else None

    def maybe_close(self) -> list[Epoch]:
        """Close as many full epochs (`epoch_size` receipts each) as are waiting."""
        closed: list[Epoch] = []
        with self._lock:
            while True:
                last = self.last()
                done = last.last_seq if last else 0
                if self.ledger.head()[0] - done < self.epoch_size:
                    return closed
                closed.append(self._close(done + self.epoch_size))

    def close(self) -> Epoch | None:
        """Close an epoch over every receipt not yet in one; None if there are none."""
        with self._lock:
            last = self.last()
            head = self.ledger.head()[0]
            if head <= (last.last_seq if last else 0):
                return None
            return self._close(head)

    def _close(self, last_seq: int) -> Epoch:
        prev = self.last()
        first = (prev.last_seq if prev else 0) + 1
        hashes: list[str] = []
        totals: dict[str, int] = {}
        for r in self.ledger.iter(first, last_seq):
            hashes.append(r.receipt_hash)
            for p in r.payouts:
                totals[p.recipient] = totals.get(p.recipient, 0) + p.amount
        cumulative = dict(prev.cumulative) if prev else {}
        for a, v in totals.items():
            cumulative[a] = cumulative.get(a, 0) + v
        ep = Epoch(
            epoch=(prev.epoch if prev else 0) + 1, first_seq=first, last_seq=last_seq,
            merkle_root=merkle_root(hashes), last_receipt_hash=hashes[-1] if hashes else ZERO_HASH,
            totals=dict(sorted(totals.items())), cumulative=dict(sorted(cumulative.items())),
            closed_at_ms=int(time.time() * 1000),
        )
        if self.identity is not None:
            sig = self.identity.sign(eip712.encode(ep.typed_data()))
            ep = Epoch(**{**ep.__dict__, "signature": _hex(sig)})
        with self.ledger.transaction() as conn:
            conn.execute(
                "INSERT INTO epochs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (ep.epoch, ep.first_seq, ep.last_seq, ep.merkle_root, ep.last_receipt_hash,
                 json.dumps(ep.totals), json.dumps(ep.cumulative), ep.closed_at_ms, ep.signature),
            )
        return ep

    def prove(self, request_id: str) -> dict[str, Any]:
        """Inclusion proof for a request's receipt: {request_id, receipt_id, epoch, index, proof,
        root}. Raises InvalidRequest if the receipt is unknown or its epoch is not closed yet."""
        r = self.ledger.get(request_id)
        if r is None:
            raise InvalidRequest(f"no receipt for {request_id!r}")
        row = self.ledger.read_conn().execute(
            "SELECT * FROM epochs WHERE first_seq <= ? AND last_seq >= ?", (r.seq, r.seq)).fetchone()
        if row is None:
            raise InvalidRequest(f"receipt {request_id!r} (seq {r.seq}) is not in a closed epoch yet")
        ep = _row_to_epoch(row)
        hashes = [x.receipt_hash for x in self.ledger.iter(ep.first_seq, ep.last_seq)]
        index = r.seq - ep.first_seq
        return {
            "request_id": r.request_id, "receipt_id": r.receipt_hash, "epoch": ep.epoch,
            "index": index, "proof": merkle_proof(hashes, index), "root": ep.merkle_root,
        }


def _row_to_epoch(row: tuple) -> Epoch:
    return Epoch(
        epoch=row[0], first_seq=row[1], last_seq=row[2], merkle_root=row[3], last_receipt_hash=row[4],
        totals=json.loads(row[5]), cumulative=json.loads(row[6]), closed_at_ms=row[7], signature=row[8],
    )
