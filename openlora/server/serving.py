"""/v1/completions and /v1/chat/completions: request -> engine requests -> response or SSE stream.

One HTTP request becomes one engine request per prompt (its `n` samples live inside it); they share
one asyncio.Queue. A streaming response starts only after the first engine output (or error)
arrived, so failures that happen while queued (adapter failed to load: 503) still get their status
code; the first token is sent the moment it exists, so time to first token is unchanged.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from openlora.attribution import commitment
from openlora.engine.tokenizer import apply_chat_template
from openlora.errors import InvalidRequest, OpenLoRAError
from openlora.outputs import CompletionOutput, RequestOutput
from openlora.sampling_params import SamplingParams
from openlora.server.errors import from_exception, log
from openlora.server.node_state import note_adapter_state
from openlora.server.protocol import ChatCompletionRequest, CompletionRequest
from openlora.server.state import ServerState
from openlora.server.tenancy import Caller, not_registered


class ClientDisconnected(OpenLoRAError):
    """The client went away before its non-streaming response was ready (nobody reads the answer)."""

    status = 499
    code = "client_closed_request"


class RequestFailed(OpenLoRAError):
    """The engine finished a request with an error (e.g. its adapter failed to load: 503)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status
        self.code = "service_unavailable" if status == 503 else "internal_error"


# ---- shared pieces ---------------------------------------------------------------------------------
def _adapters(st: ServerState, body: CompletionRequest | ChatCompletionRequest):
    """(engine adapter spec, adapter names) from `adapters` (weighted) or `model`."""
    if body.adapters:
        pairs = [(a.id, a.weight) for a in body.adapters]
        return pairs, [a for a, _ in pairs]
    if body.model == st.model_id:
        return None, []
    return body.model, [body.model]


def _params(body: CompletionRequest | ChatCompletionRequest, max_tokens: int | None,
            logprobs: int | None) -> SamplingParams:
    if body.logit_bias:
        raise InvalidRequest("logit_bias is not supported")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return SamplingParams(
        n=body.n, temperature=body.temperature, top_k=body.top_k, top_p=body.top_p, min_p=body.min_p,
        repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        # Seeds are int64 on the wire; torch generators take [0, 2^64): fold negatives in.
        seed=None if body.seed is None else body.seed % (2**63),
        max_tokens=max_tokens, min_tokens=min(body.min_tokens, max_tokens or body.min_tokens), stop=stop,
        stop_token_ids=list(body.stop_token_ids or []), ignore_eos=body.ignore_eos,
        include_stop_str_in_output=body.include_stop_str_in_output, logprobs=logprobs,
        skip_special_tokens=body.skip_special_tokens)


