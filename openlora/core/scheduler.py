"""Token-budget scheduler with no tensors in it (vLLM v1 style).

Each step gives every running request `min(tokens still to compute, budget left)` and then admits
waiting requests FCFS while budget, sequence slots, KV blocks and adapter slots allow (round robin
across tenants when several wait, and across adapters when more want slots than exist). There are no
prefill/decode modes: chunked prefill and mixed batches fall out of the budget. When blocks run out a
running request is preempted (its blocks freed, recomputed later from scratch).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from openlora.config import SchedulerConfig
from openlora.core.kv_cache_manager import KVCacheManager
from openlora.request import Request, RequestStatus


class AdapterGate(Protocol):
    """What the scheduler needs from the adapter manager (torch-free view of it)."""

    def acquire(self, req: Request) -> bool:
        """Make the request's adapters resident and hold them; False if not ready yet (a background
        load is started) or if no adapter slot is free."""

    def enqueue(self, req: Request) -> None:
        """The request joined the waiting queue (its adapters may be prefetched)."""

    def release(self, req: Request) -> None:
        """The request finished, failed or was aborted (running or waiting)."""

    def requeue(self, req: Request) -> None:
        """The running request was preempted and waits again."""

    def failure(self, req: Request) -> BaseException | None:
        """The exception that keeps the request's adapters from loading, or None."""


