"""Payer authorizations: an EIP-712 `Authorization(payer, node, cap, expiry, nonce)` that a payer
signs for one node; the node sends it with every settlement batch, and the Settlement contract
checks the signature, the node, the expiry and the cap itself.

The payer hands it to the node as a bearer token: `olpa1.` + base64url(JSON{payer, node, cap,
expiry, nonce, chain_id, contract, signature}). The token is not secret in the way an API key is
(it can only pay *this* node, up to the cap), but it spends the payer's escrow: keep it private.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import asdict, dataclass
from typing import Any

from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_utils import to_checksum_address

from openlora.attribution import eip712
from openlora.attribution.manifest import is_address
from openlora.errors import InvalidRequest

TOKEN_PREFIX = "olpa1."
DOMAIN_NAME = "OpenLoRA Settlement"
DOMAIN_VERSION = "1"
TYPES = {
    "Authorization": [
        {"name": "payer", "type": "address"},
        {"name": "node", "type": "address"},
        {"name": "cap", "type": "uint256"},
        {"name": "expiry", "type": "uint256"},
        {"name": "nonce", "type": "uint256"},
    ],
}


class BadAuthorization(InvalidRequest):
    """A token that does not parse, is not signed by its payer, or is for another node/chain."""

    status = 401
    code = "invalid_authorization"


@dataclass(frozen=True)
class Authorization:
    """A signed payer authorization (see the module docstring)."""

    payer: str
    node: str
    cap: int
    expiry: int  # unix seconds
    nonce: int
    chain_id: int
    contract: str  # the Settlement contract (EIP-712 verifyingContract)
    signature: str = ""  # 0x + 130 hex

    def typed_data(self) -> dict[str, Any]:
        return {
            "domain": {"name": DOMAIN_NAME, "version": DOMAIN_VERSION, "chainId": self.chain_id,
                       "verifyingContract": self.contract},
            "types": TYPES, "primaryType": "Authorization",
            "message": {"payer": self.payer, "node": self.node, "cap": self.cap,
                        "expiry": self.expiry, "nonce": self.nonce},
        }

    def digest(self) -> bytes:
        """The 32 bytes the payer signs (= `Settlement.authorization_digest`, the cap's key)."""
        return eip712.digest(encode_typed_data(full_message=self.typed_data()))

    def signer(self) -> str:
        """The address that made `signature` (checksummed)."""
        return Account.recover_message(encode_typed_data(full_message=self.typed_data()),
                                       signature=bytes.fromhex(self.signature[2:]))

    def as_tuple(self) -> tuple:
        """The contract's `SignedAuthorization` argument."""
        return ((self.payer, self.node, self.cap, self.expiry, self.nonce), bytes.fromhex(self.signature[2:]))

    def to_token(self) -> str:
        raw = json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()
        return TOKEN_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def sign_authorization(key: str | bytes, node: str, cap: int, expiry: int, nonce: int | None,
                       chain_id: int, contract: str) -> Authorization:
    """The payer (`key`) authorizes `node` to charge up to `cap` base units until `expiry`."""
    acct = Account.from_key(key)
    auth = Authorization(
        payer=acct.address, node=to_checksum_address(node), cap=int(cap), expiry=int(expiry),
        nonce=int(nonce if nonce is not None else time.time_ns()), chain_id=int(chain_id),
        contract=to_checksum_address(contract))
    sig = acct.sign_message(encode_typed_data(full_message=auth.typed_data())).signature
    return Authorization(**{**asdict(auth), "signature": "0x" + bytes(sig).hex()})


def is_token(bearer: str | None) -> bool:
    return bool(bearer) and bearer.startswith(TOKEN_PREFIX)


def parse_token_unchecked(body: str) -> Authorization:
    """Decode a token body (after the prefix) without any check: for tokens read back from our
    own database, which were checked when accepted."""
    d = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    return Authorization(**d)


def parse_token(token: str, *, node: str, chain_id: int, contract: str, now: float | None = None) -> Authorization:
    """Decode and check a bearer token for this node; raises BadAuthorization (401)."""
    try:
        body = token[len(TOKEN_PREFIX):]
        d = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        fields = {"payer", "node", "cap", "expiry", "nonce", "chain_id", "contract", "signature"}
        if not isinstance(d, dict) or set(d) != fields:
            raise ValueError("wrong fields")
        for k in ("payer", "node", "contract"):
            if not is_address(d[k]):
                raise ValueError(f"{k} is not an address")
        for k in ("cap", "expiry", "nonce", "chain_id"):
            if not isinstance(d[k], int) or isinstance(d[k], bool) or not 0 <= d[k] < 2**256:
                raise ValueError(f"{k} is not a uint256")
        auth = Authorization(**{**d, "payer": to_checksum_address(d["payer"]),
                                "node": to_checksum_address(d["node"]),
                                "contract": to_checksum_address(d["contract"])})
        signer = auth.signer()
    except Exception as e:  # any malformed token is the same client error
        raise BadAuthorization(f"malformed authorization token: {e}") from None
    if signer != auth.payer:
        raise BadAuthorization("authorization is not signed by its payer")
    if auth.node != to_checksum_address(node):
        raise BadAuthorization(f"authorization is for node {auth.node}, this node is {to_checksum_address(node)}")
    if auth.chain_id != chain_id or auth.contract != to_checksum_address(contract):
        raise BadAuthorization("authorization is for another chain or settlement contract")
    if auth.expiry <= (time.time() if now is None else now):
        raise BadAuthorization("authorization has expired")
    return auth
