"""Span credits and their blend with a datanet's fixed contributor weights: exact integer math.

A `Span` is a run `[start, end)` of answer tokens that occurs verbatim in a datanet's contributions
(found by `openlora.attribution.span_index`); `contributors` are the lower-cased addresses of the
contributions that contain it. This module only does arithmetic on spans and imports no index engine.

Credits (`span_credits`): each span credits its length in tokens. A span found in k contributors' texts
splits its length among them with `split_exact` (equal weights; a remainder goes to the smaller
addresses first), so credits are integers that sum to the number of answer tokens covered by spans.

Blend (`blend`): the data part of a fee is then split by the integer weights

    w_i = fixed_i * C * (PPM - lam) + credit_i * F * lam          F = sum(fixed), C = sum(credits)

which are proportional to `fixed_i / F * (1 - lam / PPM) + credit_i / C * lam / PPM`: both sides are
normalised to shares first, so the scale of the manifest's weights and the answer's length do not
matter. An answer with no span (C == 0) gets exactly the fixed weights back.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from math import gcd

from openlora.attribution.splits import PPM, split_exact
from openlora.errors import InvalidRequest

# NOTE: how DEFAULT_MIN_SPAN was chosen (bench/span_attribution.py, "chance_matches" and
# "chance_rate_by_k"; SmolLM2 tokenizer; 2,000 random k-token windows per k). Datanet: 113,030 tokens of
# English prose (Python's reference docs, pydoc_data.topics). Share of windows of unrelated English found
# in it verbatim, by probe set:
#   k:                                       3      4      5      6      7      8
#   demo chat answers (legal, pirate)      3.3%   0.4%   0.0%   0.0%   0.0%   0.0%
#   license texts (/usr/share/...)         8.8%   1.5%   0.55%  0.0%   0.0%   0.0%
#   stdlib docstrings (same domain)       15.4%   4.0%   0.35%  0.15%  0.1%   0.05%
# The smallest k under 1% for every set is 5. Chance grows with the datanet: the chat answers against
# Python source datanets (stdlib, then site-packages) of 10^5 / 10^6 / 10^7 tokens give k=4: 0.3% / 1.1% /
# 3.05%, k=5: 0.0% / 0.0% / 1.05%, k=6: 0.05% / 0.05% / 0.25%. We take 6: rare (< 1%) for all measured
# text up to 10^7-token datanets, where 5 is not.
DEFAULT_MIN_SPAN = 6

# NOTE: lambda is a policy, not a measurement: half of the data portion follows the manifest's agreed
# weights (a datanet shapes every answer of the adapter, not only the words it reproduces), half follows
# the text the answer actually reproduced. Parts per million, 0 (fixed weights only) .. 1,000,000.
DEFAULT_LAMBDA_PPM = 500_000


@dataclass(frozen=True)
class Span:
    """Answer tokens `[start, end)` found verbatim in a datanet.

    `contributors`: sorted, lower-cased addresses of the contributions that contain the span (among
    the occurrences inspected; see `SpanIndex.match`). `occurrences`: how many times the span occurs in
    the datanet in all (0 when unknown, e.g. a span built by hand).
    """

    start: int
    end: int
    contributors: tuple[str, ...]
    occurrences: int = 0

    @property
    def length(self) -> int:
        return self.end - self.start


def span_credits(spans: Iterable[Span]) -> dict[str, int]:
    """address -> integer credit: each span's length in tokens, split exactly among its contributors.

    Addresses are lower-cased; spans without contributors credit nobody. Keys come out sorted.
    """
    credits: dict[str, int] = {}
    for sp in spans:
        if sp.end < sp.start:
            raise InvalidRequest(f"span [{sp.start}, {sp.end}) ends before it starts")
        who = sorted({a.lower() for a in sp.contributors})
        if not who:
            continue
        for addr, part in zip(who, split_exact(sp.length, [1] * len(who), who)):
            credits[addr] = credits.get(addr, 0) + part
    return dict(sorted(credits.items()))


def blend(fixed: Mapping[str, int], credits: Mapping[str, int], lam_ppm: int = DEFAULT_LAMBDA_PPM) -> dict[str, int]:
    """Integer weights `fixed_share * (1 - lambda) + credit_share * lambda` for splitting a data amount.

    `fixed`: the datanet's contributor weights (manifest); `credits`: `span_credits` of the answer; both
    keyed the same way (span credits use lower-cased addresses: lower-case the manifest's too).
    `lam_ppm`: lambda in parts per million. Returns `fixed` unchanged when no credit exists (C == 0) or
    lambda is 0; otherwise every key of `fixed` (in its order) then the credit-only keys (sorted), with
    weights divided by their common gcd (proportions, hence `split_exact` results, are unchanged). A
    contributor with credit but no fixed weight gets weight from the credit side only. With no fixed
    weight at all (F == 0), the credits alone decide.
    """
    if not isinstance(lam_ppm, int) or not 0 <= lam_ppm <= PPM:
        raise InvalidRequest(f"lambda must be an integer in [0, {PPM}] ppm, got {lam_ppm!r}")
    for name, side in (("fixed", fixed), ("credit", credits)):
        for k, v in side.items():
            if not isinstance(v, int) or v < 0:
                raise InvalidRequest(f"{name} weight of {k!r} must be an integer >= 0, got {v!r}")
    f_sum, c_sum = sum(fixed.values()), sum(credits.values())
    if c_sum == 0 or lam_ppm == 0:
        return dict(fixed)
    keys = list(fixed) + sorted(k for k in credits if k not in fixed)
    if f_sum == 0:  # nothing to blend with: the spans alone decide
        weights = {k: credits.get(k, 0) for k in keys}
    else:
        weights = {k: fixed.get(k, 0) * c_sum * (PPM - lam_ppm) + credits.get(k, 0) * f_sum * lam_ppm
                   for k in keys}
    g = 0
    for w in weights.values():
        g = gcd(g, w)
    return {k: w // g for k, w in weights.items()} if g > 1 else weights


__all__ = ["DEFAULT_LAMBDA_PPM", "DEFAULT_MIN_SPAN", "Span", "blend", "span_credits"]
