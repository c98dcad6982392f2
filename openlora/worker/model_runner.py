"""Turns a SchedulerOutput into tensors, runs the model, samples. Owns the KV cache and generators."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from openlora.config import EngineConfig
from openlora.core.scheduler import ScheduledRequest, SchedulerOutput
from openlora.kernels.select import KernelPlan, select_kernels
from openlora.lora.heads import head_logits
from openlora.model.attention import causal_mask
from openlora.model.folded_norms import lora_input_fix
from openlora.model.llama import LlamaModel, load_model
from openlora.model.projections import ServedProjections
from openlora.model.rope import rope_cos_sin
from openlora.model.sampler import Sampler, SamplingRow, compute_prompt_logprobs
from openlora.outputs import PositionLogprobs
from openlora.worker.forward_context import AttentionMetadata, ForwardContext, LoRAContext, PrefillSeq

log = logging.getLogger("openlora.worker")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Prompt chunks of at most this many tokens are attended row by row by the C++ paged kernel, in the same
# call as the decode rows (each query row is a "decode row" whose visible length is its position + 1);
# longer chunks keep SDPA, whose blocked matmuls win there (bench/RESULTS.md, bench/attention_micro.py).
FUSED_PREFILL_MAX_TOKENS = 256


def kv_block_bytes(config: EngineConfig) -> int:
    """Bytes one KV block takes over all layers (K and V)."""
    m = config.model
    elem = torch.empty((), dtype=DTYPES[config.dtype]).element_size()
    return 2 * m.num_layers * config.cache.block_size * m.num_kv_heads * m.head_dim * elem


def num_kv_blocks(config: EngineConfig) -> int:
    """Blocks that fit the KV memory budget (or the explicit override)."""
    if config.cache.num_blocks is not None:
        return config.cache.num_blocks
    return max(1, config.cache.kv_cache_memory_bytes // kv_block_bytes(config))


@dataclass
class RunnerOutput:
    """Per-request results of one step (only requests that sampled appear in `sampled`)."""

    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, PositionLogprobs] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[PositionLogprobs]] = field(default_factory=dict)


class ModelRunner:
    """Executes steps on one device."""

    def __init__(self, config: EngineConfig, num_blocks: int, lora=None) -> None:
        self.config = config
        # Requests without their own seed sample from torch's global generator: seeding it here makes
        # a whole run reproducible from EngineConfig.seed (as vLLM's `seed`).
        torch.manual_seed(config.seed)
        self.device = torch.device(config.device)
        self.dtype = DTYPES[config.dtype]
        self.plan: KernelPlan = select_kernels(config.kernels, self.device, self.dtype)
        self.model: LlamaModel = load_model(config.model, self.dtype, self.device, self.plan.linear,
                                            config.quantization, config.source)
        m, bs = config.model, config.cache.block_size
        self.block_size = bs
        # [layers, 2, num_blocks, block_size, kv_heads, head_dim]
        self.kv = torch.zeros(m.num_layers, 2, num_blocks, bs, m.num_kv_heads, m.head_dim,
                              dtype=self.dtype, device=self.device)
        self.kv_caches = [(self.kv[i, 0], self.kv[i, 1]) for i in range(m.num_layers)]
        if self.plan.layer_loop == "cpp":
            self.model.bind_kv_cache(self.kv_caches)
        self.sampler = Sampler(argmax=self.plan.ops.argmax)
        self.generators: dict[str, torch.Generator] = {}
        self.lora = lora  # openlora.lora.manager.LoRAManager or None
        # A checkpoint with folded activation scales (AWQ, SmoothQuant): LoRA inputs corrected or refused
        input_fix = lora_input_fix(config)
        if lora is not None:  # DoRA's row scales are computed against the served projections
            lora.use_base(ServedProjections(self.model))
            lora.use_input_fix(input_fix)
        # Tests set this to a list to receive (request_id, fp32 logits [vocab]) of every sampled row.
        self.capture_logits: list[tuple[str, torch.Tensor]] | None = None
        # Tests and accuracy checks: (request id, fp32 [rows, vocab]) of every prompt-logprob chunk.
        self.capture_prompt_logits: list[tuple[str, torch.Tensor]] | None = None
        log.info("KV cache: %d blocks of %d tokens (%.1f MiB)", num_blocks, bs,
                 self.kv.numel() * self.kv.element_size() / 2**20)

    @torch.inference_mode()
    def zero_blocks(self, block_ids: list[int]) -> None:
        """Zero these KV blocks in every layer (K and V): scrubbing freed memory."""
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        self.kv.index_fill_(2, idx, 0)  # [layers, 2, num_blocks, ...]: dim 2 is the block

    def release(self, request_id: str) -> None:
        """Forget per-request state (the request finished)."""
        self.generators.pop(request_id, None)

    def _generator(self, req) -> torch.Generator | None:
        if req.seed is None:
            return None
        g = self.generators.get(req.request_id)
        if g is None:
            g = torch.Generator(device=self.device)
            g.manual_seed(req.seed)
            self.generators[req.request_id] = g
        return g

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        # Rows for the paged kernel (decode tokens, short chunks) first, then the other chunks: see
        # AttentionMetadata.
        seqs = sorted(out.scheduled, key=lambda s: not self._row_wise(s.num_new_tokens))
        ctx, input_ids, q_starts = self._prepare(seqs)
        hidden = self.model(input_ids, ctx, self.kv_caches)
        head = ctx.lora.batch.heads.get("lm_head") if ctx.lora is not None else None
        return self._sample(seqs, hidden, q_starts, head)

    def _row_wise(self, n: int) -> bool:
        """Whether a sequence's n query tokens go to the row-wise paged attention call."""
        return n == 1 or (self.plan.paged_attention and n <= FUSED_PREFILL_MAX_TOKENS)

    def _prepare(self, seqs: list[ScheduledRequest]) -> tuple[ForwardContext, torch.Tensor, list[int]]:
        bs, dev = self.block_size, self.device
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        q_starts: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefills: list[PrefillSeq] = []
        window = self.config.model.sliding_window
        for s in seqs:
            req, start, n = s.request, s.start, s.num_new_tokens
            q_starts.append(len(ids))
            toks = req.all_token_ids[start:start + n]
            ids.extend(toks)
            pos.extend(range(start, start + n))
            blocks = s.block_ids
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, start + n))
            if self._row_wise(n):
                for p in range(start, start + n):  # the query at position p sees keys [0, p]
                    decode_tables.append(blocks[: p // bs + 1])
                    decode_lens.append(p + 1)
            else:
                nb = -(-(start + n) // bs)
                prefills.append(PrefillSeq(
                    q_start=q_starts[-1], q_len=n, start=start,
                    block_ids=torch.tensor(blocks[:nb], dtype=torch.long, device=dev) if start else None,
                    mask=causal_mask(start, n, window, dev),
                ))
        nd = len(decode_tables)
        table = mask = lens = None
        if nd:
            width = max(len(t) for t in decode_tables)
            table = torch.tensor([t + [0] * (width - len(t)) for t in decode_tables], dtype=torch.long, device=dev)
            lens = torch.tensor(decode_lens, dtype=torch.long, device=dev)
            if not self.plan.paged_attention:  # SDPA path: padding (and window) mask over gathered keys
                kpos = torch.arange(width * bs, device=dev)[None, :]
                m = kpos < lens[:, None]
                if window is not None:
                    m &= kpos >= (lens[:, None] - window)
                mask = m[:, None, None, :]
        positions = torch.tensor(pos, dtype=torch.long, device=dev)
        cos, sin = rope_cos_sin(self.model.inv_freq, positions, self.dtype)
        attn = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            num_rowwise=nd, decode_block_table=table, decode_mask=mask, prefills=prefills,
            decode_seq_lens=lens, window=window, paged_kernel=self.plan.paged_attention,
        )
        lora_ctx = None
        if self.lora is not None:
            batch = self.lora.build_batch(seqs, q_starts, len(ids))
            if batch is not None:
                lora_ctx = LoRAContext(batch, *self.lora.pool_tensors(), self.plan.lora)
        # The C++ layer loop has no DoRA epilogue: steps with DoRA rows keep the Python loop.
        cpp_loop = self.plan.cpp_loop_for(len(ids), nd, bool(prefills), lora_ctx is not None) and not (
            lora_ctx is not None and lora_ctx.batch.has_dora)
        ctx = ForwardContext(positions=positions, cos=cos, sin=sin, attn=attn, ops=self.plan.ops, lora=lora_ctx,
                             cpp_loop=cpp_loop)
        return ctx, torch.tensor(ids, dtype=torch.long, device=dev), q_starts

    @staticmethod
    def _sampling_groups(logits: torch.Tensor, wide: dict[int, torch.Tensor]) -> list[tuple[list[int], torch.Tensor]]:
        """(row indices, their logits) per sampler call: the batch's rows of width vocab, then the wide rows
        (adapters with added tokens) grouped by width."""
        if not wide:
            return [(list(range(logits.shape[0])), logits)]
        narrow = [i for i in range(logits.shape[0]) if i not in wide]
        groups = [(narrow, logits[narrow])] if narrow else []
        by_width: dict[int, list[int]] = {}
        for i, row in wide.items():
            by_width.setdefault(row.shape[0], []).append(i)
        groups += [(idx, torch.stack([wide[i] for i in idx])) for idx in by_width.values()]
        return groups

    def _sample(self, seqs: list[ScheduledRequest], hidden: torch.Tensor, q_starts: list[int],
                head: list | None = None) -> RunnerOutput:
        """Sample the rows that end their known tokens; `head`: this step's adapters that change lm_head
        (openlora.lora.heads), applied to those rows' logits and to prompt-logprob rows. Rows of adapters
        that add tokens have wider logits and are sampled apart (each row's sampling is its own)."""
        res = RunnerOutput()
        rows: list[int] = []
        sample_seqs: list[ScheduledRequest] = []
        prompt_lp: list[tuple[ScheduledRequest, int, int]] = []  # (seq, first hidden row, count)
        for s, q0 in zip(seqs, q_starts):
            req = s.request
            k = req.sampling_params.prompt_logprobs
            if k is not None and s.start < req.num_prompt_tokens - 1:
                # Rows whose next token is still a prompt token.
                cnt = min(s.start + s.num_new_tokens, req.num_prompt_tokens - 1) - s.start
                prompt_lp.append((s, q0, cnt))
            if s.samples:
                rows.append(q0 + s.num_new_tokens - 1)
                sample_seqs.append(s)
        vocab = self.config.model.vocab_size
        if sample_seqs:
            logits = self.model.logits(hidden[rows], fp32=False)  # [B, vocab] in the model dtype
            wide = head_logits(logits, hidden, rows, head, vocab) if head else {}
            if self.capture_logits is not None:
                self.capture_logits.extend((s.request.request_id, wide.get(i, row).to(torch.float32, copy=True))
                                           for i, (s, row) in enumerate(zip(sample_seqs, logits)))
            srows = [SamplingRow(s.request.sampling_params, s.request.prompt_token_ids, s.request.output_token_ids,
                                 self._generator(s.request), s.request.eos_token_ids) for s in sample_seqs]
            for idx, lg in self._sampling_groups(logits, wide):
                so = self.sampler(lg, [srows[i] for i in idx])
                for i, tok, lp in zip(idx, so.token_ids, so.logprobs):
                    rid = sample_seqs[i].request.request_id
                    res.sampled[rid] = tok
                    if lp is not None:
                        res.logprobs[rid] = lp
        for s, q0, cnt in prompt_lp:
            req = s.request
            lg = self.model.logits(hidden[q0:q0 + cnt])
            if head:
                wide = head_logits(lg, hidden, list(range(q0, q0 + cnt)), head, vocab)
                if wide:  # an adapter with added tokens: every row of this request is wide
                    lg = torch.stack([wide[i] for i in range(cnt)]).float()
            if self.capture_prompt_logits is not None:
                self.capture_prompt_logits.append((req.request_id, lg.to(torch.float32, copy=True)))
            targets = req.prompt_token_ids[s.start + 1:s.start + 1 + cnt]
            res.prompt_logprobs[req.request_id] = compute_prompt_logprobs(lg, targets,
                                                                          req.sampling_params.prompt_logprobs)
        return res
