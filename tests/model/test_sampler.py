"""Sampler tests: each feature against a hand computation or torch's own softmax/log_softmax."""

from __future__ import annotations

import math

import pytest
import torch

from openlora.model.sampler import Sampler, SamplingRow, _apply_penalties, compute_prompt_logprobs
from openlora.sampling_params import SamplingParams

V = 64


def _row(params: SamplingParams, prompt: list[int] | None = None, output: list[int] | None = None,
         seed: int | None = None, eos: frozenset[int] = frozenset()) -> SamplingRow:
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return SamplingRow(params, list(prompt or []), list(output or []), gen, eos)


def _logits(batch: int, seed: int = 0, vocab: int = V) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3.0


def test_greedy_is_argmax_and_input_untouched() -> None:
    logits = _logits(8)
    before = logits.clone()
    out = Sampler()(logits, [_row(SamplingParams(temperature=0.0)) for _ in range(8)])
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 8
    # Slow path too (a penalty that touches no seen token keeps the argmax).
    out2 = Sampler()(logits, [_row(SamplingParams(temperature=0.0, presence_penalty=1.0)) for _ in range(8)])
    assert out2.token_ids == logits.argmax(-1).tolist()
    assert torch.equal(logits, before)


def test_top_k_1_equals_greedy() -> None:
    logits = _logits(16, seed=1)
    rows = [_row(SamplingParams(temperature=1.5, top_k=1), seed=i if i % 2 else None) for i in range(16)]
    assert Sampler()(logits, rows).token_ids == logits.argmax(-1).tolist()


def test_top_p_smaller_than_any_float32_keeps_the_top_token() -> None:
    """Found by schemathesis: top_p=5e-324 (a valid double > 0) underflowed to 0 in float32 and the
    cut kept no token (index -1, a 500)."""
    logits = _logits(4, seed=3)
    rows = [_row(SamplingParams(temperature=1.0, top_p=p), seed=7) for p in (5e-324, 1e-45, 1e-38, 1e-30)]
    assert Sampler()(logits, rows).token_ids == logits.argmax(-1).tolist()


def test_greedy_rows_mixed_with_sampled_rows() -> None:
    logits = _logits(6, seed=2)
    rows = [_row(SamplingParams(temperature=0.0 if i % 2 == 0 else 1.0), seed=i) for i in range(6)]
    out = Sampler()(logits, rows)
    for i in range(0, 6, 2):
        assert out.token_ids[i] == int(logits[i].argmax())


def _draws(sampler: Sampler, target_logits: torch.Tensor, target: SamplingRow, others: list[SamplingRow],
           other_logits: torch.Tensor, pos: int, steps: int) -> list[int]:
    """Sample `steps` times with the target row at `pos` among `others`; returns the target's tokens."""
    got = []
    for _ in range(steps):
        rows = others[:pos] + [target] + others[pos:]
        logits = torch.cat([other_logits[:pos], target_logits[None], other_logits[pos:]])
        got.append(sampler(logits, rows).token_ids[pos])
    return got


def test_seeded_row_independent_of_batch_composition() -> None:
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=1234)
    target_logits = _logits(1, seed=3)[0]
    alone = _draws(Sampler(), target_logits, _row(params, seed=1234), [], torch.empty(0, V), 0, 50)

    others = [
        _row(SamplingParams(temperature=0.0)),
        _row(SamplingParams(temperature=1.3, min_p=0.1)),
        _row(SamplingParams(temperature=0.7, top_k=5), seed=7),
        _row(SamplingParams(temperature=1.0, repetition_penalty=1.3), prompt=[1, 2, 3], output=[4]),
        _row(SamplingParams(temperature=1.0, top_p=0.5, logprobs=3)),
        _row(SamplingParams(temperature=2.0, frequency_penalty=0.5, presence_penalty=0.2), output=[5, 5]),
        _row(SamplingParams(temperature=1.0, min_tokens=3), eos=frozenset({0})),
    ]
    crowded = _draws(Sampler(torch.Generator().manual_seed(99)), target_logits, _row(params, seed=1234),
                     others, _logits(7, seed=4), 3, 50)
    assert alone == crowded
    assert len(set(alone)) > 1  # the generator advances: not the same token 50 times


