"""A small, fast EIP-712 encoder for the fixed receipt/epoch schemas.

`eth_account.messages.encode_typed_data` is the reference, but it spends ~4 ms per receipt on this
2-core machine (generic type parsing, 40+ keccak calls through several wrappers); the serving path
cannot afford that. This module produces the *identical* `SignableMessage`
(version 0x01, header = domainSeparator, body = hashStruct(message)); the test suite checks
byte-equality against `encode_typed_data` on random receipts, and signatures are made and checked
with `Account.sign_message` / `Account.recover_message` as usual.

Supported field types: string, bytes32, uint8..uint256, address, and arrays of / nested structs.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from Crypto.Hash import keccak as _keccak_mod
from eth_account.messages import SignableMessage
from eth_utils import is_hex_address

Types = dict[str, list[dict[str, str]]]
_UINT = re.compile(r"^uint(\d+)$")


def keccak256(data: bytes) -> bytes:
    """Keccak-256 (the Ethereum hash, not NIST SHA3-256)."""
    return _keccak_mod.new(data=data, digest_bits=256).digest()


def _deps(primary: str, types: Types, found: set[str]) -> None:
    """Collect struct types referenced (transitively) by `primary`."""
    for f in types[primary]:
        t = f["type"].removesuffix("[]")
        if t in types and t not in found:
            found.add(t)
            _deps(t, types, found)


def encode_type(primary: str, types: Types) -> str:
    """EIP-712 encodeType: the primary struct, then referenced structs sorted by name."""
    deps: set[str] = set()
    _deps(primary, types, deps)
    deps.discard(primary)
    return "".join(
        f"{name}(" + ",".join(f"{f['type']} {f['name']}" for f in types[name]) + ")"
        for name in [primary, *sorted(deps)]
    )


# NOTE: caches. A receipt repeats most of its strings (roles, adapter ids, versions, model ids) and
# all of its type hashes; hashing each once cuts keccak calls per receipt from ~35 to ~10.
_type_hash_cache: dict[tuple[str, int], tuple[Types, bytes]] = {}


def type_hash(primary: str, types: Types) -> bytes:
    """keccak256(encodeType(primary)), cached per (struct name, schema object)."""
    hit = _type_hash_cache.get((primary, id(types)))
    if hit is not None and hit[0] is types:
        return hit[1]
    h = keccak256(encode_type(primary, types).encode())
    if len(_type_hash_cache) < 256:
        _type_hash_cache[(primary, id(types))] = (types, h)  # keeps `types` alive: id stays valid
    return h


@lru_cache(maxsize=8192)
def _string_hash(value: str) -> bytes:
    return keccak256(value.encode("utf-8"))


@lru_cache(maxsize=8192)
def _address_word(value: str) -> bytes:
    if not (len(value) == 42 and value.startswith("0x") and is_hex_address(value)):
        raise ValueError(f"invalid address {value!r}")
    return bytes(12) + bytes.fromhex(value[2:])


def _encode_value(typ: str, value: Any, types: Types) -> bytes:
    """One 32-byte word of encodeData for a field of type `typ`."""
    if typ.endswith("[]"):
        inner = typ[:-2]
        return keccak256(b"".join(_encode_value(inner, v, types) for v in value))
    if typ in types:
        return hash_struct(typ, value, types)
    if typ == "string":
        if not isinstance(value, str):
            raise TypeError(f"expected string, got {type(value).__name__}")
        return _string_hash(value)
    if typ == "bytes32":
        if not isinstance(value, (bytes, bytearray)) or len(value) != 32:
            raise ValueError("bytes32 value must be 32 bytes")
        return bytes(value)
    if typ == "address":
        if not isinstance(value, str):
            raise ValueError(f"invalid address {value!r}")
        return _address_word(value)
    m = _UINT.match(typ)
    if m:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0 or value >= 1 << int(m.group(1)):
            raise ValueError(f"{value!r} does not fit {typ}")
        return value.to_bytes(32, "big")
    raise TypeError(f"unsupported EIP-712 type {typ}")


def hash_struct(primary: str, data: dict[str, Any], types: Types) -> bytes:
    """keccak256(typeHash || encodeData(data))."""
    words = [type_hash(primary, types)]
    for f in types[primary]:
        words.append(_encode_value(f["type"], data[f["name"]], types))
    return keccak256(b"".join(words))


def encode(full_message: dict[str, Any]) -> SignableMessage:
    """Same result as `encode_typed_data(full_message=...)` for the supported types."""
    types = full_message["types"]
    domain_sep = hash_struct("EIP712Domain", full_message["domain"], types)
    body = hash_struct(full_message["primaryType"], full_message["message"], types)
    return SignableMessage(version=b"\x01", header=domain_sep, body=body)


def digest(sm: SignableMessage) -> bytes:
    """The 32 bytes that are signed: keccak256(0x19 || version || header || body)."""
    return keccak256(b"\x19" + sm.version + sm.header + sm.body)
