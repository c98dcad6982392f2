"""After each step: route logprobs, detokenize (stop strings finish requests), count, build the
RequestOutputs, and retire finished groups with their usage event (the attribution layer's input).

The engine's step is schedule -> execute -> update -> `OutputProcessor.process`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from openlora.core.scheduler import Scheduler
from openlora.engine.detokenizer import IncrementalDetokenizer
from openlora.outputs import CompletionOutput, RequestOutput, UsageEvent
from openlora.request import AdapterUse, Request, RequestStatus
from openlora.sampling_params import SamplingParams

log = logging.getLogger("openlora.engine")


@dataclass
class RequestGroup:
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
    seal: Callable[[list[str]], str] | None = None  # texts -> commitment (holds hash state, no text)
    arrival_wall: float = field(default_factory=time.time)

    @property
    def finished(self) -> bool:
        return all(c.is_finished for c in self.children)


class OutputProcessor:
    """Turns a step's results into outputs; owns nothing but counters (the engine owns the groups)."""

    def __init__(self, engine) -> None:
        self.engine = engine  # groups, child_to_group, scheduler, runner, lora, usage listeners, identity
        self.stats = {"steps": 0, "tokens": 0, "prompt_tokens": 0, "generation_tokens": 0}

    @property
    def scheduler(self) -> Scheduler:
        return self.engine.scheduler

    def process(self, sched, out, progressed: list[Request], finished_only: bool) -> list[RequestOutput]:
        """Outputs of the groups that progressed or failed this step (only finished ones with
        `finished_only`); finished groups are retired."""
        c2g = self.engine.child_to_group
        touched: dict[str, RequestGroup] = {}
        for req in sched.failed:  # the scheduler set their error, status and exception
            g, _ = c2g[req.request_id]
            touched[g.request_id] = g
        if out is not None:
            for rid, lps in out.prompt_logprobs.items():
                g, _ = c2g[rid]
                if g.prompt_logprobs is None:
                    g.prompt_logprobs = [None]
                if g.children[0].request_id == rid:
                    g.prompt_logprobs.extend(lps)
            self.stats["steps"] += 1
            self.stats["tokens"] += sched.num_batched_tokens
            self.stats["generation_tokens"] += len(progressed)
            for req in progressed:
                g, i = c2g[req.request_id]
                touched[g.request_id] = g
                self._detokenize(req, g, i, out.logprobs.get(req.request_id))
        outputs = []
        for g in touched.values():
            if g.finished or not finished_only:
                outputs.append(self.output(g))
            self.retire_if_done(g)
        return outputs

    def _detokenize(self, req: Request, g: RequestGroup, i: int, lp) -> None:
        d = g.detoks[i]
        d.add([req.output_token_ids[-1]])
        if lp is not None:
            g.logprobs[i].append(lp)
        if d.stop_hit is not None and not req.is_finished:
            req.stop_reason = d.stop_hit
            self.scheduler.finish(req, RequestStatus.FINISHED_STOPPED)
        if req.is_finished:
            d.finish()

    def output(self, g: RequestGroup) -> RequestOutput:
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
            error_status=(failed.error_status or 503) if failed else None, exc=failed.exc if failed else None,
        )

    def retire_if_done(self, g: RequestGroup) -> None:
        eng = self.engine
        if not g.finished or g.request_id not in eng.groups:
            return
        del eng.groups[g.request_id]
        for c in g.children:
            eng.child_to_group.pop(c.request_id, None)
            eng.runner.release(c.request_id)
        self._emit_usage(g)

    def _emit_usage(self, g: RequestGroup) -> None:
        listeners: list[Callable[[UsageEvent], None]] = self.engine.usage_listeners
        if not listeners:
            return
        statuses = {c.status for c in g.children}
        status = ("failed" if RequestStatus.FINISHED_ERROR in statuses
                  else "aborted" if RequestStatus.FINISHED_ABORTED in statuses else "finished")
        first = g.children[0]
        ev = UsageEvent(
            request_id=g.request_id, tenant=g.tenant, base_model=Path(self.engine.config.model.path).name,
            base_model_hash=self.engine.base_model_hash,
            adapters=self._usage_adapters(g, first),
            prompt_tokens=len(g.prompt_token_ids), cached_tokens=max(0, first.num_cached_tokens),
            completion_tokens=sum(c.num_output_tokens for c in g.children), status=status,
            finish_reason=first.status.finish_reason, merge=g.merge, arrival_time=g.arrival_wall,
            finish_time=time.time(),
            # Only a finished request's text is what the client received in full: commit to that alone.
            commitment=g.seal([d.output_text for d in g.detoks]) if g.seal and status == "finished" else "",
            output_token_ids=tuple(tuple(c.output_token_ids) for c in g.children),
        )
        for fn in listeners:
            try:
                fn(ev)
            except Exception:  # a listener must never take the engine down
                log.exception("usage listener failed for %s", g.request_id)

    def _usage_adapters(self, g: RequestGroup, first: Request) -> tuple[AdapterUse, ...]:
        """Every source adapter: a merged request lists the merge's sources, not the merged copy, with
        the content hashes of the versions that served (a source may have been updated since)."""
        merged = (g.merge or {}).get("merged_adapter")
        if g.sources is None or (merged is None and all(u.content_hash for u in first.adapters)):
            return first.adapters  # plain requests and `cat` compositions: the versions they ran on
        hashes = self.engine.merges.source_hashes(merged) if merged is not None else None
        if hashes is None:  # never ran: name the current versions
            hashes = tuple(self.engine.lora.content_hash(aid) for aid, _ in g.sources)
        return tuple(AdapterUse(aid, h, w) for (aid, w), h in zip(g.sources, hashes))
