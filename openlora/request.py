"""A request owns its state machine and token counters (the scheduler reads, never duplicates them)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from openlora.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    """Lifecycle. Every finished state sorts after PREEMPTED, so `is_finished` is one comparison."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6

    @property
    def is_finished(self) -> bool:
        return self > RequestStatus.PREEMPTED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclass(frozen=True)
class AdapterUse:
    """One adapter used by a request: its id, content hash and weight in the composition."""

    adapter_id: str
    content_hash: str
    weight: float = 1.0


@dataclass(eq=False)
class Request:
    """One sequence being generated.

    `adapters` is empty for the base model, one entry for a plain adapter request, several for a
    weighted composition. `cache_salt` (adapter content hashes and weights + the cache scope) keys the
    prefix cache, so KV is never shared across adapters, weights or tenants. The server derives the
    scope from the authenticated tenant (openlora.server.state.ServerState.cache_scope); a client's own
    salt can only narrow it.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    max_tokens: int = 16  # resolved: never exceeds the model's context
    adapters: tuple[AdapterUse, ...] = ()
    tenant: str = ""
    cache_scope: str | None = None  # prefix-cache namespace; None: the tenant alone
    arrival_time: float = field(default_factory=time.monotonic)
    seed: int | None = None  # resolved per sample (n > 1 gives seed + index)
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prefix-cache hit on first scheduling (-1: not scheduled yet)
    num_preemptions: int = 0
    error: str | None = None
    error_status: int | None = None  # HTTP status of `error` (400 bad merge, 503 adapter load failure)
    exc: BaseException | None = None  # the failure itself (its status and error type reach the client)
    stop_reason: int | str | None = None
    first_token_time: float | None = None
    # Prompt logprobs collected so far (filled chunk by chunk when prompt_logprobs is set).
    prompt_logprobs: list = field(default_factory=list)

    @property
    def cache_salt(self) -> str:
        """Namespace for prefix-cache keys: adapter content hashes with weights, plus the cache scope."""
        parts = [f"{a.content_hash}*{a.weight!r}" for a in self.adapters]
        return "|".join(parts) + "#" + (self.tenant if self.cache_scope is None else self.cache_scope)

    @property
    def lora_key(self) -> tuple[tuple[str, float], ...]:
        """Identity of this request's adapter mix (ids and weights), () for the base model."""
        return tuple((a.adapter_id, a.weight) for a in self.adapters)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens: what the KV cache must eventually hold."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def token_at(self, i: int) -> int:
        p = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < p else self.output_token_ids[i - p]
