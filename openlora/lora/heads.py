"""LoRA on the model's ends: the token embedding (PEFT's lora_embedding_A/B) and the output head.

- embed_tokens: h[t] += w * s * B A[:, id_t], i.e. a gather of A^T's row for the token id, times s B^T
  ([r] @ [r, hidden]): one row per token of the adapter's segments.
- lm_head: logits[t] += w * s * (h[t] A^T) B^T, only for the rows whose logits are computed (sampled
  positions, prompt logprobs): a segmented head, [n, hidden] @ [hidden, r] @ [r, vocab].
Each is added in fp32 and rounded once per adapter; rows of other requests are not touched.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def add_embedding_lora(h: torch.Tensor, input_ids: torch.Tensor,
                       entries: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]]) -> None:
    """h [T, hidden] (the embedded batch, updated in place); entries: (token indices, A^T [vocab, r],
    s B^T [r, hidden], weight) per adapter segment."""
    for tok, at, bt, w in entries:
        v = at.index_select(0, input_ids.index_select(0, tok)).float() @ bt.float()  # [n, hidden]
        h.index_copy_(0, tok, (h.index_select(0, tok).float() + w * v).to(h.dtype))


@torch.no_grad()
def add_head_lora(logits: torch.Tensor, hidden: torch.Tensor, rows: list[int],
                  entries: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]]) -> None:
    """logits [N, vocab] computed from hidden[rows] (updated in place); entries: (token indices,
    A [r, hidden], s B^T [r, vocab], weight) per adapter segment. A logits row gets an entry's update
    when its hidden row is one of the entry's tokens."""
    where = {r: i for i, r in enumerate(rows)}
    for tok, a, bt, w in entries:
        pos = [where[t] for t in tok.tolist() if t in where]
        if not pos:
            continue
        p = torch.tensor(pos, dtype=torch.long, device=logits.device)
        src = torch.tensor([rows[i] for i in pos], dtype=torch.long, device=hidden.device)
        v = (hidden.index_select(0, src).float() @ a.float().t()) @ bt.float()  # [n, vocab]
        logits.index_copy_(0, p, (logits.index_select(0, p).float() + w * v).to(logits.dtype))