def test_temperature_distribution_matches_softmax() -> None:
    # 8 tokens, T = 0.7, 50k draws (1000 batched rows x 50 steps) from a fixed seed.
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2])
    temp, rows_per_step, steps = 0.7, 1000, 50
    sampler = Sampler(torch.Generator().manual_seed(0))
    rows = [_row(SamplingParams(temperature=temp)) for _ in range(rows_per_step)]
    counts = torch.zeros(8)
    batch = logits.expand(rows_per_step, 8).contiguous()
    for _ in range(steps):
        counts += torch.bincount(torch.tensor(sampler(batch, rows).token_ids), minlength=8).float()
    n = rows_per_step * steps
    expected = torch.softmax(logits / temp, dim=-1) * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # 7 degrees of freedom: P(chi2 > 24.3) = 0.001. Tolerance stated: reject above 24.3.
    assert chi2 < 24.3, (chi2, counts, expected)
    # A wrong temperature (e.g. ignoring it) is far outside that tolerance.
    wrong = torch.softmax(logits, dim=-1) * n
    assert float(((counts - wrong) ** 2 / wrong).sum()) > 1000


def test_seeded_rows_follow_the_distribution_too() -> None:
    logits = torch.tensor([[1.0, 0.0, -1.0, 0.5]])
    gen_row = _row(SamplingParams(temperature=1.0, seed=5), seed=5)
    counts = torch.zeros(4)
    sampler = Sampler()
    for _ in range(4000):
        counts[sampler(logits, [gen_row]).token_ids[0]] += 1
    expected = torch.softmax(logits[0], -1) * 4000
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 16.3, (chi2, counts)  # 3 dof, p = 0.001


def test_top_p_never_picks_excluded_tokens() -> None:
    # probs ~ [0.5, 0.3, 0.15, 0.05]; top_p=0.7 keeps {0, 1} (mass before token 2 is 0.8 >= 0.7).
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(500, 4).contiguous()
    rows = [_row(SamplingParams(temperature=1.0, top_p=0.7), seed=i if i % 3 == 0 else None) for i in range(500)]
    toks = Sampler(torch.Generator().manual_seed(1))(logits, rows).token_ids
    assert set(toks) == {0, 1}
    # top_p=0.45 keeps only token 0 (the first token is always kept, even with mass > top_p).
    rows = [_row(SamplingParams(temperature=1.0, top_p=0.45)) for _ in range(200)]
    assert set(Sampler()(logits[:200], rows).token_ids) == {0}


def test_top_k_then_top_p_renormalises() -> None:
    # top_k=3 leaves [0.5, 0.3, 0.15]/0.95 = [0.526, 0.316, 0.158]; top_p=0.8 then keeps {0, 1}
    # (mass before token 2 is 0.842). Without renormalisation token 2 would also be kept.
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(400, 4).contiguous()
    rows = [_row(SamplingParams(temperature=1.0, top_k=3, top_p=0.8)) for _ in range(400)]
    assert set(Sampler(torch.Generator().manual_seed(2))(logits, rows).token_ids) == {0, 1}


def test_min_p_never_picks_excluded_tokens() -> None:
    # min_p=0.2: threshold 0.2 * 0.4 = 0.08 drops tokens 3 and 4 (0.05 each).
    probs = torch.tensor([0.4, 0.3, 0.2, 0.05, 0.05])
    logits = probs.log().expand(600, 5).contiguous()
    rows = [_row(SamplingParams(temperature=1.0, min_p=0.2), seed=i if i % 2 else None) for i in range(600)]
    toks = Sampler(torch.Generator().manual_seed(3))(logits, rows).token_ids
    assert set(toks) == {0, 1, 2}


