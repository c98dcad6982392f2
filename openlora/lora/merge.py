"""Merging several LoRA adapters into one, with the semantics of PEFT's `add_weighted_adapter`.

Notation: adapter i has, at one module, `A_i: [r_i, in]`, `B_i: [out, r_i]`, scaling `s_i`
(alpha/r) and the user weight `w_i`; its update is `s_i * B_i @ A_i`. Per module, only the adapters
that adapt it take part. The merged adapter has scaling 1 everywhere (PEFT: r = lora_alpha = new rank).

- `cat` (exact): `A = cat_i(w_i s_i A_i)` (rows), `B = cat_i(B_i)` (columns); rank = sum of ranks.
  Then `B @ A = sum_i w_i s_i B_i A_i`. (PEFT zero-pads a module to the summed config rank when some
  adapter does not adapt it; we keep only the real rows, which is the same math.)
- `linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune` (need equal ranks): with
  `c_i = w_i s_i`, A and B are combined *separately*: `A = F([A_i], [sign(c_i) sqrt|c_i|])`,
  `B = F([B_i], [sqrt|c_i|])`, where F is the weighted sum (linear), magnitude-prune-then-sum,
  TIES (magnitude prune to `density`, elect the sign by total mass or frequency, mean of the agreeing
  weighted entries), or DARE (keep each entry with probability `density`, divide by `density`, then
  sum or TIES-merge). `B @ A` then holds cross terms `B_i A_j`: an approximation, not a weighted sum.
- `svd`, `ties_svd`, `dare_linear_svd`, `dare_ties_svd`, `magnitude_prune_svd`: F is applied to the
  dense deltas `s_i B_i A_i` with weights `w_i`, then a truncated SVD (rank `svd_rank`, default the
  largest adapter rank): `B = U[:, :k] diag(S[:k])`, `A = Vh[:k]`, optionally clamped at the
  `svd_clamp` quantile of their entries.
- `delta_svd` (OpenLoRA): `sum_i w_i s_i B_i A_i` then a reduced truncated SVD, computed in float64;
  with one adapter no PEFT "linear" shortcut, and never any rslora rescale (see the finding below).

With a single adapter PEFT switches every strategy to `linear` (`sqrt(w s)` on each factor); so do we.
DARE draws its masks with `torch.bernoulli(full_like(t, density))`, module by module in model order
(layer, then q,k,v,o,gate,up,down), for a module first every adapter's A then every adapter's B (SVD
variants: one mask per adapter delta), from a private generator seeded with `seed`. This equals
PEFT's masks when the global RNG is seeded with `s` right after PEFT injects the new adapter:
`torch.manual_seed(s)` *before* `add_weighted_adapter` is not enough, because the injection draws
the new adapter's (discarded) init weights from the global RNG first.

Finding on "double scaling" in PEFT's SVD family (peft 0.21.2, observed in tests/lora/test_merge.py::
test_finding_svd_scaling): `get_delta_weight` folds `s_i` into the delta once, and the merged adapter
gets r = lora_alpha = new_rank, i.e. scaling 1, so for ordinary adapters the scaling is applied
exactly once: two adapters with r=8, alpha=32 (s=4), weights [1, 0], `svd` at rank 8 reproduce
adapter 0's delta with a ratio of 1.000. BUT the merged config copies `use_rslora` from the first
adapter, and then its scaling is new_rank / sqrt(new_rank) = sqrt(new_rank): with r=8, alpha=16,
rslora (s = 16/sqrt(8) = 5.657) the merged PEFT adapter's delta is 2.828 = sqrt(8) times the intended
one (the same holds for cat/linear/ties/dare). OpenLoRA's merged adapters always have scaling 1, so
their A/B equal PEFT's and their deltas equal PEFT's whenever the first adapter does not use rslora.

Another deliberate difference: PEFT injects the merged adapter with the first adapter's
`layers_to_transform`, silently dropping other adapters' layers; we merge over the union of modules.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import torch

from openlora.config import LORA_SITES
from openlora.errors import InvalidRequest
from openlora.lora.adapter import LoRAAdapter, LoRAModule

FACTOR_STRATEGIES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")  # need equal ranks
SVD_STRATEGIES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
STRATEGIES = ("cat",) + FACTOR_STRATEGIES + SVD_STRATEGIES + ("delta_svd",)
NEEDS_DENSITY = {"ties", "dare_linear", "dare_ties", "magnitude_prune",
                 "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"}
SIGN_METHODS = ("total", "frequency")


# ------------------------------------------------------------------------ elementwise combiners


def _magnitude_prune(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the `int(density * numel)` largest-magnitude entries of `t`, zero the rest."""
    if density >= 1:
        return t
    k = int(density * t.numel())
    keep = torch.zeros(t.numel(), dtype=t.dtype)
    keep[torch.topk(t.abs().reshape(-1), k=k, largest=True).indices] = 1
    return t * keep.reshape(t.shape)


