"""Exact integer splits and the fee rule: property tests (hypothesis) and worked examples."""

from __future__ import annotations

import pytest
from attr_helpers import ADDRS, OWNER, event, manifest_dict
from hypothesis import given, settings
from hypothesis import strategies as st

from openlora.attribution.manifest import parse_manifest
from openlora.attribution.receipts import compute_fee_lines
from openlora.attribution.splits import PPM, split_bps, split_exact, weights_to_ppm
from openlora.errors import InvalidRequest

fees = st.integers(min_value=0, max_value=10**30)
weight_lists = st.lists(st.integers(min_value=0, max_value=10**9), min_size=1, max_size=30).filter(
    lambda ws: sum(ws) > 0)


@given(fees, weight_lists)
def test_split_sums_exactly_and_never_negative(total, weights):
    amounts = split_exact(total, weights, [f"k{i:03d}" for i in range(len(weights))])
    assert sum(amounts) == total
    assert all(a >= 0 for a in amounts)
    for w, a in zip(weights, amounts):
        if w == 0:
            assert a == 0
        # Within one unit of the exact proportional share.
        assert abs(a * sum(weights) - total * w) < sum(weights)


@given(fees, st.integers(min_value=1, max_value=10**6), st.integers(min_value=2, max_value=40),
       st.lists(st.integers(min_value=1, max_value=10**6), max_size=5))
def test_equal_weights_differ_by_at_most_one(total, w, n_equal, others):
    weights = [w] * n_equal + others
    amounts = split_exact(total, weights)
    eq = amounts[:n_equal]
    assert max(eq) - min(eq) <= 1
    assert sum(amounts) == total


@given(fees, st.integers(0, 10000), st.integers(0, 10000))
def test_bps_split_exact(total, a, b):
    if a + b > 10000:
        a, b = a // 2, b // 2
    parts = split_bps(total, a, b, 10000 - a - b)
    assert sum(parts) == total and min(parts) >= 0


@given(st.lists(st.floats(min_value=-10, max_value=10, allow_nan=False), min_size=1, max_size=8))
def test_composition_weights_to_ppm(weights):
    ppm = weights_to_ppm(weights, [f"a{i}" for i in range(len(weights))])
    assert sum(ppm) == PPM and min(ppm) >= 0
    # Deterministic: same input, same output.
    assert ppm == weights_to_ppm(list(weights), [f"a{i}" for i in range(len(weights))])


def test_split_rejects_bad_inputs():
    with pytest.raises(InvalidRequest):
        split_exact(-1, [1])
    with pytest.raises(InvalidRequest):
        split_exact(5, [0, 0])
    with pytest.raises(InvalidRequest):
        split_exact(5, [1, -1])
    assert split_exact(0, [0, 0]) == [0, 0]
    with pytest.raises(InvalidRequest):
        weights_to_ppm([float("nan")], ["a"])


def test_remainder_tie_broken_by_key_order():
    # 1 unit over 3 equal parts: goes to the smallest key, wherever it sits.
    assert split_exact(1, [1, 1, 1], ["c", "a", "b"]) == [0, 1, 0]
    assert split_exact(2, [1, 1, 1], ["c", "a", "b"]) == [0, 1, 1]
    # Largest remainder wins before key order: 10 over weights 1,2 -> 3.33, 6.67 -> 3, 7.
    assert split_exact(10, [1, 2], ["a", "b"]) == [3, 7]