class _Run:
    """The engine requests of one HTTP request, their shared queue and receipts."""

    def __init__(self, st: ServerState, base_id: str) -> None:
        self.st = st
        self.base_id = base_id
        self.ids: list[str] = []
        self.queue: asyncio.Queue = asyncio.Queue()
        self.receipts: dict[str, Future | None] = {}
        self.latest: dict[str, RequestOutput] = {}
        self.done: set[str] = set()
        self.closed = False
        self.t0 = time.perf_counter()
        self.commit_key: bytes | None = None  # in memory only, until the response is sent

    def request_ids(self, n: int) -> list[str]:
        """The engine request ids of an HTTP request with `n` prompts."""
        return [self.base_id] if n == 1 else [f"{self.base_id}-{i}" for i in range(n)]

    async def start(self, prompts: list[str | list[int]], params: SamplingParams, adapters, caller: Caller,
                    body: CompletionRequest | ChatCompletionRequest, inputs: list[Any]) -> None:
        """Queue one engine request per prompt; `inputs[i]` is what a commitment covers for prompt i
        (the client's own form of it: prompt string or ids, or the chat messages)."""
        st = self.st
        tenant, merge = caller.tenant, body.merge
        scope = st.tenancy.cache_scope(caller, body.cache_salt)
        if body.commit:
            if not st.receipts:
                raise InvalidRequest("commit needs receipts: this server runs without attribution")
            self.commit_key = commitment.new_key()
        try:
            for rid, p, inp in zip(self.request_ids(len(prompts)), prompts, inputs):
                spans = body.attribution is None or body.attribution.spans
                self.receipts[rid] = st.receipts.expect(rid, spans=spans) if st.receipts else None
                seal = commitment.sealer(self.commit_key, inp) if self.commit_key else None
                try:
                    await st.engine.add_request(rid, p, params, adapters=adapters, tenant=tenant, merge=merge,
                                                queue=self.queue, cache_scope=scope, seal=seal)
                except BaseException:
                    if st.receipts:
                        st.receipts.discard(rid)
                    del self.receipts[rid]
                    raise
                self.ids.append(rid)
        except BaseException:
            self.close()
            raise

    async def next(self, raw: Request | None = None) -> tuple[str, RequestOutput]:
        """The next output of any of the requests; raises on an engine error. With `raw`, polls
        for a client disconnect while waiting (non-streaming responses)."""
        while True:
            if raw is None:
                item = await self.queue.get()
            else:
                try:
                    item = await asyncio.wait_for(self.queue.get(), 1.0)
                except asyncio.TimeoutError:
                    if await raw.is_disconnected():
                        raise ClientDisconnected("client disconnected")
                    continue
            if isinstance(item, BaseException):
                raise item
            if item.error:  # the engine's own exception keeps its status and type (400 invalid_request_error)
                if isinstance(item.exc, OpenLoRAError):
                    raise item.exc
                raise RequestFailed(item.error, item.error_status or 500)
            self.latest[item.request_id] = item
            if item.finished:
                self.done.add(item.request_id)
            return item.request_id, item

    @property
    def finished(self) -> bool:
        return len(self.done) == len(self.ids)

    def close(self) -> None:
        """Abort whatever is unfinished and release the engine bookkeeping (idempotent)."""
        if self.closed:
            return
        self.closed = True
        for rid in self.ids:
            self.st.engine.request_done(rid, rid in self.done)

    async def wait_all(self, raw: Request) -> None:
        try:
            while not self.finished:
                await self.next(raw)
        finally:
            self.close()

    def observe(self, adapter_names: list[str]) -> tuple[int, int]:
        """Count tokens and latency once every request finished; returns (prompt, completion)."""
        prompt = sum(len(o.prompt_token_ids) for o in self.latest.values())
        completion = sum(len(c.token_ids) for o in self.latest.values() for c in o.outputs)
        m = self.st.metrics
        m.observe_tokens(adapter_names, prompt, completion)
        m.e2e.observe(time.perf_counter() - self.t0)
        return prompt, completion

    def cached(self) -> int:
        """Prompt tokens served from the prefix cache, over every request of the run."""
        return sum(o.num_cached_tokens for o in self.latest.values())

    async def attribution(self) -> dict | list | None:
        if not self.st.receipts:
            return None
        sums = [await self.st.receipt_summary(self.receipts.get(rid)) for rid in self.ids]
        if self.commit_key is not None:  # the only copy of the key leaves with the response
            key = "0x" + self.commit_key.hex()
            sums = [{**s, "commitment_scheme": commitment.SCHEME, "commitment_key": key} if s else s for s in sums]
        return sums[0] if len(sums) == 1 else sums