def _random_prune(t: torch.Tensor, density: float, gen: torch.Generator | None) -> torch.Tensor:
    """DARE: keep each entry with probability `density`, rescale survivors by 1/density (no draw at 1)."""
    if density >= 1:
        return t
    mask = torch.bernoulli(torch.full_like(t, density), generator=gen)
    return t * mask / density


def _weighted(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """stacked [n, ...] * weights [n] broadcast over the trailing dims."""
    return stacked * weights.view(weights.shape + (1,) * (stacked.dim() - 1))


def _ties_merge(stacked: torch.Tensor, weights: torch.Tensor, method: str) -> torch.Tensor:
    """Elect a sign per entry from the (unweighted, pruned) stack, then average the agreeing weighted entries."""
    sign = stacked.sign()  # [n, ...]
    mass = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    agree = sign == torch.where(mass >= 0, 1, -1)  # zeros never agree
    kept = (_weighted(stacked, weights) * agree).sum(dim=0)
    return kept / torch.clamp(agree.sum(dim=0), min=1.0)


def _combine(kind: str, tensors: list[torch.Tensor], weights: torch.Tensor, density: float | None,
             sign_method: str, gen: torch.Generator | None) -> torch.Tensor:
    """One of PEFT's task-arithmetic combiners over same-shape tensors; `kind` drops any `_svd` suffix."""
    if kind in ("linear", "svd"):
        return _weighted(torch.stack(tensors), weights).sum(dim=0)
    assert density is not None  # validated by merge_adapters
    if kind in ("ties", "magnitude_prune"):
        pruned = torch.stack([_magnitude_prune(t, density) for t in tensors])
    elif kind in ("dare_linear", "dare_ties"):
        pruned = torch.stack([_random_prune(t, density, gen) for t in tensors])
    else:
        raise AssertionError(kind)
    if kind in ("ties", "dare_ties"):
        return _ties_merge(pruned, weights, sign_method)
    return _weighted(pruned, weights).sum(dim=0)


# ---------------------------------------------------------------------------- per-module merges


def _cat(mods: list[LoRAModule], ws: list[float]) -> LoRAModule:
    a = torch.cat([m.a * w * m.scaling for m, w in zip(mods, ws)], dim=0)  # [sum r_i, in]
    b = torch.cat([m.b for m in mods], dim=1)  # [out, sum r_i]
    return LoRAModule(a, b, 1.0)


def _factors(kind: str, mods: list[LoRAModule], ws: list[float], density: float | None, sign_method: str,
             gen: torch.Generator | None) -> LoRAModule:
    wa, wb = [], []
    for m, w in zip(mods, ws):
        c = w * m.scaling
        # NOTE: the sign goes on A only, else a negative weight would cancel out between A and B.
        wa.append(math.sqrt(abs(c)) * (1 if c >= 0 else -1))
        wb.append(math.sqrt(abs(c)))
    a = _combine(kind, [m.a for m in mods], torch.tensor(wa), density, sign_method, gen)  # [r, in]
    b = _combine(kind, [m.b for m in mods], torch.tensor(wb), density, sign_method, gen)  # [out, r]
    return LoRAModule(a, b, 1.0)


def _svd(kind: str, mods: list[LoRAModule], ws: list[float], rank: int, density: float | None, sign_method: str,
         clamp: float | None, full_matrices: bool, gen: torch.Generator | None) -> LoRAModule:
    deltas = [(m.b @ m.a) * m.scaling for m in mods]  # each [out, in], scaling folded in once
    delta = _combine(kind.removesuffix("_svd"), deltas, torch.tensor(ws), density, sign_method, gen)
    u, s, vh = torch.linalg.svd(delta, full_matrices=full_matrices)
    k = min(rank, s.numel())
    b = u[:, :k] @ torch.diag(s[:k])  # [out, k]
    a = vh[:k, :]  # [k, in]
    if clamp is not None:
        hi = torch.quantile(torch.cat([b.flatten(), a.flatten()]), clamp)
        b, a = b.clamp(-hi, hi), a.clamp(-hi, hi)
    return LoRAModule(a.contiguous(), b.contiguous(), 1.0)


def _delta_svd(mods: list[LoRAModule], ws: list[float], rank: int) -> LoRAModule:
    # float64: the sum of rank-r_i products is exact to fp32 precision before truncation.
    delta = sum(w * m.scaling * (m.b.double() @ m.a.double()) for m, w in zip(mods, ws))  # [out, in]
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, s.numel())
    return LoRAModule((vh[:k, :]).float().contiguous(), (u[:, :k] * s[:k]).float().contiguous(), 1.0)


