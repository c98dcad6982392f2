"""Llama-family decoder (Llama, Mistral, Qwen2) over a flattened, unpadded batch.

q/k/v and gate/up are fused into one matmul each at load time; LoRA is added per logical projection
into column slices of the fused outputs through the selected SGMV backend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from openlora.config import LORA_SITES, ModelConfig
from openlora.kernels import decoder
from openlora.lora.heads import embed_rows
from openlora.model.attention import paged_attention
from openlora.model.linear import Linear
from openlora.model.loader import CheckpointReader
from openlora.model.quant_linear import QuantLinear, quantize_for
from openlora.model.rope import inv_frequencies
from openlora.model.stored_quant import StoredWeights
from openlora.worker.forward_context import ForwardContext, LoRAContext


def _lora(lc: LoRAContext, site: str, layer: int, y: torch.Tensor, x: torch.Tensor) -> None:
    """Add this step's LoRA deltas of one projection into y (a view) in place."""
    if site in lc.batch.sites:
        lc.backend.sgmv(y, x, lc.a[site][layer], lc.bt[site][layer], lc.batch, site, layer)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, idx: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.idx = idx
        h, q, kv, i = (cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim,
                       cfg.intermediate_size)
        self.q_size, self.kv_size, self.inter = q, kv, i
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.eps = cfg.rms_norm_eps
        self.window = cfg.sliding_window
        self.scale = cfg.head_dim ** -0.5
        e = lambda *s: nn.Parameter(torch.empty(*s, dtype=dtype), requires_grad=False)  # noqa: E731
        self.input_norm = e(h)
        self.post_norm = e(h)
        # Fused projections (openlora.model.linear.Linear), set by load_weights.
        self.qkv: Linear | None = None  # [h] -> [q + 2kv] (q/k/v bias for Qwen2)
        self.o: Linear | None = None  # [q] -> [h]
        self.gate_up: Linear | None = None  # [h] -> [2i]
        self.down: Linear | None = None  # [i] -> [h]

    def forward(self, h: torch.Tensor, resid: torch.Tensor | None, ctx: ForwardContext,
                k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h [T, hidden]: the residual stream, updated in place; resid: the previous layer's MLP
        output still to be added (None for layer 0). Returns (h, down); the next layer adds down."""
        T = h.shape[0]
        q_sz, kv_sz, lc, li, ops = self.q_size, self.kv_size, ctx.lora, self.idx, ctx.ops
        if resid is None:
            x = ops.rms_norm(h, self.input_norm, self.eps)
        else:
            x = ops.add_rms_norm_(h, resid, self.input_norm, self.eps)  # h += resid
        qkv = self.qkv(x)  # [T, q + 2kv]
        if lc is not None:  # (slicing costs a few us per view: skipped when the batch has no adapters)
            _lora(lc, "q_proj", li, qkv[:, :q_sz], x)
            _lora(lc, "k_proj", li, qkv[:, q_sz:q_sz + kv_sz], x)
            _lora(lc, "v_proj", li, qkv[:, q_sz + kv_sz:], x)
        # Rotate the q and k heads in place in the qkv buffer: [T, H + KVH, d].
        qk = ops.rope_(qkv[:, :q_sz + kv_sz].view(T, self.num_heads + self.num_kv_heads, self.head_dim),
                       ctx.cos, ctx.sin)
        q, k = qk[:, :self.num_heads], qk[:, self.num_heads:]
        v = qkv[:, q_sz + kv_sz:].view(T, self.num_kv_heads, self.head_dim)
        ops.write_kv_(k_cache, v_cache, k, v, ctx.attn.slot_mapping)
        o = paged_attention(q, k, v, k_cache, v_cache, ctx.attn, self.scale)  # [T, q]
        attn_out = self.o(o)
        if lc is not None:
            _lora(lc, "o_proj", li, attn_out, o)
        x = ops.add_rms_norm_(h, attn_out, self.post_norm, self.eps)  # h += attn_out
        gu = self.gate_up(x)  # [T, 2i]
        if lc is not None:
            _lora(lc, "gate_proj", li, gu[:, :self.inter], x)
            _lora(lc, "up_proj", li, gu[:, self.inter:], x)
        act = ops.silu_mul(gu)  # [T, i]
        down = self.down(act)
        if lc is not None:
            _lora(lc, "down_proj", li, down, act)
        return h, down


class LlamaModel(nn.Module):
    """Embedding, decoder layers, final norm and (possibly tied) LM head."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.cfg = cfg
        self.dtype = dtype
        self.embed = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype), requires_grad=False)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, dtype) for i in range(cfg.num_layers))
        self.norm = nn.Parameter(torch.empty(cfg.hidden_size, dtype=dtype), requires_grad=False)
        self.lm_head = self.embed if cfg.tie_word_embeddings else nn.Parameter(
            torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype), requires_grad=False)
        self.lm_head_proj: Linear | None = None  # set by load_weights
        self.register_buffer("inv_freq", inv_frequencies(cfg), persistent=False)
        # The layer loop in C++ for row-wise steps, LoRA included (openlora.kernels.decoder), over the KV
        # caches and weights it was bound to (bind_kv_cache); None unless the kernel plan chose it.
        self.stack = None
        self.quantization: str | None = None  # set by load_weights (openlora.model.quant_linear)
        self._stack_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def bind_kv_cache(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Build the C++ layer loop over these per-layer (k_cache, v_cache) and the packed weights. Only
        when the kernel plan chose it (layer_loop=cpp: CPU, our packed GEMM, the fused-ops and paged
        attention extensions); the runner then sends it the steps it can take (ForwardContext.cpp_loop)."""
        c = self.cfg
        if self.quantization:  # the C++ loop runs packed float weights only
            return
        stack = decoder.load_extension().DecoderStack(
            self.layers[0].qkv.backend, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size,
            c.rms_norm_eps, c.head_dim ** -0.5, c.sliding_window or 0, self.norm)
        for layer, (kc, vc) in zip(self.layers, kv_caches):
            stack.add_layer(layer.input_norm, layer.post_norm, layer.qkv.weight, layer.qkv.bias, layer.o.weight,
                            layer.gate_up.weight, layer.down.weight, kc, vc)
        self.stack, self._stack_kv = stack, kv_caches

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """input_ids [T] -> final hidden states [T, hidden] (normed)."""
        a, lc = ctx.attn, ctx.lora
        vocab = self.cfg.vocab_size
        wide = lc is not None and lc.batch.max_vocab > vocab  # an adapter's added tokens may be in the step
        # A fresh tensor (safe to update in place); an added token's row is set by its adapter's end.
        h = F.embedding(input_ids.clamp(max=vocab - 1) if wide else input_ids, self.embed)
        if lc is not None and "embed_tokens" in lc.batch.heads:
            embed_rows(h, input_ids, lc.batch.heads["embed_tokens"], vocab)
        if ctx.cpp_loop and self.stack is not None and kv_caches is self._stack_kv:
            # Every row attends through the paged kernel: all layers in one C++ call (same kernels, same result).
            args = (h, ctx.cos, ctx.sin, a.slot_mapping, a.decode_block_table, a.decode_seq_lens)
            if lc is None or lc.batch.empty:
                return self.stack.forward(*args)
            b = lc.batch
            sites = [None if (r := b.sites.get(s)) is None
                     else [lc.a[s], lc.bt[s], r.row_idx, r.row_indptr, r.row_scale] for s in LORA_SITES]
            return self.stack.forward_lora(*args, b.token_idx, b.seg_indptr, sites, lc.backend.mm_min_tokens)
        resid: torch.Tensor | None = None
        for layer, (kc, vc) in zip(self.layers, kv_caches):
            h, resid = layer(h, resid, ctx, kc, vc)
        if resid is None:  # a model with no layers
            return ctx.ops.rms_norm(h, self.norm, self.cfg.rms_norm_eps)
        return ctx.ops.add_rms_norm_(h, resid, self.norm, self.cfg.rms_norm_eps)

    def logits(self, hidden: torch.Tensor, fp32: bool = True) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] (matmul in the model dtype, as transformers does), widened to fp32
        unless `fp32=False` (the sampler widens only when it needs to)."""
        out = self.lm_head_proj(hidden)
        return out.float() if fp32 else out

    @torch.no_grad()
    def load_weights(self, reader: CheckpointReader, backend: str, quantization: str | None = None,
                     source: str | None = None) -> None:
        """Copy checkpoint tensors in, fusing q/k/v and gate/up, packed for the linear `backend`
        (openlora.model.linear). Drops the C++ layer loop, which holds the previous packed weights:
        bind_kv_cache builds it again."""
        self.stack, self._stack_kv = None, None
        self.quantization = quantization
        dev = self.embed.device
        # "gguf" / "checkpoint": the source's own codes, no re-quantization (openlora.model.stored_quant)
        stored = StoredWeights.open(quantization, source, reader, dev)
        g = stored.get if stored is not None else reader.get

        def proj(names: list[str], bias: torch.Tensor | None):
            """The base projection of checkpoint weights `names` (fused in this order), quantized if asked."""
            if stored is not None:
                return stored.projection(names, bias, backend)
            w = torch.cat([g(n) for n in names]).to(dev)
            if quantization is None:
                return Linear(w, bias, backend)
            return QuantLinear(quantize_for(quantization, w.float()), bias, quantization)

        self.embed.copy_(g("model.embed_tokens.weight"))
        self.norm.copy_(g("model.norm.weight"))
        if not self.cfg.tie_word_embeddings:
            self.lm_head.copy_(g("lm_head.weight"))
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            layer.input_norm.copy_(g(p + "input_layernorm.weight"))
            layer.post_norm.copy_(g(p + "post_attention_layernorm.weight"))
            bias = (torch.cat([g(p + f"self_attn.{n}_proj.bias") for n in "qkv"]).to(dev)
                    if self.cfg.attention_bias else None)
            layer.qkv = proj([p + f"self_attn.{n}_proj.weight" for n in "qkv"], bias)
            layer.o = proj([p + "self_attn.o_proj.weight"], None)
            layer.gate_up = proj([p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"], None)
            layer.down = proj([p + "mlp.down_proj.weight"], None)
        self.lm_head_proj = Linear(self.lm_head.detach(), None, backend)


def load_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, linear: str,
               quantization: str | None = None, source: str | None = None) -> LlamaModel:
    """Build the model on `device` and load its checkpoint, packed for the linear backend `linear`."""
    reader = CheckpointReader(cfg.path, dtype)
    with torch.device(device):
        model = LlamaModel(cfg, dtype)
    model.load_weights(reader, linear, quantization, source)
    return model.eval()
