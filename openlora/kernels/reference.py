"""Plain-loop SGMV: the specification of every LoRA backend and the test oracle (slow on purpose)."""

from __future__ import annotations

import torch

from openlora.lora.batch import LoRABatch


@torch.no_grad()
def sgmv_reference(
    y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, batch: LoRABatch, site: str,
    layer: int = 0,
) -> None:
    """Add the LoRA delta of every segment into `y`, one token at a time.

    Semantics:
        y:  [T, out]        model dtype; may be a strided column view of a wider output (written in place)
        x:  [T, in]         model dtype
        a:  [pool_rows, in]  one layer's A rows;   bt: [pool_rows, out] one layer's B^T rows
        for each segment g, rows R = row_idx[row_indptr[g]:row_indptr[g+1]], scales S likewise ([r]),
        for each token t in token_idx[seg_indptr[g]:seg_indptr[g+1]]:
            v     = S * (fp32(A[R]) @ fp32(x[t]))            # [r]    fp32 intermediate
            y[t]  = dtype(fp32(y[t]) + v @ fp32(Bt[R]))      # [out]  accumulate in fp32, round once
        DoRA segments (d = seg_dora[g] > 0; `layer` picks the row-scale tables' layer) instead:
            y[t]  = dtype(G[d] * (fp32(y[t]) + v @ fp32(Bt[R])) + S[d])   G, S = g_table[layer], shift_table[layer]
        Tokens in no segment are untouched. A site absent from `batch.sites`, or an empty batch, is a no-op.
    """
    rows = batch.sites.get(site)
    if rows is None or batch.empty:
        return
    seg = batch.seg_indptr_list
    rptr = rows.row_indptr_list or [int(v) for v in rows.row_indptr.tolist()]
    for g in range(len(seg) - 1):
        r_idx = rows.row_idx[rptr[g] : rptr[g + 1]].long()
        if r_idx.numel() == 0:
            continue
        s = rows.row_scale[rptr[g] : rptr[g + 1]].float()  # [r]
        a_g = a[r_idx].float()  # [r, in]
        b_g = bt[r_idx].float()  # [r, out]
        d = rows.seg_dora_list[g] if rows.seg_dora is not None else 0
        for t in batch.token_idx[seg[g] : seg[g + 1]].tolist():
            v = s * (a_g @ x[t].float())  # [r]
            out = y[t].float() + v @ b_g
            if d:
                out = out * rows.g_table[layer, d]
                if rows.shift_table is not None:
                    out = out + rows.shift_table[layer, d]
            y[t] = out.to(y.dtype)