def test_penalties_match_hand_computation() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]])
    prompt, output = [0, 1], [2, 2, 4]
    p = SamplingParams(temperature=1.0, repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25,
                       logprobs=5)
    # Hand computation: repetition over prompt+output ids {0, 1, 2, 4}: positive / 2, negative * 2;
    # then output counts {2: 2, 4: 1}: l -= 0.5 * count + 0.25 * (count > 0).
    expected = [2.0 / 2, -1.0 * 2, 0.5 / 2 - 0.5 * 2 - 0.25, 3.0, -2.0 * 2 - 0.5 * 1 - 0.25, 1.0]
    got = logits.clone()
    _apply_penalties(got, [_row(p, prompt, output)], [0])
    torch.testing.assert_close(got[0], torch.tensor(expected))
    # End-to-end: greedy with repetition penalty flips the argmax away from a repeated token.
    lg = torch.tensor([[3.0, 2.0, 0.0]])
    assert Sampler()(lg, [_row(SamplingParams(temperature=0.0), output=[0])]).token_ids == [0]
    assert Sampler()(lg, [_row(SamplingParams(temperature=0.0, repetition_penalty=2.0), output=[0])]).token_ids == [1]
    assert Sampler()(lg, [_row(SamplingParams(temperature=0.0, frequency_penalty=0.6), output=[0, 0])]).token_ids == [1]
    assert Sampler()(lg, [_row(SamplingParams(temperature=0.0, presence_penalty=1.5), output=[0])]).token_ids == [1]
    # Repetition penalty applies to prompt tokens, presence/frequency do not.
    assert Sampler()(lg, [_row(SamplingParams(temperature=0.0, repetition_penalty=2.0), prompt=[0])]).token_ids == [1]
    assert Sampler()(lg, [_row(SamplingParams(temperature=0.0, presence_penalty=2.0), prompt=[0])]).token_ids == [0]


def test_min_tokens_masks_eos_and_stop_ids() -> None:
    logits = torch.tensor([[5.0, 4.0, 3.0, 0.0]])  # eos=0 and stop id 1 dominate
    p = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[1])
    eos = frozenset({0})
    assert Sampler()(logits, [_row(p, output=[], eos=eos)]).token_ids == [2]
    assert Sampler()(logits, [_row(p, output=[3], eos=eos)]).token_ids == [2]
    assert Sampler()(logits, [_row(p, output=[3, 3], eos=eos)]).token_ids == [0]  # reached
    # ignore_eos: EOS is not a stop, so only the stop id is masked.
    p_ign = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[1], ignore_eos=True)
    assert Sampler()(logits, [_row(p_ign, output=[], eos=eos)]).token_ids == [0]
    p_ign2 = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[0, 1], ignore_eos=True)
    assert Sampler()(logits, [_row(p_ign2, output=[], eos=eos)]).token_ids == [2]
    sampled = SamplingParams(temperature=1.0, min_tokens=5)
    rows = [_row(sampled, output=[], eos=eos, seed=i) for i in range(300)]
    assert 0 not in Sampler()(logits.expand(300, 4).contiguous(), rows).token_ids


def _check_logprob_dict(d: dict, chosen: int, lp_row: torch.Tensor, k: int) -> None:
    ids = list(d)
    assert ids[0] == chosen
    ref_top = lp_row.topk(k).indices.tolist() if k else []
    assert set(ids) == {chosen} | set(ref_top)
    for tid, lp in d.items():
        assert lp.logprob == pytest.approx(float(lp_row[tid]), abs=1e-5)
        assert lp.rank == 1 + int((lp_row > lp_row[tid]).sum())


