"""Per-step inputs shared by every layer, built once by the model runner and passed explicitly."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from openlora.kernels.fused_ops import FusedOps
from openlora.lora.batch import LoRABatch


@dataclass
class PrefillSeq:
    """A sequence with more than one query token in this step (prompt chunk or recompute)."""

    q_start: int  # first row of this sequence in the flattened batch
    q_len: int
    start: int  # tokens already in the cache before this step (prefix hits, earlier chunks)
    block_ids: torch.Tensor | None  # int64 [num_blocks] when start > 0 (context read from the cache)
    mask: torch.Tensor | None  # bool [q_len, start + q_len], None when plain causal suffices


@dataclass
class AttentionMetadata:
    """Where each token's K/V goes and what each query attends to.

    The runner orders the flattened batch with the row-wise sequences first, then the others, so
    row-wise rows are [0, num_rowwise). Row-wise: single-token (decode) sequences and, with the C++ paged
    kernel, short prompt chunks (each query row attends by itself, as a decode row would; see
    model_runner.FUSED_PREFILL_MAX_TOKENS); `prefills` holds the other multi-token chunks."""

    slot_mapping: torch.Tensor  # int64 [T]: block_id * block_size + offset of each new token
    num_rowwise: int  # row-wise query rows
    decode_block_table: torch.Tensor | None  # int64 [num_rowwise, max_blocks]: each row's blocks (padded with 0)
    decode_mask: torch.Tensor | None  # bool [num_rowwise, 1, 1, max_blocks * block_size] (SDPA path)
    prefills: list[PrefillSeq] = field(default_factory=list)
    decode_seq_lens: torch.Tensor | None = None  # int64 [num_rowwise]: row i sees keys [0, len) (position + 1)
    window: int | None = None  # sliding window (keys > position - window); None = full causal
    paged_kernel: bool = False  # row-wise rows use the C++ paged kernel (reads K/V in place), else SDPA


@dataclass
class LoRAContext:
    """The device pool and kernel backend, plus this step's metadata."""

    batch: LoRABatch
    a: dict[str, torch.Tensor]  # site -> [num_layers, pool_rows, in]
    bt: dict[str, torch.Tensor]  # site -> [num_layers, pool_rows, out]
    backend: object  # openlora.kernels backend with .sgmv(y, x, a, bt, batch, site)


@dataclass
class ForwardContext:
    positions: torch.Tensor  # int64 [T]
    cos: torch.Tensor  # [T, head_dim] model dtype
    sin: torch.Tensor
    attn: AttentionMetadata
    ops: FusedOps  # the kernel plan's fused elementwise ops
    lora: LoRAContext | None = None
    cpp_loop: bool = False  # all layers in the C++ loop this step (KernelPlan.cpp_loop_for)
