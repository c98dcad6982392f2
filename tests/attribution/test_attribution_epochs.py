"""Epochs: Merkle proofs verify for every receipt; wrong proofs are rejected; totals add up."""

from __future__ import annotations

import pytest
from attr_helpers import event

from openlora.attribution.epochs import merkle_proof, merkle_root, verify_proof
from openlora.errors import InvalidRequest


def _hashes(n: int) -> list[str]:
    return ["0x" + (bytes([i % 256, i // 256]) * 16).hex() for i in range(n)]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 33])
def test_every_leaf_proves_and_wrong_proofs_fail(n):
    hs = _hashes(n)
    root = merkle_root(hs)
    other = "0x" + "ee" * 32
    for i, h in enumerate(hs):
        proof = merkle_proof(hs, i)
        assert verify_proof(h, proof, root)
        assert not verify_proof(other, proof, root)  # a leaf not in the tree
        assert not verify_proof(h, proof, other)  # wrong root
        if proof:
            bad = list(proof)
            bad[0] = bad[0][:-1] + ("0" if bad[0][-1] != "0" else "1")
            assert not verify_proof(h, bad, root)  # corrupted sibling
            assert not verify_proof(h, proof[:-1], root)  # truncated proof
        if n > 2:
            j = (i + 2) % n
            assert merkle_proof(hs, j) == proof or not verify_proof(h, merkle_proof(hs, j), root)


def test_service_epochs_prove_every_receipt(make_service, identity):
    svc = make_service(epoch_size=4)
    receipts = [svc.record(event(adapters=() if i % 3 == 0 else (("ad1", 1.0),))) for i in range(11)]
    epochs = svc.epochs.epochs()
    assert [(e.first_seq, e.last_seq) for e in epochs] == [(1, 4), (5, 8)]
    with pytest.raises(InvalidRequest, match="not in a closed epoch"):
        svc.epochs.prove(receipts[-1].request_id)
    last = svc.epochs.close()
    assert (last.first_seq, last.last_seq) == (9, 11) and svc.epochs.close() is None
    epochs = svc.epochs.epochs()
    for r in receipts:
        p = svc.epochs.prove(r.request_id)
        ep = epochs[p["epoch"] - 1]
        assert p["root"] == ep.merkle_root and p["receipt_id"] == r.receipt_hash
        assert verify_proof(r.receipt_hash, p["proof"], ep.merkle_root)
        # The proof does not carry over to another epoch's root or another receipt.
        for other in epochs:
            if other.epoch != ep.epoch:
                assert not verify_proof(r.receipt_hash, p["proof"], other.merkle_root)
    # Signed by the node; cumulative totals equal the ledger balances.
    assert all(e.signer() == identity.address for e in epochs)
    assert epochs[-1].cumulative == svc.ledger.balances()
    assert sum(sum(e.totals.values()) for e in epochs) == sum(r.fee for r in receipts)
    with pytest.raises(InvalidRequest, match="no receipt"):
        svc.epochs.prove("nope")