# ------------------------------------------------------------------------------------ public API


def validate_params(num_adapters: int, weights: list[float], strategy: str, density: float | None,
                    majority_sign_method: str, svd_rank: int | None, svd_clamp: float | None) -> None:
    """Check every merge parameter that does not need the adapters' weights (400 on a bad field)."""
    if strategy not in STRATEGIES:
        raise InvalidRequest(f"strategy: unknown merge strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if not num_adapters:
        raise InvalidRequest("adapters: at least one adapter is required")
    if len(weights) != num_adapters:
        raise InvalidRequest(f"weights: {len(weights)} weights for {num_adapters} adapters")
    if not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights):
        raise InvalidRequest(f"weights: every weight must be a finite number, got {weights!r}")
    if density is not None and not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise InvalidRequest(f"density: must be in (0, 1], got {density!r}")
    if density is None and strategy in NEEDS_DENSITY and num_adapters > 1:
        raise InvalidRequest(f"density: strategy {strategy!r} requires a density in (0, 1]")
    if majority_sign_method not in SIGN_METHODS:
        raise InvalidRequest(f"majority_sign_method: must be one of {SIGN_METHODS}, got {majority_sign_method!r}")
    if svd_rank is not None and (not isinstance(svd_rank, int) or svd_rank < 1):
        raise InvalidRequest(f"svd_rank: must be an integer >= 1, got {svd_rank!r}")
    if svd_clamp is not None and not (isinstance(svd_clamp, (int, float)) and 0 <= svd_clamp <= 1):
        raise InvalidRequest(f"svd_clamp: must be a quantile in [0, 1], got {svd_clamp!r}")


def check_ranks(adapters: list[LoRAAdapter], strategy: str) -> None:
    """Strategies that combine A and B factor-wise need adapters of equal rank."""
    if strategy in FACTOR_STRATEGIES and len(adapters) > 1 and len({a.max_rank for a in adapters}) > 1:
        ranks = {a.adapter_id: a.max_rank for a in adapters}
        raise InvalidRequest(f"adapters: strategy {strategy!r} needs adapters of equal rank, got {ranks}")


