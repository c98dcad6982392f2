"""The synchronous engine: add requests, then step = schedule -> execute -> update."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from openlora.config import EngineConfig
from openlora.core.kv_cache_manager import KVCacheManager
from openlora.core.scheduler import Scheduler
from openlora.engine.detokenizer import IncrementalDetokenizer
from openlora.engine.model_hash import base_model_hash
from openlora.engine.output_processor import OutputProcessor, RequestGroup
from openlora.engine.tokenizer import load_tokenizer
from openlora.errors import InvalidRequest, OpenLoRAError, RequestTooLong
from openlora.lora.merge_service import MergeService, MergeSpec
from openlora.outputs import RequestOutput, UsageEvent
from openlora.request import Request
from openlora.sampling_params import SamplingParams
from openlora.worker.model_runner import ModelRunner, num_kv_blocks

log = logging.getLogger("openlora.engine")

# What a request may name as its adapters: None (base model), one adapter id, or weighted ids.
AdapterSpec = None | str | Sequence[tuple[str, float]]


class LLMEngine:
    """Owns tokenizer, scheduler, KV manager, adapter manager and model runner."""

    def __init__(self, config: EngineConfig, lora_manager=None) -> None:
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.tokenizer = load_tokenizer(config.model.path)
        self.num_blocks = num_kv_blocks(config)
        cap = self.num_blocks * config.cache.block_size
        if config.scheduler.max_model_len > cap:
            raise InvalidRequest(
                f"max_model_len {config.scheduler.max_model_len} exceeds the KV cache capacity of {cap} tokens; "
                "raise the KV-cache memory or lower max_model_len")
        self.kv = KVCacheManager(self.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching,
                                 scrub=config.cache.scrub_freed_memory)
        self.lora = lora_manager
        self.merges = MergeService(lora_manager) if lora_manager is not None else None
        self.scheduler = Scheduler(config.scheduler, self.kv, gate=lora_manager)
        self.runner = ModelRunner(config, self.num_blocks, lora=lora_manager)
        self.groups: dict[str, RequestGroup] = {}
        self.child_to_group: dict[str, tuple[RequestGroup, int]] = {}
        self.usage_listeners: list[Callable[[UsageEvent], None]] = []
        self.base_model_hash = base_model_hash(config.model.path)
        eos = set(config.model.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        if lora_manager is not None:
            lora_manager.use_tokenizer(self.tokenizer)
        self.outputs = OutputProcessor(self)
        self.stats = self.outputs.stats  # steps, tokens, generation tokens
        self.last_step_idle = False  # see step()

    # ---- requests ---------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams, *,
                    adapters: AdapterSpec = None, tenant: str = "", merge: dict | None = None,
                    cache_scope: str | None = None, seal: Callable[[list[str]], str] | None = None) -> None:
        """Validate and queue a request. Raises InvalidRequest / RequestTooLong / AdapterNotFound.
        `tenant` is who pays (receipts); `cache_scope` the prefix-cache namespace (default: the tenant);
        `seal`, given the finished samples' texts, makes the usage event's commitment
        (openlora.attribution.commitment)."""
        if request_id in self.groups:
            raise InvalidRequest(f"request id {request_id!r} is already in use")
        if (adapters or merge) and self.lora is None:
            raise InvalidRequest("this engine was started without adapter support")
        sources = None
        if merge is not None:
            if adapters:
                raise InvalidRequest("give either adapters or merge, not both")
            spec = MergeSpec.parse(merge)
            adapters = self.merges.prepare(spec)
            sources = list(zip(spec.adapters, spec.weights))
            merge = {**spec.params(), "merged_adapter": None if spec.strategy == "cat" else adapters[0][0]}
        uses = self.lora.resolve(adapters) if self.lora is not None else ()
        tokenizer, eos = self.tokenizer_for([u.adapter_id for u in uses])
        if isinstance(prompt, str):
            text: str | None = prompt
            ids = tokenizer.encode(prompt)
        else:
            text, ids = None, list(prompt)
            # An adapter's added tokens (openlora.lora.heads) are checked once it is loaded (lora.failure).
            vocab = self.config.model.vocab_size if len(uses) != 1 else 1 << 31
            if any((not isinstance(t, int)) or t < 0 or t >= vocab for t in ids):
                raise InvalidRequest(f"prompt token ids must be integers in [0, {vocab})")
        if not ids:
            raise InvalidRequest("prompt is empty")
        max_len = self.config.scheduler.max_model_len
        if len(ids) >= max_len:
            raise RequestTooLong(
                f"prompt has {len(ids)} tokens but the model's context length is {max_len} tokens")
        room = max_len - len(ids)
        max_tokens = params.max_tokens if params.max_tokens is not None else room
        if max_tokens > room:
            raise RequestTooLong(
                f"prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds the model's context "
                f"length of {max_len} tokens")
        children, detoks = [], []
        for i in range(params.n):
            cid = request_id if params.n == 1 else f"{request_id}#{i}"
            children.append(Request(
                request_id=cid, prompt_token_ids=ids, sampling_params=params, eos_token_ids=eos,
                max_tokens=max_tokens, adapters=uses, tenant=tenant, cache_scope=cache_scope,
                seed=None if params.seed is None else params.seed + i,
            ))
            detoks.append(IncrementalDetokenizer(
                tokenizer, ids, skip_special_tokens=params.skip_special_tokens, stop=params.stop,
                include_stop_str_in_output=params.include_stop_str_in_output))
        g = RequestGroup(request_id, text, ids, params, children, detoks, [[] for _ in children],
                   tenant=tenant, merge=merge, sources=sources, seal=seal)
        self.groups[request_id] = g
        for i, c in enumerate(children):
            self.child_to_group[c.request_id] = (g, i)
            self.scheduler.add_request(c)

    def tokenizer_for(self, adapter_ids: Sequence[str]) -> tuple[Any, frozenset[int]]:
        """The tokenizer and end-of-sequence ids of a request's adapters: the model's, unless the adapter
        adds tokens and brings its own tokenizer (openlora.lora.tokenizers). Safe from any thread."""
        tok = self.lora.tokenizer_for(adapter_ids) if self.lora is not None and adapter_ids else None
        if tok is None:
            return self.tokenizer, self.eos_token_ids
        return tok, self.eos_token_ids | ({tok.eos_token_id} if tok.eos_token_id is not None else set())

    def abort_request(self, request_ids: str | Sequence[str]) -> None:
        """Abort user requests (all their samples); their blocks are freed at once."""
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        for rid in request_ids:
            g = self.groups.get(rid)
            if g is None:
                continue
            self.scheduler.abort([c.request_id for c in g.children])
            self.outputs.retire_if_done(g)
        self._scrub()

    def has_unfinished_requests(self) -> bool:
        return bool(self.groups)

    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ---- the step ---------------------------------------------------------------------------
    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """One round: schedule, execute, update, process. Returns outputs of requests that progressed
        (only those that finished with `finished_only`: offline generate skips building the others)."""
        sched = self.scheduler.schedule()
        self._scrub()  # blocks freed while scheduling (preemption), before this step writes into them
        out = self.runner.execute(sched) if not sched.empty else None
        progressed = self.scheduler.update(sched, out.sampled) if out is not None else []
        self._scrub()  # blocks of the requests that just finished
        outputs = self.outputs.process(sched, out, progressed, finished_only)
        # Nothing ran and nothing changed: every unfinished request waits on an adapter load (or a slot's
        # time slice). The server's loop then sleeps until a load ends rather than stepping again at once.
        self.last_step_idle = sched.empty and not sched.failed and not sched.preempted and not outputs
        return outputs

    def _scrub(self) -> None:
        """Zero the KV blocks no request may read again (CacheConfig.scrub_freed_memory)."""
        if self.config.cache.scrub_freed_memory:
            dirty = self.kv.take_dirty()
            if dirty:
                self.runner.zero_blocks(dirty)


__all__ = ["LLMEngine", "OpenLoRAError"]
