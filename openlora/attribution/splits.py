"""Exact integer splits: every amount is an int >= 0 and the parts always sum to the total.

Remainder rule (largest remainder, a.k.a. Hamilton's method), used everywhere in attribution:

1. Each part first gets `floor(total * w_i / W)` where `W = sum(w)`.
2. The `total - sum(floors)` units left over (fewer than the number of parts with w_i > 0) go one
   each to the parts with the largest fractional remainders `(total * w_i) mod W`.
3. Ties in remainder are broken by the part's key in ascending order (keys are lower-cased
   addresses or ids, so the order is the same on every machine), then by position.

Consequences (checked by property tests): amounts sum exactly to `total`; no amount is negative;
parts with equal weights differ by at most one unit; a zero weight gets zero.

No floats are used anywhere here; composition weights (floats from the engine) are converted to
integer parts-per-million once, by `weights_to_ppm`, with the same rule.
"""

from __future__ import annotations

from collections.abc import Sequence

from openlora.errors import InvalidRequest

PPM = 1_000_000  # composition weights are expressed in parts per million
BPS = 10_000  # split policies are expressed in basis points


def split_exact(total: int, weights: Sequence[int], keys: Sequence[str] | None = None) -> list[int]:
    """Split the integer `total` in proportion to integer `weights` (largest remainder method).

    `keys` (same length as `weights`) break remainder ties in ascending order; without them ties go
    to the earlier position. Raises InvalidRequest on a negative total or weight, or when
    `total > 0` and every weight is zero.
    """
    n = len(weights)
    if keys is not None and len(keys) != n:
        raise ValueError("keys and weights differ in length")
    if total < 0:
        raise InvalidRequest(f"cannot split a negative total ({total})")
    if any(w < 0 for w in weights):
        raise InvalidRequest("split weights must be >= 0")
    wsum = sum(weights)
    if wsum == 0:
        if total == 0:
            return [0] * n
        raise InvalidRequest("cannot split a positive total over zero weights")
    amounts = [total * w // wsum for w in weights]
    left = total - sum(amounts)  # 0 <= left < number of parts with w > 0
    if left:
        # Order by remainder descending, then key ascending, then position ascending.
        order = sorted(
            (i for i in range(n) if weights[i] > 0),
            key=lambda i: (-((total * weights[i]) % wsum), keys[i] if keys is not None else "", i),
        )
        for i in order[:left]:
            amounts[i] += 1
    return amounts


def weights_to_ppm(weights: Sequence[float], keys: Sequence[str]) -> list[int]:
    """Turn composition weights (floats, possibly negative for task-arithmetic subtraction) into
    integer shares that sum to exactly 1,000,000 (PPM).

    Each adapter's share is proportional to |weight|. The floats are first rounded to integer
    micro-units (`round(|w| * 1e6)`, a deterministic IEEE operation), then split with
    `split_exact`. If every weight rounds to zero the adapters share equally.
    """
    if not weights:
        return []
    micro = []
    for w in weights:
        if w != w or w in (float("inf"), float("-inf")):  # NaN or infinite
            raise InvalidRequest(f"adapter weight {w!r} is not a finite number")
        micro.append(round(abs(w) * PPM))
    if sum(micro) == 0:
        micro = [1] * len(weights)
    return split_exact(PPM, micro, keys)


def split_bps(total: int, operator_bps: int, owner_bps: int, data_bps: int) -> tuple[int, int, int]:
    """Split `total` into (operator, owner, data) by basis points summing to 10,000.

    Ties are broken in the fixed order operator, owner, data (keys "0", "1", "2").
    """
    if operator_bps + owner_bps + data_bps != BPS:
        raise InvalidRequest("split basis points must sum to 10000")
    a, b, c = split_exact(total, [operator_bps, owner_bps, data_bps], ["0", "1", "2"])
    return a, b, c
