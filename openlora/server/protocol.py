"""OpenAI wire models (pydantic): requests, responses and OpenLoRA's few extensions.

Fields are ordered like OpenAI's API reference; OpenLoRA extensions (top_k, min_p, adapters, merge,
...) come last. Bounds are declared here so a bad value is a 400 before the engine sees it. Unknown
fields are ignored, as vLLM does, so clients written for newer OpenAI versions keep working.
Streaming chunks are built as plain dicts in `serving.py` (one per token: no model overhead).
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Upper bounds that keep one request from asking for unbounded work.
MAX_N = 16
MAX_LOGPROBS = 20
_INT64 = 2**63


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Wire):
    include_usage: bool = False


class AdapterWeight(_Wire):
    """One entry of the `adapters` extension: an adapter id and its composition weight."""

    id: str = Field(min_length=1)
    weight: float = Field(1.0, ge=-100.0, le=100.0)


class AttributionOptions(_Wire):
    """The `attribution` extension: per-request attribution choices."""

    spans: bool = Field(True, description="Match the answer against the adapters' datanets (span-level "
                                          "attribution); false: the manifest's fixed contributor weights.")


class _Extensions(_Wire):
    """OpenLoRA extensions shared by both endpoints. Listed as the *first* base of each request
    model so pydantic (which collects fields in reverse MRO) puts them after OpenAI's fields."""

    top_k: int = Field(0, ge=-1, le=1_000_000)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = Field(None, max_length=64)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    adapters: list[AdapterWeight] | None = Field(
        None, min_length=1, max_length=16,
        description="Weighted composition of adapters, e.g. [{id: legal, weight: 0.7}, ...]; overrides `model`.")
    merge: dict[str, Any] | None = Field(None, description="Merge parameters passed to the engine (TIES/DARE...).")
    cache_salt: str | None = Field(
        None, min_length=1, max_length=256,
        description="Narrows this request's prefix-cache namespace (as vLLM's cache_salt). The server always "
                    "scopes the cache to the caller's tenant; a salt can only split it further, never join "
                    "another tenant's.")
    attribution: AttributionOptions | None = Field(
        None, description='Attribution options: {"spans": false} keeps the fixed contributor weights '
                          "(no span-level matching of the answer against the adapters' datanets).")
    commit: bool = Field(
        False, description="Sign a commitment to this request's input and output into its receipt: an "
                           "HMAC-SHA256 under a fresh key returned only in this response (`attribution."
                           "commitment_key`). The node keeps neither the key nor the text.")


class _OpenAICompletion(_Wire):
    model: str
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="A string, a list of strings, a list of token ids, or a list of token-id lists.")
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    echo: bool = False
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    max_tokens: int | None = Field(16, ge=1)
    n: int = Field(1, ge=1, le=MAX_N)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=-_INT64, lt=_INT64)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    user: str | None = None


class CompletionRequest(_Extensions, _OpenAICompletion):
    """POST /v1/completions body."""


class TextPart(_Wire):
    type: Literal["text"]
    text: str


class ChatMessage(_Wire):
    role: str = Field(min_length=1)
    content: str | list[TextPart] | None = None
    name: str | None = None


class _OpenAIChat(_Wire):
    messages: list[ChatMessage] = Field(min_length=1)
    model: str
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    logprobs: bool = False
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=MAX_N)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=-_INT64, lt=_INT64)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    user: str | None = None


class ChatCompletionRequest(_Extensions, _OpenAIChat):
    """POST /v1/chat/completions body."""

    # Extension: render with add_generation_prompt (default True, as every chat server does).
    add_generation_prompt: bool = True
    # Extension (vLLM's name): leave the last assistant message open and continue it; the gateway
    # resumes a stream whose node died this way.
    continue_final_message: bool = False


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int] | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    finish_reason: str | None
    index: int
    logprobs: CompletionLogprobs | None = None
    text: str


class CompletionResponse(BaseModel):
    id: str
    choices: list[CompletionChoice]
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    object: Literal["text_completion"] = "text_completion"
    system_fingerprint: str | None = None
    usage: Usage
    attribution: dict[str, Any] | list[dict[str, Any]] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class AssistantMessage(BaseModel):
    content: str | None
    refusal: str | None = None
    role: Literal["assistant"] = "assistant"


class ChatChoice(BaseModel):
    finish_reason: str | None
    index: int
    logprobs: ChoiceLogprobs | None = None
    message: AssistantMessage


class ChatCompletionResponse(BaseModel):
    id: str
    choices: list[ChatChoice]
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    object: Literal["chat.completion"] = "chat.completion"
    system_fingerprint: str | None = None
    usage: Usage
    attribution: dict[str, Any] | None = None


class ModelCard(BaseModel):
    id: str
    created: int
    object: Literal["model"] = "model"
    owned_by: str = "openlora"
    parent: str | None = None
    state: str | None = Field(None, description="Adapters: resident, host, disk, loading, failed or registered.")
    pinned: bool | None = None
    content_hash: str | None = Field(None, description="Admin adapter routes: the content hash of the version "
                                                       "now current (receipts name it).")
    version: str | None = Field(None, description="Admin adapter routes: its attribution manifest's version.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class RegisterAdapterRequest(_Wire):
    """POST /v1/adapters: register an adapter, or replace the version registered under `id`."""

    id: str = Field(min_length=1, max_length=256)
    source: str = Field(min_length=1, description="A local folder, a hub repo id (optionally @revision) or s3:// URI.")
    pinned: bool = False
    manifest: dict[str, Any] | None = Field(
        None, description="Attribution manifest (else attribution.json beside the files; else the id keeps its "
                          "current one).")


class UpdateAdapterRequest(_Wire):
    """PUT /v1/adapters/{id}: a new version of a registered adapter (swapped in atomically)."""

    source: str = Field(min_length=1, description="A local folder, a hub repo id (optionally @revision) or s3:// URI.")
    pinned: bool | None = Field(None, description="Omitted: as the version it replaces.")
    manifest: dict[str, Any] | None = Field(
        None, description="Attribution manifest (else attribution.json beside the files; else the id keeps its "
                          "current one).")