def test_logprobs_and_ranks_are_raw_log_softmax() -> None:
    logits = _logits(4, seed=5)
    top2 = logits[3].topk(2).indices
    logits[3, top2[0]] = logits[3, top2[1]] + 0.5  # presence 2.0 will move the pick off the raw argmax
    rows = [
        _row(SamplingParams(temperature=0.8, logprobs=3, repetition_penalty=1.5), prompt=[1, 2], seed=1),
        _row(SamplingParams(temperature=0.0, logprobs=0)),
        _row(SamplingParams(temperature=1.0)),
        _row(SamplingParams(temperature=0.0, logprobs=20, presence_penalty=2.0), output=[int(logits[3].argmax())]),
    ]
    out = Sampler()(logits, rows)
    ref = torch.log_softmax(logits, dim=-1)  # raw: before penalties and temperature
    assert out.logprobs[2] is None
    for i, k in [(0, 3), (1, 0), (3, 20)]:
        _check_logprob_dict(out.logprobs[i], out.token_ids[i], ref[i], k)
    # Row 3: the penalty moved the pick off the raw argmax, so its rank is > 1 in raw logprobs.
    assert out.logprobs[3][out.token_ids[3]].rank > 1


def test_logprob_ranks_with_ties() -> None:
    logits = torch.tensor([[1.0, 1.0, 0.0, 1.0]])
    out = Sampler()(logits, [_row(SamplingParams(temperature=0.0, logprobs=4))])
    d = out.logprobs[0]
    assert [d[t].rank for t in (0, 1, 3)] == [1, 1, 1] and d[2].rank == 4


def test_prompt_logprobs() -> None:
    logits = _logits(5, seed=6)
    targets = [3, 10, 0, 63, 7]
    res = compute_prompt_logprobs(logits, targets, k=2)
    ref = torch.log_softmax(logits, dim=-1)
    assert len(res) == 5
    for i, t in enumerate(targets):
        _check_logprob_dict(res[i], t, ref[i], 2)
    assert compute_prompt_logprobs(torch.empty(0, V), [], 2) == []
    # The target comes first even when it is not in the top-k.
    low = int(ref[1].argmin())
    assert list(compute_prompt_logprobs(logits[1:2], [low], k=2)[0])[0] == low
    assert math.isclose(res[0][3].logprob, float(ref[0, 3]), abs_tol=1e-6)


def _reference_top_k_top_p(logits: torch.Tensor, k: int, p: float) -> set[int]:
    """Plain sort-based top-k then top-p on one row [V]: the set of kept token ids."""
    order = logits.sort(descending=True).indices.tolist()
    kept = order[:k] if k else order
    probs = torch.softmax(logits[kept].double(), dim=0).tolist()
    out, mass = [], 0.0
    for tid, pr in zip(kept, probs):
        if mass >= p:
            break
        out.append(tid)
        mass += pr
    return set(out)


def test_top_k_top_p_mask_matches_sort_reference_including_full_sort_fallback() -> None:
    from openlora.model.sampler import TOP_P_CANDIDATES, _apply_top_k_top_p

    vocab = 4 * TOP_P_CANDIDATES
    gen = torch.Generator().manual_seed(7)
    # Peaked rows (cut among the candidates) and flat rows (cut beyond them: full-sort fallback).
    logits = torch.cat([torch.randn(4, vocab, generator=gen) * 6, torch.randn(4, vocab, generator=gen) * 0.3])
    top_k = torch.tensor([vocab, 50, vocab, 700, vocab, 900, 10, vocab])
    top_p = torch.tensor([0.9, 0.8, 0.5, 0.95, 0.9, 0.7, 0.6, 0.99])
    masked = _apply_top_k_top_p(logits, top_k, top_p)
    for r in range(8):
        got = set(torch.isfinite(masked[r]).nonzero().flatten().tolist())
        k = int(top_k[r]) if int(top_k[r]) < vocab else 0
        assert got == _reference_top_k_top_p(logits[r], k, float(top_p[r])), r
    assert len(set(torch.isfinite(masked[4]).nonzero().flatten().tolist())) > TOP_P_CANDIDATES  # fallback used
