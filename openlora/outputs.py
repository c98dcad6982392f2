"""What the engine hands back: per-request outputs and usage events (no prompt text in events)."""

from __future__ import annotations

from dataclasses import dataclass, field

from openlora.request import AdapterUse  # one type for an adapter's part, in requests and in usage events


@dataclass
class Logprob:
    """Logprob of one token; `rank` is 1 for the most likely token."""

    logprob: float
    rank: int
    decoded_token: str | None = None


# One position's logprobs: token id -> Logprob (the chosen token first, then the top-N).
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    """One of the `n` samples of a request."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" | None (running)
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """Everything known about a request so far (cumulative, like vLLM's offline API)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0
    error: str | None = None
    error_status: int | None = None
    exc: BaseException | None = None  # the failure itself, when the engine has one
    metrics: dict = field(default_factory=dict)


@dataclass(frozen=True)
class UsageEvent:
    """Emitted once per finished, failed or aborted request. Holds counts and identities only:
    never prompt or output text. The attribution layer turns it into a receipt."""

    request_id: str
    tenant: str
    base_model: str
    base_model_hash: str
    adapters: tuple[AdapterUse, ...]
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    status: str  # "finished" | "aborted" | "failed"
    finish_reason: str | None
    merge: dict | None = None  # merge parameters when the request used a merged adapter
    arrival_time: float = 0.0  # unix seconds
    finish_time: float = 0.0
    commitment: str = ""  # 0x-hex HMAC of input and output, when the client asked for one (else "")
    # Each sample's output token ids, in memory only: span-level attribution matches them against the
    # adapters' datanets before the receipt is signed (openlora.attribution.span_service); never stored.
    output_token_ids: tuple[tuple[int, ...], ...] = field(default=(), repr=False, compare=False)
