"""Commitments: a receipt can bind the node to what was asked and answered without the node keeping it.

Scheme "hmac-sha256/v1": with a fresh 32-byte key that only the client receives (in the response),

    commitment = HMAC-SHA256(key, canonical_json({"input": INPUT, "output": [TEXT, ...]}))

- INPUT is the request's input exactly as the client sent it: the completion's `prompt` (one element
  when the request held a list of prompts: each prompt has its own receipt), or the chat `messages`.
- TEXT is each sample's generated text in index order (without an echoed prompt), as returned.
- canonical_json: sorted keys, no spaces, UTF-8 (`json.dumps(sort_keys=True, separators=(",", ":"),
  ensure_ascii=False)`).

The signed receipt carries the commitment; the key lives only in the request's memory until the
response is sent. Later the client can reveal (receipt, key, input, output) to anyone, who checks the
node's signature and recomputes the HMAC (`verify`, `openlora ledger check-commitment`). Without the
key the commitment reveals nothing about the text: HMAC is a PRF under a random key, so even a short,
guessable answer cannot be confirmed by trial.

NOTE: the node computes the HMAC in two halves: the input when the request arrives (the `hmac`
object then holds hash state, not text) and the outputs when it finishes. Because "input" sorts before
"output", the two halves concatenate to exactly the canonical JSON above.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from typing import Any, Callable

SCHEME = "hmac-sha256/v1"
KEY_BYTES = 32

# Seal: called once by the engine with the finished samples' texts; returns the 0x-hex commitment.
Seal = Callable[[list[str]], str]


def canonical_json(obj: Any) -> bytes:
    """The byte form both sides hash (sorted keys, no spaces, UTF-8)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def new_key() -> bytes:
    """A fresh random key for one request."""
    return secrets.token_bytes(KEY_BYTES)


def sealer(key: bytes, input_: Any) -> Seal:
    """Absorb the input now; the returned function absorbs the outputs and gives the commitment."""
    h = hmac.new(key, b'{"input":' + canonical_json(input_) + b',"output":', hashlib.sha256)

    def seal(outputs: list[str]) -> str:
        done = h.copy()
        done.update(canonical_json(list(outputs)) + b"}")
        return "0x" + done.hexdigest()

    return seal


def commit(key: bytes, input_: Any, outputs: list[str]) -> str:
    """The commitment in one call (what a verifier computes)."""
    body = canonical_json({"input": input_, "output": list(outputs)})
    return "0x" + hmac.new(key, body, hashlib.sha256).hexdigest()


def parse_key(text: str) -> bytes:
    """A key as the response carries it (0x + 64 hex) -> bytes; ValueError otherwise."""
    raw = text[2:] if text.startswith("0x") else text
    key = bytes.fromhex(raw)
    if len(key) != KEY_BYTES:
        raise ValueError(f"a commitment key is {KEY_BYTES} bytes, got {len(key)}")
    return key


def verify(commitment: str, key: bytes, input_: Any, outputs: list[str]) -> bool:
    """Whether (key, input, outputs) opens `commitment` (constant-time comparison)."""
    if not commitment:
        return False
    return hmac.compare_digest(commit(key, input_, outputs), commitment.lower())
