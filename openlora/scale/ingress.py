"""The Ingress deployment: the HTTP entry of the Ray Serve application.

It reads the adapter id from the body (`adapters[0].id`, else `model` unless it names the base model)
and calls the engine replicas with it as the multiplexed model id, so Serve routes the request to a
replica that holds the adapter; base-model requests and the other routes go to any replica.

Replica failure (NOTE): when the replica dies before the response's first body byte (a non-streamed
answer is one body chunk, so that is the whole generation; a stream's first chunk is its first token),
the request is sent again to another replica, up to RETRIES times; no receipt exists for the lost try
(its usage event died with the replica), so the client is charged once. After the first byte a
stream ends with an OpenAI error event; a non-streamed body is cut. What was committed stays in the
ledger: the LedgerOwner is a separate process.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from openlora.scale.relay import Item, pack_request
from openlora.server.errors import error_body

log = logging.getLogger("openlora.scale")

RETRIES = 2  # extra tries on another replica when one dies before the first byte
GENERATION_ROUTES = ("/v1/completions", "/v1/chat/completions")


def adapter_of(path: str, body: bytes, base_model: str) -> str:
    """The multiplexed model id of a request: its (first) adapter, or "" (any replica)."""
    if path not in GENERATION_ROUTES:
        return ""
    try:
        d = json.loads(body)
    except ValueError:
        return ""  # the replica answers 400
    if not isinstance(d, dict):
        return ""
    ads = d.get("adapters")
    if isinstance(ads, list) and ads and isinstance(ads[0], dict) and isinstance(ads[0].get("id"), str):
        return ads[0]["id"]
    model = d.get("model")
    return model if isinstance(model, str) and model != base_model else ""


def _replica_gone() -> tuple[type[BaseException], ...]:
    from ray.exceptions import ActorUnavailableError, RayActorError

    return (RayActorError, ActorUnavailableError)


class Ingress:
    """Deployment class (wrapped by serve.deployment in deploy.py)."""

    def __init__(self, engines: Any, base_model: str) -> None:
        self.engines = engines  # DeploymentHandle of the EngineReplica deployment
        self.base_model = base_model

    async def __call__(self, request: Request) -> Response:
        body = await request.body()
        path = request.url.path
        if path.startswith("/v1/adapters") and request.method != "GET":
            # NOTE: a registration would reach one replica only; adapters are given at start instead.
            return JSONResponse(error_body("the adapter admin API is off on a Ray Serve deployment: register adapters "
                                           "with --adapter/--adapter-dir at start", 501), status_code=501)
        req = pack_request(request.method, path, request.url.query.encode(), list(request.headers.raw),
                           (request.client.host, request.client.port) if request.client else None,
                           request.url.scheme, body)
        handle = self.engines.options(multiplexed_model_id=adapter_of(path, body, self.base_model), stream=True)
        gone = _replica_gone()
        for attempt in range(RETRIES + 1):
            stream = handle.relay.remote(req)
            try:
                head = await _head(stream)
            except gone as e:
                log.warning("replica failed before the first byte of %s %s (try %d): %s", request.method, path,
                            attempt + 1, type(e).__name__)
                await asyncio.sleep(0.5 * (attempt + 1))  # Serve drops the dead replica from its routing
                continue
            return _respond(head, stream, retried=attempt)
        return JSONResponse(error_body(f"the replica serving this request failed {RETRIES + 1} times; Ray is "
                                       "replacing it: retry shortly", 503), status_code=503)


async def _head(stream: Any) -> list[Item]:
    """The response's start and its first body chunk (or the end), read before anything is sent."""
    items: list[Item] = []
    async for item in stream:
        items.append(item)
        if item[0] == "body":
            break
    if not items or items[0][0] != "start":
        raise RuntimeError("the replica ended the response before its start")
    return items


def _respond(head: list[Item], stream: Any, retried: int) -> Response:
    """A StreamingResponse replaying the replica's status, headers and body."""
    _, status, headers = head[0]
    sse = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers)

    async def body() -> AsyncIterator[bytes]:
        for item in head[1:]:
            yield item[1]
        try:
            async for item in stream:
                yield item[1]
        except _replica_gone() as e:
            log.warning("replica failed mid-response: %s", type(e).__name__)
            if not sse:
                raise  # a cut body: the client sees a short read
            err = error_body("the replica serving this stream failed; the answer is incomplete", 503)
            yield f"data: {json.dumps(err)}\n\n".encode()

    resp = StreamingResponse(body(), status_code=status)
    extra = [(b"x-openlora-retried", str(retried).encode())] if retried else []
    resp.raw_headers = [*headers, *extra]
    return resp
