"""Receipts: EIP-712 signatures recover the node address with stock eth-account; the fast encoder
matches eth-account's byte for byte; receipts carry no text."""

from __future__ import annotations

from dataclasses import replace

from attr_helpers import PAYER, event
from eth_account import Account
from eth_account.messages import encode_typed_data
from hypothesis import given, settings
from hypothesis import strategies as st

from openlora.attribution.receipts import Receipt, verify_receipt


def test_signature_recovers_node_address(make_service, identity):
    svc = make_service()
    r = svc.record(event())
    # Stock tooling only: eth-account's own EIP-712 encoder and recovery.
    signable = encode_typed_data(full_message=r.typed_data())
    assert Account.recover_message(signable, signature=bytes.fromhex(r.signature[2:])) == identity.address
    assert r.node == identity.address
    # The receipt id is the EIP-712 digest eth-account signs.
    signed = Account.sign_message(signable, identity._account.key)
    assert "0x" + bytes(signed.message_hash).hex() == r.receipt_hash
    assert verify_receipt(r, expected_node=identity.address) is None


def test_tampered_receipt_fails_standalone_verification(make_service):
    r = make_service().record(event())
    assert verify_receipt(replace(r, fee=r.fee + 1)) is not None  # sum check
    forged = replace(r, payer="0x" + "11" * 20)
    assert "hash mismatch" in verify_receipt(forged)
    forged = replace(forged, receipt_hash=forged.compute_hash())  # even with a fresh hash
    assert "signature recovers" in verify_receipt(forged)


def test_receipt_has_no_text_and_round_trips(make_service):
    r = make_service().record(event())
    d = r.to_dict()
    assert not {"prompt", "text", "output", "completion"} & set(d)
    again = Receipt.from_dict(d)
    assert again == r and again.receipt_hash == r.receipt_hash
    s = r.summary()
    assert s["receipt_id"] == r.receipt_hash and sum(s["splits"].values()) == s["fee"] == r.fee
    assert r.payer == PAYER and r.prompt_tokens == 123 and r.cached_tokens == 10


@settings(max_examples=25, deadline=None)
@given(
    n_adapters=st.integers(0, 3), prompt=st.integers(0, 10**9), completion=st.integers(0, 10**9),
    request_id=st.text(min_size=1, max_size=40), chain_id=st.sampled_from([0, 1, 8453]),
    commitment=st.one_of(st.just(""), st.binary(min_size=32, max_size=32).map(lambda b: "0x" + b.hex())),
)
def test_fast_encoder_matches_eth_account(identity, tmp_path_factory, n_adapters, prompt, completion,
                                          request_id, chain_id, commitment):
    from attr_helpers import manifest_dict

    from openlora.attribution.manifest import DefaultPolicy, parse_manifest
    from openlora.attribution.receipts import ZERO_HASH, build_receipt

    m = parse_manifest(manifest_dict())
    ev = event(adapters=[(f"ad{i}", 0.5 + i) for i in range(n_adapters)], prompt=prompt,
               completion=completion, request_id=request_id)
    ev = replace(ev, commitment=commitment)
    r = build_receipt(ev, seq=7, node=identity.address, operator=identity.address,
                      manifests=[m] * n_adapters, base_manifest=DefaultPolicy(3, 5).manifest_for(identity.address, "b"),
                      prev_hash=ZERO_HASH, sign=identity.sign, chain_id=chain_id)
    assert encode_typed_data(full_message=r.typed_data()) == r.signable()
    assert Account.recover_message(r.signable(), signature=bytes.fromhex(r.signature[2:])) == identity.address


def test_a_commitment_is_signed_and_receipts_without_one_keep_their_hash(make_service, identity):
    """The commitment field joins the signed struct only when present: a receipt without one hashes
    under the original struct (receipts already in ledgers stay valid), one with it under the longer
    struct, and both verify with stock eth-account."""
    from openlora.attribution.receipts import EIP712_TYPES

    svc = make_service()
    plain = svc.record(event(request_id="r-plain"))
    assert "commitment" not in plain.to_dict() and plain.typed_data()["types"]["Receipt"] == EIP712_TYPES["Receipt"]
    sealed = svc.record(replace(event(request_id="r-sealed"), commitment="0x" + "5a" * 32))
    types = sealed.typed_data()["types"]["Receipt"]
    assert types[:-1] == EIP712_TYPES["Receipt"] and types[-1] == {"name": "commitment", "type": "bytes32"}
    assert encode_typed_data(full_message=sealed.typed_data()) == sealed.signable()
    assert verify_receipt(sealed, expected_node=identity.address) is None
    assert sealed.summary()["commitment"] == "0x" + "5a" * 32
    assert Receipt.from_dict(sealed.to_dict()) == sealed
    # The commitment is signed: changing it breaks the signature.
    forged = replace(sealed, commitment="0x" + "5b" * 32)
    assert "signature recovers" in verify_receipt(replace(forged, receipt_hash=forged.compute_hash()))
    # Both kinds sit in one ledger whose verification passes.
    assert svc.ledger.verify() is None
