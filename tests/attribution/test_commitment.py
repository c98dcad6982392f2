"""Commitments: the node's two-half HMAC equals the one-shot HMAC a verifier computes; any change of
key, input or output fails verification."""

from __future__ import annotations

import hashlib
import hmac
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from openlora.attribution import commitment

_json_input = st.one_of(
    st.text(max_size=200), st.lists(st.integers(0, 50_000), max_size=50),
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                    "content": st.text(max_size=80)}), min_size=1, max_size=4),
)


@settings(max_examples=60, deadline=None)
@given(inp=_json_input, outs=st.lists(st.text(max_size=120), min_size=1, max_size=3))
def test_the_sealed_halves_equal_the_one_shot_commitment(inp, outs):
    key = commitment.new_key()
    c = commitment.sealer(key, inp)(outs)
    assert c == commitment.commit(key, inp, outs)
    # ... which is plain HMAC-SHA256 over the canonical JSON, reproducible with the standard library.
    body = json.dumps({"input": inp, "output": outs}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert c == "0x" + hmac.new(key, body.encode("utf-8"), hashlib.sha256).hexdigest()
    assert commitment.verify(c, key, inp, outs)


def test_any_change_fails_verification():
    key = commitment.new_key()
    inp = [{"role": "user", "content": "What is 2+2? ünïcode"}]
    c = commitment.commit(key, inp, ["4", "four"])
    assert commitment.verify(c, key, inp, ["4", "four"])
    assert not commitment.verify(c, key, inp, ["4", "five"])  # another answer
    assert not commitment.verify(c, key, inp, ["four", "4"])  # samples reordered
    assert not commitment.verify(c, key, [{"role": "user", "content": "What is 2+3?"}], ["4", "four"])
    assert not commitment.verify(c, commitment.new_key(), inp, ["4", "four"])  # another key
    assert not commitment.verify("", key, inp, ["4", "four"])
    # A sealer can be called once per request; calling it twice gives the same value (no hidden state).
    seal = commitment.sealer(key, inp)
    assert seal(["4", "four"]) == seal(["4", "four"]) == c


def test_keys_parse_and_are_fresh():
    k = commitment.new_key()
    assert commitment.parse_key("0x" + k.hex()) == k and commitment.parse_key(k.hex()) == k
    assert commitment.new_key() != k
    for bad in ("0x1234", "zz" * 32, ""):
        try:
            commitment.parse_key(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} parsed")