def merge_key(adapters: list[LoRAAdapter], weights: list[float], strategy: str, params: dict[str, Any]) -> str:
    """Cache key of a merge: sha256 over strategy, weights, parameters and the adapters' content hashes."""
    doc = {
        "v": 1,
        "strategy": strategy,
        "weights": [float(w) for w in weights],
        "params": {k: params[k] for k in sorted(params)},
        "adapters": [a.content_hash for a in adapters],
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def merge_adapters(
    adapters: list[LoRAAdapter],
    weights: list[float],
    strategy: str,
    *,
    density: float | None = None,
    majority_sign_method: str = "total",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    seed: int | None = None,
    new_id: str | None = None,
) -> LoRAAdapter:
    """Merge adapters into a new one (scaling 1 per module), like PEFT's `add_weighted_adapter`.

    See the module docstring for each strategy's math. `seed` seeds a private generator for the DARE
    masks (None: the global torch RNG, as PEFT). Raises InvalidRequest naming the bad field.
    """
    validate_params(len(adapters), weights, strategy, density, majority_sign_method, svd_rank, svd_clamp)
    whole = [a.adapter_id for a in adapters if a.replaced or a.head_bases]
    if whole:
        raise InvalidRequest(f"cannot merge adapters that carry their own embed_tokens or lm_head matrix "
                             f"(modules_to_save, added tokens: {', '.join(whole)}); use each alone")
    heads = [a.adapter_id for a in adapters if a.heads]
    if heads:
        raise InvalidRequest(f"cannot merge adapters with LoRA on embed_tokens or lm_head ({', '.join(heads)}); "
                             f"compose them instead (adapters=[...], exact)")
    dora = [a.adapter_id for a in adapters if a.dora]
    if dora:  # g = m / ||W + s B A|| is not linear in B A: no factor merge of DoRA adapters is exact
        raise InvalidRequest(f"cannot merge DoRA adapters ({', '.join(dora)}): a DoRA adapter's row scale "
                             f"depends on its own update, so merged factors would not equal any DoRA model")
    check_ranks(adapters, strategy)
    params = {"density": density, "majority_sign_method": majority_sign_method, "svd_rank": svd_rank,
              "svd_clamp": svd_clamp, "svd_full_matrices": svd_full_matrices, "seed": seed}
    key = merge_key(adapters, weights, strategy, params)
    kind = "linear" if len(adapters) == 1 and strategy != "delta_svd" else strategy  # PEFT's shortcut
    new_rank = svd_rank or max(a.max_rank for a in adapters)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None

    modules: dict[tuple[int, str], LoRAModule] = {}
    all_keys = {k for a in adapters for k in a.modules}
    site_order = {s: i for i, s in enumerate(LORA_SITES)}
    for mkey in sorted(all_keys, key=lambda k: (k[0], site_order[k[1]])):  # model order (RNG stream)
        present = [(a.modules[mkey], w, a.adapter_id) for a, w in zip(adapters, weights) if mkey in a.modules]
        mods, ws = [p[0] for p in present], [float(p[1]) for p in present]
        if len({(m.a.shape[1], m.b.shape[0]) for m in mods}) > 1:
            dims = {aid: (m.a.shape[1], m.b.shape[0]) for m, _, aid in present}
            raise InvalidRequest(f"adapters: layer {mkey[0]} {mkey[1]} in/out features differ: {dims}")
        if kind == "cat":
            modules[mkey] = _cat(mods, ws)
        elif kind in FACTOR_STRATEGIES:
            if len({m.rank for m in mods}) > 1:
                ranks = {aid: m.rank for m, _, aid in present}
                raise InvalidRequest(
                    f"adapters: strategy {strategy!r} needs equal ranks, layer {mkey[0]} {mkey[1]} has {ranks}")
            modules[mkey] = _factors(kind, mods, ws, density, majority_sign_method, gen)
        elif kind in SVD_STRATEGIES:
            modules[mkey] = _svd(kind, mods, ws, new_rank, density, majority_sign_method, svd_clamp,
                                 svd_full_matrices, gen)
        else:
            modules[mkey] = _delta_svd(mods, ws, new_rank)

    merged_rank = max(m.rank for m in modules.values())
    config = {
        "peft_type": "LORA", "r": merged_rank, "lora_alpha": merged_rank, "use_rslora": False,
        "target_modules": [s for s in LORA_SITES if any(k[1] == s for k in modules)],
        "openlora_merge": {"strategy": strategy, "weights": [float(w) for w in weights],
                           "adapters": [a.adapter_id for a in adapters],
                           "content_hashes": [a.content_hash for a in adapters], **params},
    }
    return LoRAAdapter(
        adapter_id=new_id or f"merge-{key[:16]}", path=None, config=config,
        base_model_name_or_path=adapters[0].base_model_name_or_path, modules=modules,
    )

