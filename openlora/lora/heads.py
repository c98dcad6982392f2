"""The model's ends per adapter: the token embedding and the output head, as an adapter changes them.

An adapter may change an end in one of three ways (PEFT's formats):
- LoRA on it (lora_embedding_A/B, lm_head.lora_A/B): embed_tokens h[t] += w * s B A[:, id_t] (a gather of
  A^T's row for the token id, times s B^T); lm_head logits[t] += w * s (h[t] A^T) B^T, only for the rows
  whose logits are computed (sampled positions, prompt logprobs): a segmented head.
- A whole new matrix (`modules_to_save`): the adapter's requests gather their embedding rows from it, or
  compute their logits with it. PEFT's per-request scale does not touch it.
- Added tokens: the adapter's vocabulary V' is larger than the model's V. The rows of ids V..V'-1 come
  from the adapter's own matrix, or from the copy of the resized base matrix PEFT saves beside a LoRA
  (`base_layer`, `original_module`). Only the adapter's own requests may consume those ids (the engine
  checks prompts), and only its rows have logits for them: their logits rows are V' wide and are sampled
  apart from the batch, whose rows keep width V.

Each update is computed in fp32 and rounded once per adapter; rows of other requests are not touched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from openlora.errors import UnsupportedAdapter

HEAD_SITES = ("embed_tokens", "lm_head")


@dataclass(frozen=True)
class EndWeights:
    """One adapter's version of one end, in the pool dtype. `vocab`: the rows this end has for the
    adapter's requests (the model's V, or more when the adapter adds tokens)."""

    vocab: int
    # embed_tokens: (A^T [vocab, r], s B^T [r, hidden]); lm_head: (A [r, hidden], s B^T [r, vocab])
    lora: tuple[torch.Tensor, torch.Tensor] | None = None
    replace: torch.Tensor | None = None  # modules_to_save: the whole matrix [vocab, hidden]
    extra: torch.Tensor | None = None  # base rows of the added tokens [vocab - V, hidden] (a LoRA on a resized end)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (*(self.lora or ()), self.replace, self.extra) if t is not None]

    def to(self, device: torch.device) -> EndWeights:
        lora = None if self.lora is None else (self.lora[0].to(device), self.lora[1].to(device))
        return EndWeights(self.vocab, lora, None if self.replace is None else self.replace.to(device),
                          None if self.extra is None else self.extra.to(device))


@dataclass(frozen=True)
class EndUse:
    """One (segment, adapter) of a step that changes an end: its token indices [n] int64, the
    adapter's end, and the request's weight for the adapter (scales the LoRA part only)."""

    tok: torch.Tensor
    end: EndWeights
    weight: float


def plan_ends(adapter, vocab: int, tied: bool, dtype: torch.dtype) -> dict[str, EndWeights]:
    """The ends an adapter (openlora.lora.adapter.LoRAAdapter) changes, for a model with `vocab` rows
    (`tied`: its head is its embedding). Raises UnsupportedAdapter when it adds tokens but does not
    carry the rows they need at both ends (PEFT would use resized base rows this file does not hold)."""
    vocab = vocab or adapter.vocab_size  # 0: no model to check against (tools that only read adapters)
    v2 = max(vocab, adapter.vocab_size)
    added = v2 - vocab
    ends: dict[str, EndWeights] = {}
    for site in HEAD_SITES:
        rep, lora = adapter.replaced.get(site), adapter.heads.get(site)
        if rep is None and lora is None and not added:
            continue
        if rep is not None:
            if rep.shape[0] != v2:
                raise UnsupportedAdapter(f"adapter {adapter.adapter_id!r}: its {site} has {rep.shape[0]} rows but its "
                                         f"vocabulary has {v2} tokens")
            ends[site] = EndWeights(v2, replace=rep.to(dtype).contiguous())
            continue
        extra = None
        if added:
            src = adapter.head_bases.get(site)
            if src is None and site == "lm_head" and tied:  # PEFT's head is then the resized embedding
                src = adapter.head_bases.get("embed_tokens")
            if src is None or src.shape[0] != v2:
                raise UnsupportedAdapter(
                    f"adapter {adapter.adapter_id!r} adds {added} tokens but carries no {site} rows for them: "
                    f"save {site} with the adapter (modules_to_save, or target it with save_embedding_layers)")
            extra = src[vocab:].to(dtype).contiguous()
        pair = None
        if lora is not None:
            rows = lora.a.shape[1] if site == "embed_tokens" else lora.b.shape[0]
            if rows != v2:
                raise UnsupportedAdapter(f"adapter {adapter.adapter_id!r}: the LoRA on {site} covers {rows} tokens, "
                                         f"its vocabulary {v2}")
            first = lora.a.t() if site == "embed_tokens" else lora.a  # embed: rows gathered by token id
            pair = (first.float().contiguous().to(dtype), (lora.b.float() * lora.scaling).t().contiguous().to(dtype))
        ends[site] = EndWeights(v2, lora=pair, extra=extra)
    return ends


@torch.no_grad()
def embed_rows(h: torch.Tensor, input_ids: torch.Tensor, uses: list[EndUse], vocab: int) -> None:
    """h [T, hidden], the embedded batch (ids >= vocab were gathered as any row), updated in place for
    the tokens of each use."""
    for u in uses:
        e = u.end
        ids = input_ids.index_select(0, u.tok)
        if e.replace is not None:
            h.index_copy_(0, u.tok, e.replace.index_select(0, ids).to(h.dtype))
            continue
        v = h.index_select(0, u.tok).float()
        if e.extra is not None:
            hi = (ids >= vocab).nonzero().flatten()
            if hi.numel():
                v[hi] = e.extra.index_select(0, ids[hi] - vocab).float()
        if e.lora is not None:
            at, bt = e.lora
            v = v + u.weight * (at.index_select(0, ids).float() @ bt.float())  # [n, hidden]
        h.index_copy_(0, u.tok, v.to(h.dtype))


@torch.no_grad()
def head_logits(logits: torch.Tensor, hidden: torch.Tensor, rows: list[int], uses: list[EndUse],
                vocab: int) -> dict[int, torch.Tensor]:
    """logits [N, vocab], computed from hidden[rows], updated in place for the rows of each use (a
    logits row belongs to a use when its hidden row is one of the use's tokens). Rows of adapters with
    added tokens are returned instead, wider: {index in rows: [vocab'] logits}."""
    where = {r: i for i, r in enumerate(rows)}
    wide: dict[int, torch.Tensor] = {}
    for u in uses:
        pos = [where[t] for t in u.tok.tolist() if t in where]
        if not pos:
            continue
        x = hidden.index_select(0, torch.tensor([rows[i] for i in pos], dtype=torch.long, device=hidden.device))
        e = u.end
        if e.replace is not None:
            full = F.linear(x, e.replace.to(x.dtype))  # in the model dtype, as transformers computes a head
        else:
            p = torch.tensor(pos, dtype=torch.long, device=logits.device)
            full = logits.index_select(0, p).float()
            if e.extra is not None:
                full = torch.cat([full, x.float() @ e.extra.float().t()], dim=1)
            if e.lora is not None:
                a, bt = e.lora
                full = full + u.weight * ((x.float() @ a.float().t()) @ bt.float())  # [n, vocab']
        full = full.to(logits.dtype)
        if e.vocab == vocab:
            logits.index_copy_(0, torch.tensor(pos, dtype=torch.long, device=logits.device), full)
        else:
            wide.update(zip(pos, full))
    return wide