def _random_manifest(data):
    """A random valid manifest (hypothesis draw)."""
    n_ds = data.draw(st.integers(0, 3))
    datasets = []
    for d in range(n_ds):
        k = data.draw(st.integers(1, 4))
        addrs = data.draw(st.permutations(ADDRS))[:k]
        datasets.append({
            "id": f"ds{d}", "hash": f"h{d}", "weight": data.draw(st.integers(1, 5)),
            "contributors": [{"address": a, "weight": data.draw(st.integers(1, 10**6))} for a in addrs],
        })
    op = data.draw(st.integers(0, 10000))
    data_bps = data.draw(st.integers(0, 10000 - op)) if datasets else 0
    return parse_manifest(manifest_dict(
        datasets=datasets, split={"operator": op, "owner": 10000 - op - data_bps, "data": data_bps},
        price_per_1k_prompt_tokens=data.draw(st.integers(0, 10**18)),
        price_per_1k_completion_tokens=data.draw(st.integers(0, 10**18)),
    ))


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_receipt_amounts_sum_to_fee_for_any_policy(data):
    n = data.draw(st.integers(0, 3))
    manifests = [_random_manifest(data) for _ in range(n)]
    weights = [data.draw(st.floats(-2, 2, allow_nan=False)) for _ in range(n)]
    ev = event(
        adapters=[(f"ad{i}", w) for i, w in enumerate(weights)],
        prompt=data.draw(st.integers(0, 10**6)), completion=data.draw(st.integers(0, 10**6)),
        status=data.draw(st.sampled_from(["finished", "aborted", "failed"])),
    )
    base = parse_manifest(manifest_dict(datasets=[], split={"operator": 10000, "owner": 0, "data": 0}))
    fee, adapters, datasets, payouts = compute_fee_lines(ev, manifests, base, OWNER)
    assert sum(p.amount for p in payouts) == fee
    assert all(p.amount >= 0 for p in payouts)
    if adapters:
        assert sum(a.fee for a in adapters) == fee
        assert sum(a.weight_ppm for a in adapters) == PPM
    # Contributors with equal weight in the same dataset of the same adapter differ by <= 1.
    for m, a in zip(manifests, adapters):
        for ds in m.datasets:
            by_w: dict[int, list[int]] = {}
            for c in ds.contributors:
                amt = next(p.amount for p in payouts
                           if p.role == "data" and p.ref == f"{a.adapter_id}/{ds.id}" and p.recipient == c.address)
                by_w.setdefault(c.weight, []).append(amt)
            assert all(max(v) - min(v) <= 1 for v in by_w.values())


def test_fee_rule_worked_example():
    m = parse_manifest(manifest_dict())
    base = parse_manifest(manifest_dict(datasets=[], split={"operator": 10000, "owner": 0, "data": 0}))
    # 123 prompt tokens at 1000/1k + 77 completion tokens at 4000/1k = 123 + 308 = 431.
    fee, adapters, datasets, payouts = compute_fee_lines(event(), [m], base, ADDRS[7])
    assert fee == 431
    roles = {(p.role, p.recipient): p.amount for p in payouts}
    # operator 20% = 86.2 -> 86, owner 50% = 215.5 -> 216 (largest remainder), data 30% = 129.3 -> 129.
    assert roles[("operator", ADDRS[7])] == 86 and roles[("owner", OWNER)] == 216
    # data 129 over datasets legal:med = 1:2 -> 43, 86; legal 43 over weights 3:1 -> 32.25, 10.75 -> 32, 11.
    assert [d.amount for d in datasets] == [43, 86]
    assert sum(p.amount for p in payouts if p.role == "data") == 129


def test_aborted_request_charges_completion_only():
    m = parse_manifest(manifest_dict())
    base = parse_manifest(manifest_dict(datasets=[], split={"operator": 10000, "owner": 0, "data": 0}))
    fee, *_ = compute_fee_lines(event(status="aborted"), [m], base, OWNER)
    assert fee == 77 * 4000 // 1000
    fee, *_ = compute_fee_lines(event(status="failed", completion=0), [m], base, OWNER)
    assert fee == 0


def test_composition_uses_each_adapters_price():
    cheap = parse_manifest(manifest_dict(price_per_1k_prompt_tokens=0, price_per_1k_completion_tokens=1000))
    dear = parse_manifest(manifest_dict(price_per_1k_prompt_tokens=0, price_per_1k_completion_tokens=3000))
    base = parse_manifest(manifest_dict(datasets=[], split={"operator": 10000, "owner": 0, "data": 0}))
    ev = event(adapters=[("a", 0.75), ("b", 0.25)], prompt=0, completion=1000)
    fee, adapters, _, _ = compute_fee_lines(ev, [cheap, dear], base, OWNER)
    # 0.75 * 1000 + 0.25 * 3000 = 1500, split 750 / 750 between the adapters.
    assert fee == 1500 and [a.fee for a in adapters] == [750, 750]
    assert [a.weight_ppm for a in adapters] == [750_000, 250_000]


def test_base_only_uses_default_price():
    base = parse_manifest(manifest_dict(datasets=[], split={"operator": 10000, "owner": 0, "data": 0},
                                        price_per_1k_prompt_tokens=100, price_per_1k_completion_tokens=200))
    fee, adapters, _, payouts = compute_fee_lines(event(adapters=()), [], base, OWNER)
    assert fee == (123 * 100 + 77 * 200) // 1000 and adapters == []
    assert [(p.recipient, p.amount) for p in payouts] == [(OWNER, fee)]
