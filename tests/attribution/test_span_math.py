"""Span credits and the fixed/span blend: exact integer properties (hypothesis) and worked examples."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from openlora.attribution.spans import DEFAULT_LAMBDA_PPM, DEFAULT_MIN_SPAN, Span, blend, span_credits
from openlora.attribution.splits import PPM, split_exact
from openlora.errors import InvalidRequest

ADDRS = [f"0x{i:040x}" for i in range(1, 7)]
weights = st.integers(min_value=1, max_value=10**9)
fixed_maps = st.dictionaries(st.sampled_from(ADDRS[:4]), weights, min_size=1, max_size=4)
credit_maps = st.dictionaries(st.sampled_from(ADDRS), st.integers(min_value=0, max_value=10**6), max_size=6)
lams = st.integers(min_value=0, max_value=PPM)
spans = st.lists(st.builds(lambda s, n, who: Span(s, s + n, tuple(sorted(who))),
                           st.integers(0, 500), st.integers(0, 200),
                           st.sets(st.sampled_from(ADDRS), max_size=4)), max_size=12)


def exact_share(fixed: dict[str, int], credits: dict[str, int], lam: int, key: str) -> Fraction:
    f, c = sum(fixed.values()), sum(credits.values())
    return Fraction(fixed.get(key, 0), f) * Fraction(PPM - lam, PPM) + Fraction(credits.get(key, 0), c) * Fraction(
        lam, PPM)


@given(spans)
def test_credits_are_integers_that_sum_to_the_credited_tokens(sps):
    credits = span_credits(sps)
    assert all(isinstance(v, int) and v >= 0 for v in credits.values())
    assert sum(credits.values()) == sum(sp.length for sp in sps if sp.contributors)
    assert list(credits) == sorted(credits)
    for addr, v in credits.items():  # each span gives a holder floor or ceil of length / holders
        lo = sum(sp.length // len(sp.contributors) for sp in sps if addr in sp.contributors)
        hi = sum(-(-sp.length // len(sp.contributors)) for sp in sps if addr in sp.contributors)
        assert lo <= v <= hi


def test_a_shared_span_splits_its_length_exactly():
    a, b = "0xBB00000000000000000000000000000000000000", "0xaa00000000000000000000000000000000000000"
    # 9 tokens held by two: 5 + 4, the extra token to the smaller (lower-cased) address.
    assert span_credits([Span(0, 9, (a, b))]) == {b: 5, a.lower(): 4}
    assert span_credits([Span(0, 4, (a,)), Span(10, 16, (a, b)), Span(20, 23, ())]) == {a.lower(): 7, b: 3}
    assert span_credits([]) == {}


@given(fixed_maps, credit_maps, lams)
def test_blend_is_the_exact_mixture_of_shares(fixed, credits, lam):
    w = blend(fixed, credits, lam)
    assert all(isinstance(v, int) and v >= 0 for v in w.values())
    if sum(credits.values()) == 0 or lam == 0:
        assert w == fixed  # no span (or lambda 0): exactly the fixed weights
        return
    assert list(w)[:len(fixed)] == list(fixed)
    assert set(w) == set(fixed) | set(credits)
    total = sum(w.values())
    for k in w:
        assert Fraction(w[k], total) == exact_share(fixed, credits, lam, k)


@given(fixed_maps, credit_maps, lams, st.integers(1, 1000), st.integers(1, 1000))
def test_blend_ignores_the_scale_of_either_side(fixed, credits, lam, a, b):
    scaled = blend({k: v * a for k, v in fixed.items()}, {k: v * b for k, v in credits.items()}, lam)
    if sum(credits.values()) and lam:
        assert scaled == blend(fixed, credits, lam)  # both reduced to the same primitive weights


@given(fixed_maps, credit_maps.filter(lambda c: sum(c.values()) > 0))
def test_lambda_one_follows_the_credits_only(fixed, credits):
    w = blend(fixed, credits, PPM)
    total, c = sum(w.values()), sum(credits.values())
    for k in w:
        assert w[k] * c == credits.get(k, 0) * total


@given(fixed_maps, credit_maps, lams, st.integers(min_value=0, max_value=10**30))
def test_blended_weights_split_a_data_amount_exactly(fixed, credits, lam, amount):
    w = blend(fixed, credits, lam)
    keys = list(w)
    parts = split_exact(amount, [w[k] for k in keys], keys)
    assert sum(parts) == amount and min(parts) >= 0
    total = sum(w.values())
    for k, p in zip(keys, parts):
        assert abs(Fraction(p) - Fraction(amount * w[k], total)) < 1


def test_worked_example_and_edge_cases():
    a, b, c = ADDRS[:3]
    # Fixed 3:1, credits 9:6, half and half: 3/4*1/2 + 9/15*1/2 = 27/40 and 13/40.
    assert blend({a: 3, b: 1}, {a: 9, b: 6}, 500_000) == {a: 27, b: 13}
    # A contributor with credit but no fixed weight gets weight from the credit side only.
    assert blend({a: 1}, {c: 5}, 250_000) == {a: 3, c: 1}
    # No fixed weight at all: the credits alone decide.
    assert blend({}, {a: 2, b: 6}, 1) == {a: 1, b: 3}
    assert blend({a: 2, b: 0}, {}, 700_000) == {a: 2, b: 0}
    for bad in (-1, PPM + 1, 0.5):
        with pytest.raises(InvalidRequest):
            blend({a: 1}, {a: 1}, bad)
    with pytest.raises(InvalidRequest):
        blend({a: -1}, {a: 1}, 1)
    with pytest.raises(InvalidRequest):
        span_credits([Span(5, 4, (a,))])
    assert 1 <= DEFAULT_MIN_SPAN and 0 <= DEFAULT_LAMBDA_PPM <= PPM
