"""Offline API: `LLM(model=...)` and `llm.generate(prompts, params)` (vLLM users will know it)."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from openlora.config import CacheConfig, EngineConfig, KernelConfig, LoRAConfig, ModelConfig, SchedulerConfig
from openlora.engine.llm_engine import AdapterSpec, LLMEngine
from openlora.outputs import RequestOutput
from openlora.sampling_params import SamplingParams

log = logging.getLogger("openlora")


def build_engine_config(model: str | None = None, *, dtype: str = EngineConfig.dtype, device: str | None = None,
                        max_num_seqs: int = SchedulerConfig.max_num_seqs,
                        max_num_batched_tokens: int = SchedulerConfig.max_num_batched_tokens,
                        max_model_len: int | None = None, block_size: int = CacheConfig.block_size,
                        kv_cache_memory: int = CacheConfig.kv_cache_memory_bytes, num_kv_blocks: int | None = None,
                        enable_prefix_caching: bool = CacheConfig.enable_prefix_caching,
                        scrub_freed_memory: bool = CacheConfig.scrub_freed_memory,
                        max_loras: int = LoRAConfig.max_loras, max_cpu_loras: int = LoRAConfig.max_cpu_loras,
                        max_lora_rank: int = LoRAConfig.max_lora_rank, lora_pool_rows: int | None = None,
                        max_adapter_bytes: int = LoRAConfig.max_adapter_bytes,
                        num_threads: int | None = None, max_waiting: int = SchedulerConfig.max_waiting,
                        seed: int = EngineConfig.seed, kernels: KernelConfig | str | None = None,
                        quantization: str | None = None, original_norms: str | None = None) -> EngineConfig:
    """Engine options -> EngineConfig (the defaults are the config dataclasses', which also validate).
    No model means the built-in demo model (SmolLM2-135M-Instruct). `kernels` forces kernel choices:
    a KernelConfig or its text form ('lora=torch,layer_loop=python'); None: all auto. `quantization`
    keeps the base projections quantized ("w8a16", "w4a16", "w8a8": openlora.model.quant_linear); a GGUF file
    ("gguf") or a GPTQ / AWQ / compressed-tensors folder ("checkpoint", the default for such a folder) is
    served from its own codes. `original_norms`: the original model's folder or safetensors file, whose norm
    weights correct LoRA inputs on a checkpoint with folded scales (AWQ, SmoothQuant)."""
    import torch

    if model is None:
        from openlora.demo import demo_gguf, ensure_demo_model

        # "gguf" keeps the demo file's own Q4_1 codes, so it needs the file itself
        model = str(demo_gguf()) if quantization == "gguf" else str(ensure_demo_model())
    path = _resolve_model_path(model)
    from openlora.model.gguf import is_gguf
    from openlora.model.stored_quant import resolve_quantization

    gguf_file = str(Path(model).resolve()) if is_gguf(model) else None
    quantization, source = resolve_quantization(quantization, path, gguf_file)
    mc = ModelConfig.from_pretrained(path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    mml = min(max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
    return EngineConfig(
        model=mc, dtype=dtype, device=device,
        cache=CacheConfig(block_size, kv_cache_memory, num_kv_blocks, enable_prefix_caching, scrub_freed_memory),
        scheduler=SchedulerConfig(max_num_seqs, max_num_batched_tokens, mml, max_waiting),
        lora=LoRAConfig(max_loras, max_cpu_loras, max_lora_rank, lora_pool_rows, max_adapter_bytes),
        kernels=KernelConfig.parse(kernels) if isinstance(kernels, str) else (kernels or KernelConfig()),
        num_threads=num_threads, seed=seed, quantization=quantization, source=source, original_norms=original_norms,
    )


def _resolve_model_path(model: str) -> str:
    """A local folder, a GGUF file (converted once into a cached HF folder), or a hub repo id fetched
    through huggingface_hub into its cache."""
    from openlora.model.gguf import converted_dir, is_gguf

    if Path(model).is_dir():
        return str(Path(model))
    if is_gguf(model):
        return str(converted_dir(model))
    from huggingface_hub import snapshot_download

    from openlora.errors import ModelLoadError

    try:
        return snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"])
    except Exception as e:  # network, auth, missing repo
        raise ModelLoadError(f"model {model!r} is neither a local folder nor a reachable hub repo: {e}") from e


class LLM:
    """Generate from a batch of prompts with continuous batching, optionally with LoRA adapters."""

    def __init__(self, model: str | None = None, **engine_options) -> None:
        from openlora.lora.manager import LoRAManager

        self.config = build_engine_config(model, **engine_options)
        self.lora = LoRAManager(self.config)
        self.engine = LLMEngine(self.config, lora_manager=self.lora)
        self._ids = itertools.count()
        if model is None:  # the built-in demo model comes with its demo adapters
            from openlora.demo import demo_adapters

            for name, path in demo_adapters().items():
                self.register_adapter(name, str(path))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def register_adapter(self, name: str, source: str, *, pinned: bool = False, load: bool = True) -> None:
        """Register a PEFT adapter (folder, hub id or s3:// URI) under `name`."""
        self.lora.register(name, source, pinned=pinned, load=load)

    def generate(self, prompts: str | list[int] | Sequence[str | list[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 adapters: AdapterSpec | Sequence[AdapterSpec] = None,
                 merge: dict | Sequence[dict | None] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run all prompts to completion; one RequestOutput per prompt, in order.

        `adapters` has one entry per prompt (or one for all): None (base model), an adapter name, or
        a weighted list of (name, weight) pairs composed exactly in the same pass. `merge` (one dict
        per prompt or one for all) asks for a merged adapter: {adapters: [{id, weight}], strategy,
        density, majority_sign_method, svd_rank, seed} (see openlora.lora.merge_service)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        n = len(prompts)
        params = sampling_params or SamplingParams()
        plist = list(params) if isinstance(params, Sequence) else [params] * n
        if adapters is None or isinstance(adapters, str) or (adapters and isinstance(adapters[0], tuple)):
            alist = [adapters] * n
        else:
            alist = list(adapters)
        mlist = list(merge) if isinstance(merge, (list, tuple)) else [merge] * n
        if len(plist) != n or len(alist) != n or len(mlist) != n:
            raise ValueError("sampling_params, adapters and merge must have one entry per prompt")
        ids: list[str] = []
        try:
            for p, sp, ad, mg in zip(prompts, plist, alist, mlist):
                rid = f"gen-{next(self._ids)}"
                self.engine.add_request(rid, p, sp, adapters=ad, merge=mg)
                ids.append(rid)
        except Exception:
            self.engine.abort_request(ids)  # a bad prompt fails the call, not the next one
            raise
        final: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step(finished_only=True):
                if out.finished:
                    final[out.request_id] = out
            if self.engine.last_step_idle:  # waiting on adapter loads: leave the CPU to the loaders
                time.sleep(0.001)
        return [final[i] for i in ids]