def _usage(prompt: int, completion: int, cached: int = 0) -> dict:
    u: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    if cached:
        u["prompt_tokens_details"] = {"cached_tokens": cached}
    return u


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class _SSEResponse(StreamingResponse):
    """StreamingResponse that always runs `on_close` (aborting unfinished requests) when the response
    ends, whether it completed, the client disconnected, or the server is shutting down."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def _stream(run: _Run, first: tuple[str, RequestOutput], emit: Callable[[str, RequestOutput, bool], list[dict]],
                  tail: Callable[[], Any]) -> AsyncIterator[str]:
    """Drive the run: `emit(rid, output, is_first)` turns each output into chunks; `tail()` gives
    the closing chunks (awaitable). Errors after the headers went out become an SSE error event."""
    metrics = run.st.metrics
    last = time.perf_counter()
    metrics.ttft.observe(last - run.t0)
    item = first
    firsts: set[str] = set()
    try:
        while True:
            rid, out = item
            for chunk in emit(rid, out, rid not in firsts):
                yield _sse(chunk)
            firsts.add(rid)
            if run.finished:
                break
            item = await run.next()
            now = time.perf_counter()
            metrics.itl.observe(now - last)
            last = now
        for chunk in await tail():
            yield _sse(chunk)
    except asyncio.CancelledError:
        raise
    except Exception as e:  # headers are gone: report in-band like OpenAI does
        status, body = from_exception(e)
        if status >= 500 and not isinstance(e, OpenLoRAError):
            log.exception("stream failed")
        yield _sse(body)
    finally:
        run.close()
    yield "data: [DONE]\n\n"


def _piece(tok: Any, context: list[int], tid: int) -> str:
    """The text token `tid` adds after `context` (a few previous tokens): decoding ids one by one
    would drop the spaces and merge rules tokenizers apply between tokens."""
    ctx = context[-4:]
    before = tok.decode(ctx) if ctx else ""
    return tok.decode(ctx + [tid])[len(before):]


def _positions(o: RequestOutput, c: CompletionOutput, start: int):
    """(context ids, chosen id, position logprobs) for output positions start.."""
    ids = o.prompt_token_ids + c.token_ids
    p0 = len(o.prompt_token_ids)
    for i, (tid, pl) in enumerate(zip(c.token_ids[start:], (c.logprobs or [])[start:]), start):
        yield ids[max(0, p0 + i - 4):p0 + i], tid, pl


# ---- /v1/completions -------------------------------------------------------------------------------
async def create_completion(body: CompletionRequest, raw: Request, st: ServerState) -> Any:
    caller, auth = st.who(raw, body.user)
    key_id = caller.key_id
    st.admit(caller)
    if body.suffix:
        raise InvalidRequest("suffix is not supported")
    if body.best_of not in (None, body.n):
        raise InvalidRequest("best_of must equal n (OpenLoRA returns every sample)")
    p = body.prompt
    if isinstance(p, str):
        prompts: list[str | list[int]] = [p]
    elif p and all(isinstance(x, int) for x in p):
        prompts = [list(p)]  # type: ignore[arg-type]
    else:
        prompts = list(p)  # type: ignore[arg-type]
    if not prompts:
        raise InvalidRequest("prompt must not be empty", )
    if len(prompts) > 64:
        raise InvalidRequest("at most 64 prompts per request")
    adapters, names = _adapters(st, body)
    _check_access(st, _names(body, names), caller)  # before anything about the adapter is revealed
    note_adapter_state(raw, st, names)
    params = _params(body, body.max_tokens, body.logprobs)
    run = _Run(st, f"cmpl-{uuid.uuid4().hex}")
    tok = st.tokenizer_for(names)  # the adapter's own when it adds tokens (openlora.lora.tokenizers)
    n_prompt = [len(p) if isinstance(p, list) else len(tok(p)["input_ids"]) for p in prompts]
    await _admit_payment(st, run, auth, key_id, names, n_prompt, params)
    await run.start(prompts, params, adapters, caller, body, inputs=prompts)
    n = body.n
    created = int(time.time())

    def index(rid: str, i: int) -> int:
        return run.ids.index(rid) * n + i

    def echo_text(o: RequestOutput) -> str:
        return (o.prompt if o.prompt is not None else tok.decode(o.prompt_token_ids)) if body.echo else ""

    if not body.stream:
        await run.wait_all(raw)
        pt, ct = run.observe(names)
        choices = []
        for rid in run.ids:
            o = run.latest[rid]
            for c in o.outputs:
                choices.append({"finish_reason": c.finish_reason, "index": index(rid, c.index),
                                "logprobs": (_completion_logprobs(tok, o, c, 0, len(echo_text(o)))
                                             if body.logprobs is not None else None),
                                "text": echo_text(o) + c.text})
        return JSONResponse({"id": run.base_id, "object": "text_completion", "created": created, "model": body.model,
                             "choices": choices, "system_fingerprint": None, "usage": _usage(pt, ct, run.cached()),
                             "attribution": await run.attribution()})

    first = await _first_output(run, raw)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    sent: dict[tuple[str, int], tuple[int, int]] = {}  # (rid, child) -> (text chars, logprob entries) sent

    def chunk(choices: list[dict]) -> dict:
        d = {"id": run.base_id, "object": "text_completion", "created": created, "model": body.model,
             "choices": choices, "system_fingerprint": None}
        if include_usage:
            d["usage"] = None
        return d

    def emit(rid: str, o: RequestOutput, is_first: bool) -> list[dict]:
        out = []
        for c in o.outputs:
            k = (rid, c.index)
            chars, nlp = sent.get(k, (0, 0))
            text = c.text[chars:]
            prefix = echo_text(o) if k not in sent else ""
            if not text and not prefix and c.finish_reason is None:
                continue
            lp = _completion_logprobs(tok, o, c, nlp, chars) if body.logprobs is not None else None
            sent[k] = (len(c.text), len(c.logprobs or ()))
            out.append(chunk([{"finish_reason": c.finish_reason, "index": index(rid, c.index), "logprobs": lp,
                               "text": prefix + text}]))
        return out

    async def tail() -> list[dict]:
        pt, ct = run.observe(names)
        att = await run.attribution()
        last = []
        if include_usage:
            last.append({**chunk([]), "usage": _usage(pt, ct, run.cached()), "attribution": att})
        elif att is not None:
            last.append({**chunk([]), "attribution": att})
        return last

    return _SSEResponse(_stream(run, first, emit, tail), run.close)


def _completion_logprobs(tok: Any, o: RequestOutput, c: CompletionOutput, start: int, offset: int) -> dict:
    """Legacy completions logprobs for output positions start.. (text offsets from `offset`)."""
    toks, lps, tops, offs = [], [], [], []
    pos = offset
    for ctx, tid, pl in _positions(o, c, start):
        s = _piece(tok, ctx, tid)
        toks.append(s)
        chosen = pl.get(tid)
        lps.append(chosen.logprob if chosen else None)
        tops.append({_piece(tok, ctx, t): lp.logprob for t, lp in pl.items()})
        offs.append(pos)
        pos += len(s)
    return {"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}


async def _first_output(run: _Run, raw: Request) -> tuple[str, RequestOutput]:
    try:
        return await run.next(raw)
    except BaseException:
        run.close()
        raise


async def _admit_payment(st: ServerState, run: "_Run", auth: Any, key_id: str | None, names: list[str],
                         prompt_lens: list[int], params: SamplingParams) -> None:
    """Chain mode: refuse (402/403) before any work a payer who cannot pay, and bind each engine
    request to the payer's authorization. API-key callers are the operator's own business."""
    if st.payments is None or (auth is None and key_id is not None):
        return
    max_len = st.engine.engine.config.scheduler.max_model_len
    fee = max(st.payments.max_fee(names, p, (params.max_tokens or max(1, max_len - p)) * params.n)
              for p in prompt_lens)
    if auth is None:
        if fee > 0:
            from openlora.chain.payments import PaymentRequired

            raise PaymentRequired("this node charges for requests: send a payer authorization token as the "
                                  "bearer (`openlora chain authorize`)")
        return
    rids = run.request_ids(len(prompt_lens))
    await asyncio.to_thread(st.payments.admit, rids, auth, names, fee)


def may_use(st: ServerState, adapter_id: str, caller: Caller) -> bool:
    """Whether the adapter's access list admits this caller (the admin key: always; no attribution:
    no access lists). A manifest that cannot be read admits nobody but the admin."""
    if st.attribution is None or caller.admin:
        return True
    payer = caller.payer or (None if caller.authenticated else caller.user)
    try:
        return st.attribution.permits(adapter_id, payer, caller.key_id)
    except OpenLoRAError:
        return False


def _check_access(st: ServerState, names: list[str], caller: Caller) -> None:
    """A private adapter the caller may not use gets the very 404 of an adapter that does not exist:
    its existence is not revealed, and the request never falls back to the base model."""
    for a in names:
        if not may_use(st, a, caller):
            raise not_registered(a)


def _names(body: CompletionRequest | ChatCompletionRequest, names: list[str]) -> list[str]:
    """Every adapter the request reads: `model`/`adapters`, plus a merge's sources."""
    srcs = (body.merge or {}).get("adapters")
    extra = [a.get("id") if isinstance(a, dict) else a for a in srcs] if isinstance(srcs, list) else []
    extra = [a for a in extra if isinstance(a, str)]  # malformed entries: MergeSpec.parse answers 400
    return [*names, *(a for a in extra if a not in names)]


