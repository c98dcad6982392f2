"""The synchronous engine: add requests, then step = schedule -> execute -> update."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from openlora.config import EngineConfig
from openlora.core.kv_cache_manager import KVCacheManager
from openlora.core.scheduler import Scheduler
from openlora.engine.detokenizer import IncrementalDetokenizer
from openlora.engine.model_hash import base_model_hash
from openlora.engine.tokenizer import load_tokenizer
from openlora.errors import InvalidRequest, OpenLoRAError, RequestTooLong
from openlora.lora.merge_service import MergeService, MergeSpec
from openlora.outputs import CompletionOutput, RequestOutput, UsageEvent
from openlora.request import AdapterUse, Request, RequestStatus
from openlora.sampling_params import SamplingParams
from openlora.worker.model_runner import ModelRunner, num_kv_blocks

log = logging.getLogger("openlora.engine")

# What a request may name as its adapters: None (base model), one adapter id, or weighted ids.
AdapterSpec = None | str | Sequence[tuple[str, float]]


@dataclass
class _Group:
    """A user request: its `n` sample sequences and what has been reported so far."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    children: list[Request]
    detoks: list[IncrementalDetokenizer]
    logprobs: list[list] = field(default_factory=list)
    prompt_logprobs: list | None = None
    tenant: str = ""
    merge: dict | None = None
    sources: list[tuple[str, float]] | None = None  # merge sources (adapter id, weight)
    arrival_wall: float = field(default_factory=time.time)

    @property
    def finished(self) -> bool:
        return all(c.is_finished for c in self.children)


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
        self.kv = KVCacheManager(self.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        self.lora = lora_manager
        self.merges = MergeService(lora_manager) if lora_manager is not None else None
        self.scheduler = Scheduler(config.scheduler, self.kv, gate=lora_manager)
        self.runner = ModelRunner(config, self.num_blocks, lora=lora_manager)
        self.groups: dict[str, _Group] = {}
        self.child_to_group: dict[str, tuple[_Group, int]] = {}
        self.usage_listeners: list[Callable[[UsageEvent], None]] = []
        self.base_model_hash = base_model_hash(config.model.path)
        eos = set(config.model.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self.stats = {"steps": 0, "tokens": 0, "prompt_tokens": 0, "generation_tokens": 0}

    # ---- requests ---------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams, *,
                    adapters: AdapterSpec = None, tenant: str = "", merge: dict | None = None) -> None:
        """Validate and queue a request. Raises InvalidRequest / RequestTooLong / AdapterNotFound."""
        if request_id in self.groups:
            raise InvalidRequest(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            text: str | None = prompt
            ids = self.tokenizer.encode(prompt)
        else:
            text, ids = None, list(prompt)
            vocab = self.config.model.vocab_size
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
        children, detoks = [], []
        for i in range(params.n):
            cid = request_id if params.n == 1 else f"{request_id}#{i}"
            children.append(Request(
                request_id=cid, prompt_token_ids=ids, sampling_params=params, eos_token_ids=self.eos_token_ids,
                max_tokens=max_tokens, adapters=uses, tenant=tenant,
                seed=None if params.seed is None else params.seed + i,
            ))
            detoks.append(IncrementalDetokenizer(
                self.tokenizer, ids, skip_special_tokens=params.skip_special_tokens, stop=params.stop,
                include_stop_str_in_output=params.include_stop_str_in_output))
        g = _Group(request_id, text, ids, params, children, detoks, [[] for _ in children],
                   tenant=tenant, merge=merge, sources=sources)
        self.groups[request_id] = g
        for i, c in enumerate(children):
            self.child_to_group[c.request_id] = (g, i)
            self.scheduler.add_request(c)

    def abort_request(self, request_ids: str | Sequence[str]) -> None:
        """Abort user requests (all their samples); their blocks are freed at once."""
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        for rid in request_ids:
            g = self.groups.get(rid)
            if g is None:
                continue
            self.scheduler.abort([c.request_id for c in g.children])
            self._finish_group_if_done(g)

    def has_unfinished_requests(self) -> bool:
        return bool(self.groups)

    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ---- the step ---------------------------------------------------------------------------
    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """One scheduling + forward + sampling round. Returns outputs of requests that progressed (only
        those that finished with `finished_only`: offline generate skips building the others)."""
        sched = self.scheduler.schedule()
        touched: dict[str, _Group] = {}
        for req in sched.failed:
            req.error_status = self._failure_status(req)
            g, _ = self.child_to_group[req.request_id]
            touched[g.request_id] = g
        if not sched.empty:
            out = self.runner.execute(sched)
            for rid, lps in out.prompt_logprobs.items():
                g, _ = self.child_to_group[rid]
                if g.prompt_logprobs is None:
                    g.prompt_logprobs = [None]
                if g.children[0].request_id == rid:
                    g.prompt_logprobs.extend(lps)
            progressed = self.scheduler.update(sched, out.sampled)
            self.stats["steps"] += 1
            self.stats["tokens"] += sched.num_batched_tokens
            self.stats["generation_tokens"] += len(progressed)
            for req in progressed:
                g, i = self.child_to_group[req.request_id]
                touched[g.request_id] = g
                self._detokenize(req, g, i, out.logprobs.get(req.request_id))
        outputs = []
        for g in touched.values():
            if g.finished or not finished_only:
                outputs.append(self._output(g))
            self._finish_group_if_done(g)
        return outputs

    def _detokenize(self, req: Request, g: _Group, i: int, lp) -> None:
        d = g.detoks[i]
        d.add([req.output_token_ids[-1]])
        if lp is not None:
            g.logprobs[i].append(lp)
        if d.stop_hit is not None and not req.is_finished:
            req.stop_reason = d.stop_hit
            self.scheduler.finish(req, RequestStatus.FINISHED_STOPPED)
        if req.is_finished:
            d.finish()

    def _output(self, g: _Group) -> RequestOutput:
        outs = []
        for i, (c, d) in enumerate(zip(g.children, g.detoks)):
            outs.append(CompletionOutput(
                index=i, text=d.output_text, token_ids=list(c.output_token_ids),
                logprobs=list(g.logprobs[i]) if g.params.logprobs is not None else None,
                finish_reason=c.status.finish_reason, stop_reason=c.stop_reason))
        failed = next((c for c in g.children if c.error), None)
        err = failed.error if failed else None
        return RequestOutput(
            request_id=g.request_id, prompt=g.prompt, prompt_token_ids=g.prompt_token_ids, outputs=outs,
            finished=g.finished, prompt_logprobs=g.prompt_logprobs,
            num_cached_tokens=max(0, g.children[0].num_cached_tokens), error=err,
            error_status=(failed.error_status or 503) if failed else None,
        )

    def _failure_status(self, req: Request) -> int:
        """HTTP status of an adapter failure: the load error's own (400 for a bad merge), else 503."""
        for u in req.adapters:
            e = self.lora.entries.get(u.adapter_id) if self.lora is not None else None
            if e is not None and e.exc is not None:
                return getattr(e.exc, "status", 503)
        return 503

    def _finish_group_if_done(self, g: _Group) -> None:
        if not g.finished or g.request_id not in self.groups:
            return
        del self.groups[g.request_id]
        for c in g.children:
            self.child_to_group.pop(c.request_id, None)
            self.runner.release(c.request_id)
        self._emit_usage(g)

    def _emit_usage(self, g: _Group) -> None:
        if not self.usage_listeners:
            return
        statuses = {c.status for c in g.children}
        status = ("failed" if RequestStatus.FINISHED_ERROR in statuses
                  else "aborted" if RequestStatus.FINISHED_ABORTED in statuses else "finished")
        first = g.children[0]
        ev = UsageEvent(
            request_id=g.request_id, tenant=g.tenant, base_model=self.config.model.path,
            base_model_hash=self.base_model_hash,
            adapters=self._usage_adapters(g, first),
            prompt_tokens=len(g.prompt_token_ids), cached_tokens=max(0, first.num_cached_tokens),
            completion_tokens=sum(c.num_output_tokens for c in g.children), status=status,
            finish_reason=first.status.finish_reason, merge=g.merge, arrival_time=g.arrival_wall,
            finish_time=time.time(),
        )
        for fn in self.usage_listeners:
            try:
                fn(ev)
            except Exception:  # a listener must never take the engine down
                log.exception("usage listener failed for %s", g.request_id)


    def _usage_adapters(self, g: _Group, first: Request) -> tuple[AdapterUse, ...]:
        """Every source adapter: a merged request lists the merge's sources, not the merged copy."""
        if g.sources is None:
            return first.adapters
        out = []
        for aid, w in g.sources:
            e = self.lora.entries.get(aid)
            out.append(AdapterUse(aid, e.content_hash if e is not None else "", w))
        return tuple(out)


__all__ = ["LLMEngine", "OpenLoRAError"]
