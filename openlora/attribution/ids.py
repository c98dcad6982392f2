"""On-chain ids of named things: adapters and datasets are keyed by keccak256 of their name.

The same ids break ties in the fee split (receipts.py), so the Settlement contract, which only
sees the 32-byte ids, reproduces every payout to the base unit: for fixed-width lower-case hex,
string order equals numeric order.
"""

from __future__ import annotations

from functools import lru_cache

from openlora.attribution.eip712 import keccak256


@lru_cache(maxsize=4096)
def name_id(name: str) -> str:
    """keccak256(utf-8 name) as 0x + 64 lower-case hex digits."""
    return "0x" + keccak256(name.encode("utf-8")).hex()


def name_id_bytes(name: str) -> bytes:
    """The same id as 32 raw bytes (what contracts take as bytes32)."""
    return bytes.fromhex(name_id(name)[2:])