# ---- /v1/chat/completions --------------------------------------------------------------------------
async def create_chat_completion(body: ChatCompletionRequest, raw: Request, st: ServerState) -> Any:
    caller, auth = st.who(raw, body.user)
    key_id = caller.key_id
    st.admit(caller)
    adapters, names = _adapters(st, body)
    _check_access(st, _names(body, names), caller)  # before anything about the adapter is revealed
    note_adapter_state(raw, st, names)
    msgs = [m.model_dump(exclude_none=True) for m in body.messages]
    tok = st.tokenizer_for(names)  # the adapter's own when it adds tokens (openlora.lora.tokenizers)
    try:
        text = apply_chat_template(tok, msgs, add_generation_prompt=body.add_generation_prompt,
                                   continue_final_message=body.continue_final_message)
    except InvalidRequest:
        raise
    except Exception as e:  # a template can raise anything on odd input: that is the input's fault
        raise InvalidRequest(f"chat template failed on these messages: {type(e).__name__}: {e}") from e
    # The template places the special tokens itself (as transformers' apply_chat_template(tokenize=True)).
    ids = tok(text, add_special_tokens=False)["input_ids"]
    top = body.top_logprobs if body.top_logprobs is not None else 0
    params = _params(body, body.max_completion_tokens or body.max_tokens, top if body.logprobs else None)
    run = _Run(st, f"chatcmpl-{uuid.uuid4().hex}")
    await _admit_payment(st, run, auth, key_id, names, [len(ids)], params)
    # The commitment covers the messages as sent (the fields the client set), not the rendered template.
    inputs = [body.model_dump(exclude_unset=True)["messages"]] if body.commit else [None]
    await run.start([ids], params, adapters, caller, body, inputs=inputs)
    created = int(time.time())

    if not body.stream:
        await run.wait_all(raw)
        pt, ct = run.observe(names)
        o = run.latest[run.ids[0]]
        choices = [{"finish_reason": c.finish_reason, "index": c.index,
                    "logprobs": {"content": _chat_logprobs(tok, o, c, 0, top)} if body.logprobs else None,
                    "message": {"content": c.text, "refusal": None, "role": "assistant"}} for c in o.outputs]
        return JSONResponse({"id": run.base_id, "object": "chat.completion", "created": created, "model": body.model,
                             "choices": choices, "system_fingerprint": None,
                             "usage": _usage(pt, ct, run.cached()), "attribution": await run.attribution()})

    first = await _first_output(run, raw)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    sent: dict[int, tuple[int, int]] = {}

    def chunk(choices: list[dict]) -> dict:
        d = {"id": run.base_id, "object": "chat.completion.chunk", "created": created, "model": body.model,
             "choices": choices, "system_fingerprint": None}
        if include_usage:
            d["usage"] = None
        return d

    def emit(rid: str, o: RequestOutput, is_first: bool) -> list[dict]:
        out = []
        if is_first:  # OpenAI opens every choice with the role
            out.append(chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                               "finish_reason": None} for c in o.outputs]))
        for c in o.outputs:
            chars, nlp = sent.get(c.index, (0, 0))
            if c.index in sent and sent[c.index][0] < 0:
                continue  # this choice already finished
            text = c.text[chars:]
            if text or (body.logprobs and len(c.token_ids) > nlp):
                lp = {"content": _chat_logprobs(tok, o, c, nlp, top)} if body.logprobs else None
                out.append(chunk([{"index": c.index, "delta": {"content": text}, "logprobs": lp,
                                   "finish_reason": None}]))
            sent[c.index] = (len(c.text), len(c.logprobs or ()))
            if c.finish_reason is not None:
                out.append(chunk([{"index": c.index, "delta": {}, "logprobs": None, "finish_reason": c.finish_reason}]))
                sent[c.index] = (-1, -1)
        return out

    async def tail() -> list[dict]:
        pt, ct = run.observe(names)
        att = await run.attribution()
        if include_usage:
            return [{**chunk([]), "usage": _usage(pt, ct, run.cached()), "attribution": att}]
        return [{**chunk([]), "attribution": att}] if att is not None else []

    return _SSEResponse(_stream(run, first, emit, tail), run.close)


def _chat_logprobs(tok: Any, o: RequestOutput, c: CompletionOutput, start: int, top: int) -> list[dict]:
    """Chat logprobs entries for output positions start.. (chosen token plus `top` alternatives)."""
    res = []
    for ctx, tid, pl in _positions(o, c, start):
        s = _piece(tok, ctx, tid)
        chosen = pl.get(tid)
        alts = sorted(pl.items(), key=lambda kv: kv[1].rank)[:top] if top else []
        res.append({"token": s, "logprob": chosen.logprob if chosen else -9999.0,
                    "bytes": list(s.encode()),
                    "top_logprobs": [{"token": (t := _piece(tok, ctx, i)), "logprob": lp.logprob,
                                      "bytes": list(t.encode())}
                                     for i, lp in alts]})
    return res
