"""Batched sampler: one call turns a step's logits [B, V] into one token (and optional logprobs) per row.

Input logits may be in the model's dtype (bf16): the plain-greedy path takes the argmax as they are,
every other path works on a float32 copy.

NOTE (order of transforms, applied to a float32 copy of the logits):
    1. penalties   repetition (HF: over prompt + output ids, divide positive / multiply negative logits),
                   then frequency and presence (OpenAI: over output ids, `l -= f * count + p * (count>0)`)
    2. min_tokens  `stop_token_ids` and EOS (unless ignore_eos) get -inf while fewer than `min_tokens`
                   tokens were generated
    3. greedy rows (temperature < 1e-5) take the argmax here; the steps below only touch sampled rows
    4. temperature `l / T`
    5. min_p       drop tokens with p < min_p * p_max (done in log space: l < l_max + log(min_p))
    6. top_k       keep tokens whose logit >= the k-th largest (ties at the boundary are kept)
    7. top_p       keep the smallest prefix of the sorted distribution (renormalised after top_k)
                   whose mass reaches top_p (tokens tied with the last kept one are kept too)
    8. sample      inverse CDF with one uniform per row (see _inverse_cdf); seeded rows draw their
                   uniform from their own generator, so their tokens do not depend on the rest of the
                   batch; unseeded rows share one batch-level draw.

Logprobs are the raw model logprobs, `log_softmax(logits)` before any penalty, temperature or
truncation (what the model believes, as vLLM's default "raw_logprobs"); `rank` is 1 + the number of
tokens with a strictly higher logprob.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from openlora.kernels import fused_ops
from openlora.outputs import Logprob, PositionLogprobs
from openlora.sampling_params import SamplingParams

# Candidates searched for the top-p cut before falling back to a full sort (see _apply_top_k_top_p).
TOP_P_CANDIDATES = 256


@dataclass
class SamplingRow:
    """One row of logits to sample from, with the state its sampling depends on."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # generated so far (penalties, min_tokens)
    generator: torch.Generator | None = None  # per-request; set iff the request has a seed
    eos_token_ids: frozenset[int] = frozenset()


@dataclass
class SamplerOutput:
    """One token per row, plus that row's logprobs when `params.logprobs` is set."""

    token_ids: list[int]
    # Per row: None unless params.logprobs is not None; else {sampled id: Logprob, then top-k}.
    logprobs: list[PositionLogprobs | None]


def _has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _min_tokens_banned(row: SamplingRow) -> set[int]:
    """Token ids that would stop this row: stop_token_ids, plus EOS unless ignore_eos."""
    p = row.params
    return set(p.stop_token_ids) | (set() if p.ignore_eos else set(row.eos_token_ids))


def _min_tokens_active(row: SamplingRow) -> bool:
    return len(row.output_token_ids) < row.params.min_tokens and bool(_min_tokens_banned(row))


def _padded_ids(lists: list[list[int]], pads: list[int], device: torch.device) -> torch.Tensor:
    """Right-pad list r with pads[r] into a [R, max_len] int64 tensor (max_len >= 1)."""
    width = max(1, max(len(x) for x in lists))
    return torch.tensor([x + [pad] * (width - len(x)) for x, pad in zip(lists, pads)], dtype=torch.long, device=device)


def _apply_penalties(logits: torch.Tensor, rows: list[SamplingRow], idx: list[int]) -> None:
    """In place on logits [B, V]: repetition, frequency and presence penalties for rows `idx`.

    NOTE: only the logits of ids seen in prompt + output change, so the work is gathered on those
    [R, L] positions; the one dense [R, V] op is the scatter_add that counts output occurrences.
    """
    device, vocab = logits.device, logits.shape[1]
    # Rows without any seen id are unaffected by every penalty.
    idx = [i for i in idx if rows[i].prompt_token_ids or rows[i].output_token_ids]
    if not idx:
        return
    seen = [rows[i].prompt_token_ids + rows[i].output_token_ids for i in idx]
    # Pad with the row's own first id: a duplicate position computes and writes the same value.
    seen_ids = _padded_ids(seen, [s[0] for s in seen], device)  # [R, L]
    outs = [rows[i].output_token_ids for i in idx]
    out_ids = _padded_ids(outs, [vocab] * len(idx), device)  # [R, Lo]; pad id V lands in a spare column
    counts = torch.zeros(len(idx), vocab + 1, dtype=torch.float32, device=device)  # [R, V + 1]
    counts.scatter_add_(1, out_ids, torch.ones_like(out_ids, dtype=torch.float32))
    seen_counts = counts.gather(1, seen_ids)  # [R, L] output occurrences of each seen id

    params = [rows[i].params for i in idx]
    rep = torch.tensor([p.repetition_penalty for p in params], device=device).unsqueeze(1)  # [R, 1]
    freq = torch.tensor([p.frequency_penalty for p in params], device=device).unsqueeze(1)  # [R, 1]
    pres = torch.tensor([p.presence_penalty for p in params], device=device).unsqueeze(1)  # [R, 1]

    row_ids = torch.tensor(idx, dtype=torch.long, device=device).unsqueeze(1).expand_as(seen_ids)  # [R, L]
    vals = logits[row_ids, seen_ids]  # [R, L]
    vals = torch.where(vals > 0, vals / rep, vals * rep)  # HF repetition penalty (prompt + output)
    vals = vals - freq * seen_counts - pres * (seen_counts > 0).float()  # OpenAI (output only)
    logits[row_ids, seen_ids] = vals