@dataclass
class ScheduledRequest:
    """One request's share of a step."""

    request: Request
    num_new_tokens: int  # tokens computed this step: positions [start, start + num_new_tokens)
    start: int  # request.num_computed_tokens before this step (prefix hits included)
    block_ids: list[int]  # the request's whole block table (shared list; read-only for the runner)

    @property
    def samples(self) -> bool:
        """True when this step reaches the end of the known tokens, so a new token is sampled."""
        return self.start + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    """The scheduler's one contract with the model runner."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)  # running order
    num_batched_tokens: int = 0  # sum of num_new_tokens
    preempted: list[str] = field(default_factory=list)  # request ids preempted in this step
    failed: list[Request] = field(default_factory=list)  # finished with an error while waiting

    @property
    def empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """FCFS, token budget, preemption by recompute, optional adapter gating."""

    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, gate: AdapterGate | None = None) -> None:
        self.config = config
        self.kv = kv
        self.gate = gate
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self._step_no = 0
        self._last_admit: dict[tuple, int] = {}  # adapter mix -> step of its last admission (fairness)
        self._tenant_admit: dict[str, int] = {}  # tenant -> step of its last admission (fairness)

    # ---- queue management -------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        self.requests[req.request_id] = req
        self.waiting.append(req)
        if self.gate is not None:
            self.gate.enqueue(req)

    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def finish(self, req: Request, status: RequestStatus, error: str | None = None) -> None:
        """Finish (stop, length, abort, error): free blocks and adapter hold."""
        assert status.is_finished
        if req.is_finished:
            return
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        if self.gate is not None:
            self.gate.release(req)
        self.kv.free(req)
        req.status = status
        req.error = error
        self.requests.pop(req.request_id, None)

    def reset(self) -> list[Request]:
        """Drop every request after an engine error that a normal abort could not clean up: each one's
        adapter hold and blocks are released where that still works, and the queues end empty either
        way, so no stale request is scheduled again. Returns the dropped requests."""
        dropped = list(self.requests.values())
        for req in dropped:
            for release in ((self.gate.release,) if self.gate is not None else ()) + (self.kv.free,):
                try:
                    release(req)
                except Exception:  # noqa: BLE001 - the state is already broken: free what can be freed
                    pass
            req.status = RequestStatus.FINISHED_ABORTED
        self.requests.clear()
        self.waiting.clear()
        self.running.clear()
        return dropped

    def abort(self, request_ids: Iterable[str]) -> list[Request]:
        out = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is not None:
                self.finish(req, RequestStatus.FINISHED_ABORTED)
                out.append(req)
        return out

    # ---- one step ---------------------------------------------------------------------------
    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        if self.gate is not None:
            self.gate.requeue(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _max_new(self, req: Request, budget: int) -> int:
        todo = req.num_tokens - req.num_computed_tokens
        return max(0, min(todo, budget, self.config.max_model_len - req.num_computed_tokens))

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens

        # 1. Running requests first, in admission order; preempt from the back when short of blocks.
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = self._max_new(req, budget)
            if n == 0:
                i += 1
                continue
            while not self.kv.allocate_slots(req, n):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim.request_id)
                if victim is req:
                    break
            else:
                out.scheduled.append(
                    ScheduledRequest(req, n, req.num_computed_tokens, self.kv.block_ids(req.request_id))
                )
                budget -= n
                i += 1

        # 2. Admit waiting requests FCFS (skipping, not blocking on, requests whose adapter is not
        # resident yet). No admissions in a step that had to preempt.
        # Fairness across adapters: requests whose adapter mix has fewer running requests go first
        # (stable sort: FCFS within a mix, and pure FCFS without adapters), only while more adapters
        # want slots than exist (the gate's optional `contended()`); otherwise plain FCFS. Otherwise a flood for two
        # adapters keeps every freed sequence slot and a third adapter's requests never reach the gate.
        self._step_no += 1
        contended = getattr(self.gate, "contended", None)
        if self.gate is not None and len(self.waiting) > 1 and (contended is None or contended()):
            share: dict[tuple, int] = {}
            for r in self.running:
                share[r.lora_key] = share.get(r.lora_key, 0) + 1
            last = self._last_admit
            if len(last) > 4 * (len(self.waiting) + len(self.running)) + 64:  # forget departed mixes
                live = {r.lora_key for r in (*self.waiting, *self.running)}
                self._last_admit = last = {k: v for k, v in last.items() if k in live}
            # Fewest running first, then the mix admitted longest ago (never: first): round robin.
            order = sorted(self.waiting, key=lambda r: (share.get(r.lora_key, 0), last.get(r.lora_key, -1)))
        else:
            order = list(self.waiting)
        order = self._round_robin_tenants(order)
        # Adapter mixes refused this step: later requests with the same mix are skipped without
        # asking the gate again (refusals hold for the whole step; with thousands of queued requests
        # this keeps the admission scan a set lookup per request). Skipping keeps FCFS per adapter.
        blocked: set[tuple] = set()
        removed: set[str] = set()  # admitted or failed in this step
        for req in order:
            if budget <= 0 or out.preempted or len(self.running) >= self.config.max_num_seqs:
                break
            key = req.lora_key
            if key and key in blocked:
                continue
            if self.gate is not None:
                exc = self.gate.failure(req)
                if exc is not None:
                    self.requests.pop(req.request_id, None)
                    self.gate.release(req)
                    req.status = RequestStatus.FINISHED_ERROR
                    req.error, req.error_status, req.exc = str(exc), getattr(exc, "status", 503), exc
                    out.failed.append(req)
                    removed.add(req.request_id)
                    continue
                if not self.gate.acquire(req):
                    blocked.add(key)
                    continue
            hit_blocks, num_hit = self.kv.get_computed_blocks(req)
            n = min(req.num_tokens - num_hit, budget)
            if not self.kv.allocate_slots(req, n, hit_blocks):
                if self.gate is not None:
                    self.gate.requeue(req)
                break  # out of blocks: later requests would not fit either (FCFS)
            req.num_computed_tokens = num_hit
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_hit
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            removed.add(req.request_id)
            self._last_admit[key] = self._step_no
            self._tenant_admit[req.tenant] = self._step_no
            out.scheduled.append(ScheduledRequest(req, n, num_hit, self.kv.block_ids(req.request_id)))
            budget -= n
        if removed:  # the rest keep their arrival order
            self.waiting = deque(r for r in self.waiting if r.request_id not in removed)
        out.num_batched_tokens = sum(s.num_new_tokens for s in out.scheduled)
        return out

    def _round_robin_tenants(self, order: list[Request]) -> list[Request]:
        """Fairness across tenants: one request per tenant in turn (the tenant with the fewest running
        requests first, then the one admitted longest ago), each tenant's own requests in `order`. So a
        flooding tenant cannot take every freed slot while another tenant waits. One tenant: unchanged."""
        if not order or all(r.tenant == order[0].tenant for r in order):  # the common case: no dict per step
            return order
        queues: dict[str, deque[Request]] = {}
        for r in order:
            q = queues.get(r.tenant)
            if q is None:
                q = queues[r.tenant] = deque()
            q.append(r)
        if len(queues) < 2:
            return order
        running: dict[str, int] = {}
        for r in self.running:
            running[r.tenant] = running.get(r.tenant, 0) + 1
        if len(self._tenant_admit) > 4 * len(queues) + 64:  # forget departed tenants
            live = set(queues) | set(running)
            self._tenant_admit = {t: v for t, v in self._tenant_admit.items() if t in live}
        tenants = sorted(queues, key=lambda t: (running.get(t, 0), self._tenant_admit.get(t, -1)))
        out: list[Request] = []
        while tenants:
            for t in tenants:
                out.append(queues[t].popleft())
            tenants = [t for t in tenants if queues[t]]
        return out

    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Advance counters after the step, append sampled tokens, apply token-level stop rules.
        Returns the requests that got a new token (finished ones have a finished status)."""
        progressed = []
        for s in out.scheduled:
            req = s.request
            if req.is_finished:  # aborted while the step ran
                continue
            req.num_computed_tokens += s.num_new_tokens
            tok = sampled.get(req.request_id)
            if tok is None:
                continue
            req.output_token_ids.append(tok)
            progressed.append(req)
            status = self._check_stop(req, tok)
            if status is not None:
                self.finish(req, status)
        return progressed

    def _check_stop(self, req: Request, tok: int) -> RequestStatus | None:
        p = req.sampling_params
        n_out = req.num_output_tokens
        if n_out >= p.min_tokens:
            if not p.ignore_eos and tok in req.eos_token_ids:
                req.stop_reason = None
                return RequestStatus.FINISHED_STOPPED
            if tok in p.stop_token_ids:
                req.stop_reason = tok
                return RequestStatus.FINISHED_STOPPED
        if n_out >= req.max_tokens or req.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