def _apply_min_tokens(logits: torch.Tensor, rows: list[SamplingRow], idx: list[int]) -> None:
    """In place: -inf on stop ids (see _min_tokens_banned) for rows that have not reached min_tokens."""
    vocab = logits.shape[1]
    r_idx: list[int] = []
    t_idx: list[int] = []
    for i in idx:
        for t in _min_tokens_banned(rows[i]):
            if t < vocab:
                r_idx.append(i)
                t_idx.append(t)
    if r_idx:
        logits[r_idx, t_idx] = float("-inf")


def _kth_largest(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """The top_k[r]-th largest logit of each row: logits [R, V], top_k [R] long in [1, V] -> [R, 1]."""
    kmax = int(top_k.max())
    top_vals = logits.topk(kmax, dim=-1).values  # [R, kmax], sorted descending
    return top_vals.gather(1, (top_k - 1).unsqueeze(1))


def _top_p_cutoff(desc: torch.Tensor, lse: torch.Tensor, top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-p cut on descending candidate logits desc [R, K] of rows with log-normaliser lse [R, 1].

    Keeps sorted position j while the mass before it is < top_p. Returns (cutoff logit [R, 1],
    found [R] bool); found is False when the K candidates hold less than top_p of the mass (the cut
    lies beyond them).
    """
    probs = (desc - lse).exp()  # [R, K] probabilities of the candidates in the full distribution
    cum = probs.cumsum(dim=-1)
    keep = ((cum - probs) < top_p.unsqueeze(1)).sum(dim=1)  # [R] >= 1: position 0 has mass 0 before it
    found = (keep < desc.shape[1]) | (cum[:, -1] >= top_p)
    cutoff = desc.gather(1, (keep - 1).unsqueeze(1))  # [R, 1]
    return cutoff, found


def _apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Top-k then top-p (on the top-k-renormalised distribution) on logits [R, V]; masked copy [R, V].

    top_k [R] long (V means disabled), top_p [R] float in (0, 1). Both keep every token whose logit is
    >= a cutoff (ties at a boundary survive). NOTE: a full [R, V] sort costs ~30x a top-256, and top-p
    mass nearly always sits in the first few hundred tokens, so the cut is searched among the
    TOP_P_CANDIDATES largest logits and only rows whose cut lies beyond them pay for a full sort.
    A row's path depends only on its own logits, so its result never depends on the batch.
    """
    vocab = logits.shape[1]
    k_rows = (top_k < vocab).nonzero().flatten().tolist()
    if k_rows:  # only rows with a top-k: a disabled row would make topk() a full sort
        logits = logits.clone()
        logits[k_rows] = _apply_top_k_only(logits[k_rows], top_k[k_rows])
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # [R, 1]
    cand = logits.topk(min(TOP_P_CANDIDATES, vocab), dim=-1).values  # [R, K] descending
    cutoff, found = _top_p_cutoff(cand, lse, top_p)
    missing = (~found).nonzero().flatten().tolist()
    if missing:  # rare: a flat distribution whose top-p set is larger than the candidates
        full = logits[missing].sort(dim=-1, descending=True).values  # [M, V]
        cutoff[missing] = _top_p_cutoff(full, lse[missing], top_p[missing])[0]
    return logits.masked_fill(logits < cutoff, float("-inf"))


def _apply_top_k_only(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Top-k on logits [R, V] (keep logits >= the k-th largest); top_k [R] long in [1, V)."""
    return logits.masked_fill(logits < _kth_largest(logits, top_k), float("-inf"))


def _on_rows(t: torch.Tensor, idx: list[int], fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """t[idx] = fn(t[idx]) in place, skipping the gather/scatter copies when idx is every row."""
    if len(idx) == t.shape[0]:
        t.copy_(fn(t))
    else:
        t[idx] = fn(t[idx])


def _logprob_dicts(logprobs: torch.Tensor, chosen: torch.Tensor, ks: list[int]) -> list[PositionLogprobs]:
    """Build {chosen id: Logprob, then top-k ids} per row from logprobs [R, V] and chosen ids [R]."""
    chosen_lp = logprobs.gather(1, chosen.unsqueeze(1))  # [R, 1]
    chosen_rank = (logprobs > chosen_lp).sum(dim=1) + 1  # [R]
    kmax = max(ks) if ks else 0
    if kmax > 0:
        top_vals, top_ids = logprobs.topk(kmax, dim=-1)  # [R, kmax], descending
        # Everything strictly above a top-k value is itself in the top-k, so ranks come from the
        # [R, kmax, kmax] comparison instead of a [R, kmax, V] one.
        top_ranks = (top_vals.unsqueeze(1) > top_vals.unsqueeze(2)).sum(dim=2) + 1  # [R, kmax]
        top_vals_l, top_ids_l, top_ranks_l = top_vals.tolist(), top_ids.tolist(), top_ranks.tolist()
    chosen_l, chosen_lp_l, chosen_rank_l = chosen.tolist(), chosen_lp.squeeze(1).tolist(), chosen_rank.tolist()
    out: list[PositionLogprobs] = []
    for r, k in enumerate(ks):
        d: PositionLogprobs = {chosen_l[r]: Logprob(chosen_lp_l[r], chosen_rank_l[r])}
        for j in range(k):
            tid = top_ids_l[r][j]
            if tid not in d:
                d[tid] = Logprob(top_vals_l[r][j], top_ranks_l[r][j])
        out.append(d)
    return out


def compute_prompt_logprobs(logits: torch.Tensor, target_ids: list[int], k: int) -> list[PositionLogprobs]:
    """Raw logprobs of prompt tokens: logits [T, V], row i predicts target_ids[i].

    Returns one dict per row: {target id: Logprob, then the top-k ids}.
    """
    assert logits.shape[0] == len(target_ids), (logits.shape, len(target_ids))
    if not target_ids:
        return []
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [T, V]
    chosen = torch.tensor(target_ids, dtype=torch.long, device=logits.device)
    return _logprob_dicts(logprobs, chosen, [k] * len(target_ids))


class Sampler:
    """Samples one token per row of a [B, V] logits batch (see the module docstring for semantics).

    `generator` drives the shared draw of unseeded rows (None: torch's global RNG); `argmax` is the
    kernel plan's row argmax (default: the fused op when it builds here).
    """

    def __init__(self, generator: torch.Generator | None = None,
                 argmax: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.generator = generator
        self.argmax = argmax or fused_ops.argmax

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        assert logits.dim() == 2 and logits.shape[0] == len(rows), (logits.shape, len(rows))
        batch, vocab = logits.shape
        device = logits.device
        if batch == 0:
            return SamplerOutput([], [])

        penalty_idx = [i for i, r in enumerate(rows) if _has_penalty(r.params)]
        min_tok_idx = [i for i, r in enumerate(rows) if _min_tokens_active(r)]
        lp_idx = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        greedy = [r.params.greedy for r in rows]

        # Fast path: plain greedy decoding is one argmax, on the logits in the model's dtype (widening
        # bf16 to fp32 is exact and order-preserving, so the argmax is the same as after .float()).
        if all(greedy) and not penalty_idx and not min_tok_idx and not lp_idx:
            return SamplerOutput(self.argmax(logits).tolist(), [None] * batch)

        logits = logits.to(torch.float32, copy=True)  # [B, V] fp32; never modify the caller's tensor
        raw_logprobs = torch.log_softmax(logits[lp_idx], dim=-1) if lp_idx else None  # [R, V]

        if penalty_idx:
            _apply_penalties(logits, rows, penalty_idx)
        if min_tok_idx:
            _apply_min_tokens(logits, rows, min_tok_idx)

        tokens = torch.empty(batch, dtype=torch.long, device=device)  # [B]
        greedy_idx = [i for i in range(batch) if greedy[i]]
        if greedy_idx:
            tokens[greedy_idx] = self.argmax(logits[greedy_idx])
        sample_idx = [i for i in range(batch) if not greedy[i]]
        if len(sample_idx) == batch:
            tokens = self._sample(logits, rows)  # no row gather: `logits` is already our copy
        elif sample_idx:
            tokens[sample_idx] = self._sample(logits[sample_idx], [rows[i] for i in sample_idx])

        out_lps: list[PositionLogprobs | None] = [None] * batch
        if lp_idx:
            assert raw_logprobs is not None
            dicts = _logprob_dicts(raw_logprobs, tokens[lp_idx], [rows[i].params.logprobs for i in lp_idx])
            for i, d in zip(lp_idx, dicts):
                out_lps[i] = d
        return SamplerOutput(tokens.tolist(), out_lps)

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Temperature, min_p, top_k, top_p, then inverse-CDF sampling. logits [R, V] -> ids [R]."""
        n, vocab = logits.shape
        device = logits.device
        params = [r.params for r in rows]

        temp = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
        logits.div_(temp.unsqueeze(1))  # [R, V]; in place: the caller passes a private copy

        min_p = [p.min_p for p in params]
        if any(m > 0.0 for m in min_p):
            # p_i < min_p * p_max  <=>  l_i < l_max + log(min_p); min_p = 0 gives -inf (keeps all).
            log_min_p = torch.tensor([math.log(m) if m > 0 else float("-inf") for m in min_p], device=device)
            threshold = logits.max(dim=-1, keepdim=True).values + log_min_p.unsqueeze(1)  # [R, 1]
            logits.masked_fill_(logits < threshold, float("-inf"))

        top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        top_p = [p.top_p for p in params]
        # Rows needing the sort (top-p) and rows needing only top-k take different routes; both use
        # the same top-k rule, so a row's mask never depends on its batch neighbours.
        sort_rows = [i for i in range(n) if top_p[i] < 1.0]
        k_rows = [i for i in range(n) if top_p[i] >= 1.0 and top_k[i] < vocab]
        if sort_rows:
            k_t = torch.tensor([top_k[i] for i in sort_rows], dtype=torch.long, device=device)
            # A top_p below float32's smallest normal (the API takes any double > 0) would round to 0
            # and keep no token: clamped, it keeps the top one, which is what so small a p means.
            p_t = torch.tensor([top_p[i] for i in sort_rows], dtype=torch.float32, device=device).clamp_min(
                torch.finfo(torch.float32).tiny)
            _on_rows(logits, sort_rows, lambda x: _apply_top_k_top_p(x, k_t, p_t))
        if k_rows:
            k_t2 = torch.tensor([top_k[i] for i in k_rows], dtype=torch.long, device=device)
            _on_rows(logits, k_rows, lambda x: _apply_top_k_only(x, k_t2))

        probs = logits.softmax(dim=-1)  # [R, V]; masked tokens have probability exactly 0
        # One uniform per row: unseeded rows share one batch-level draw, seeded rows draw from their own
        # generator (so a seeded row's token depends only on its logits, params and generator state).
        u = torch.empty(n, dtype=torch.float32)
        unseeded = [i for i, r in enumerate(rows) if r.generator is None]
        if unseeded:
            u[unseeded] = torch.rand(len(unseeded), generator=self.generator)
        for i, r in enumerate(rows):
            if r.generator is not None:
                u[i] = torch.rand(1, generator=r.generator, device=r.generator.device).item()
        return _inverse_cdf(probs, u.to(device))


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Sample one id per row of probs [R, V] with uniforms u [R] in [0, 1): first id whose CDF > u * total.

    NOTE: chosen over the exponential race (argmax(probs / Exp(1) noise)): it needs one random number
    per row instead of V, and exponential_ over [R, V] costs ~8x a cumsum on CPU. Tokens with
    probability 0 have a flat CDF step, so they can only be hit through float rounding at the very
    end of the CDF; that case is redirected to the last token with nonzero probability.
    """
    cdf = probs.cumsum(dim=-1)  # [R, V]
    x = (u * cdf[:, -1]).unsqueeze(1)  # [R, 1], rescaled so the rows need not sum to exactly 1
    ids = torch.searchsorted(cdf, x, right=True).squeeze(1).clamp_max_(probs.shape[1] - 1)  # [R]
    bad = probs.gather(1, ids.unsqueeze(1)).squeeze(1) == 0
    if bool(bad.any()):
        last_nonzero = probs.shape[1] - 1 - (probs[bad] > 0).flip(1).float().argmax(dim=1)
        ids[bad] = last_nonzero
    return ids
