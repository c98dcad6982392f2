"""`openlora gateway`: an OpenAI-compatible front that proxies each request to one node.

Per request: parse only `model`, `adapters` and `stream` from the body; rank the nodes
(policy.py); send the bytes unchanged to the primary, with the caller's bearer token or API key.
Connection errors, timeouts and 5xx answers before the first byte go to the next node (at most 2
retries). A stream cut midway is continued on another node (resume.py) or, where it cannot be,
ends with an OpenAI-style error event. The gateway stores no prompt and no output: a stream's text
lives only while the stream does; it keeps receipt ids (to route `GET /v1/receipts/{id}`) and counters.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from openlora.network.fleet import Fleet
from openlora.network.policy import Policy, Prefs
from openlora.network.resume import EventSplitter, StreamText, is_role_only, resume_body
from openlora.network.view import NodeView
from openlora.web import mount_web

log = logging.getLogger("openlora.gateway")
NODE_HEADER = "x-openlora-node"
PASS_HEADERS = ("authorization", "x-api-key", "content-type", "accept")
MAX_TRIES = 3  # the primary and at most two fallbacks
_TIER_RANK = {"resident": 0, "loading": 1, "host": 2, "disk": 3, "registered": 4}
_RECEIPT = re.compile(rb'"receipt_id"\s*:\s*"(0x[0-9a-fA-F]{64})"')


def _error(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": code, "code": code, "param": None}}, status)


class GatewayMetrics:
    """The gateway's own decisions: the main signal (scraped metrics lag)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("openlora_gateway_requests", "Proxied requests by node and outcome",
                                ["node", "outcome"], registry=r)
        self.retries = Counter("openlora_gateway_retries", "Requests sent to a fallback node", registry=r)
        self.resumed = Counter("openlora_gateway_resumed", "Tries to continue a stream whose node died "
                               "mid-way on another node", registry=r)
        self.decision = Histogram("openlora_gateway_decision_seconds", "Time to rank the nodes", registry=r,
                                  buckets=(1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, 1e-2))


def create_gateway(fleet: Fleet, policy: Policy | None = None) -> FastAPI:
    """The gateway app over `fleet`, ranking with `policy` (ours by default)."""
    policy = policy or Policy()
    metrics = GatewayMetrics()
    prefixes = PrefixMap()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await fleet.start()
        yield
        await fleet.stop()

    app = FastAPI(title="OpenLoRA gateway", lifespan=lifespan)
    app.state.fleet = fleet

    async def proxy(raw: Request, path: str) -> Response:
        body = await raw.body()
        try:
            req = json.loads(body)
            model = req.get("model")
            if req.get("adapters"):
                model = req["adapters"][0].get("id")  # route by the first adapter of a composition
            stream = bool(req.get("stream"))
        except (ValueError, AttributeError, TypeError, IndexError):
            return _error(400, "request body is not a JSON object", "invalid_request_error")
        pkey = prefixes.key(req)
        prefs = Prefs(region=raw.headers.get("x-openlora-region"),
                      max_price=int(raw.headers["x-openlora-max-price"])
                      if raw.headers.get("x-openlora-max-price", "").isdigit() else None,
                      prefix_node=prefixes.get(pkey))
        t0 = time.perf_counter()
        ranked = policy.rank(list(fleet.nodes.values()), model, prefs)
        metrics.decision.observe(time.perf_counter() - t0)
        if not ranked:
            return _error(503, f"no healthy node serves {model!r} now", "service_unavailable")
        headers = {k: v for k, v in raw.headers.items() if k.lower() in PASS_HEADERS}
        ctx = _StreamCtx(req, path, model, prefs, headers) if stream else None
        last: Response | None = None
        for attempt, node in enumerate(ranked[:MAX_TRIES]):
            if attempt:
                metrics.retries.inc()
            res, retry = await _send(node, path, body, headers, ctx, model)
            if not retry:
                if res is not None and res.status_code == 200:
                    prefixes.put(pkey, node.url)
                return res
            last = res or last
        return last or _error(502, "every node tried failed before answering", "bad_gateway")

    async def _send(node: NodeView, path: str, body: bytes, headers: dict[str, str],
                    ctx: "_StreamCtx | None", model: str | None,
                    continuation: bool = False) -> tuple[Response | None, bool]:
        """One try: (response, whether to try the next node). Retried: no connection, a timeout,
        429 and 5xx answers, a stream that breaks before its first byte. `ctx` is set for streams."""
        node.inflight += 1
        done = False
        t0 = time.monotonic()
        try:
            up = await fleet.client.send(
                fleet.client.build_request("POST", f"{node.url}{path}", content=body, headers=headers,
                                           timeout=httpx.Timeout(600.0, connect=fleet.timeout_s)),
                stream=True)
        except httpx.HTTPError as e:
            node.inflight -= 1
            node.fail()
            metrics.requests.labels(node.id, "connect_error").inc()
            log.warning("node %s failed before answering (%s): trying the next", node.url, type(e).__name__)
            return None, True
        try:
            if up.status_code >= 500 or up.status_code == 429:
                content = await up.aread()
                if up.status_code >= 500 and up.status_code != 503:  # 503/429: busy, not broken
                    node.fail()
                metrics.requests.labels(node.id, f"http_{up.status_code}").inc()
                return _passthrough(up, content, node), True
            if ctx is None or up.status_code != 200:
                content = await up.aread()
                node.ok(time.monotonic() - t0)
                node.served += 1
                if up.status_code == 200:
                    _now_resident(node, model)
                metrics.requests.labels(node.id, "ok" if up.status_code < 400 else f"http_{up.status_code}").inc()
                m = _RECEIPT.search(content) if up.status_code == 200 else None
                if m:
                    fleet.remember_receipt(m.group(1).decode(), node, headers)
                return _passthrough(up, content, node), False
            chunks = up.aiter_raw()
            try:
                first = await chunks.__anext__()
            except (httpx.HTTPError, StopAsyncIteration):
                node.fail()
                metrics.requests.labels(node.id, "stream_error").inc()
                return None, True
            node.ok(time.monotonic() - t0)
            node.served += 1
            _now_resident(node, model)
            metrics.requests.labels(node.id, "ok").inc()
            done = True  # the stream's generator owns the connection and the in-flight count now
            return StreamingResponse(_relay(node, up, first, chunks, ctx, continuation and ctx.chat),
                                     status_code=200,
                                     media_type=up.headers.get("content-type", "text/event-stream"),
                                     headers=_out_headers(up, node)), False
        finally:
            if not done:
                node.inflight -= 1
                await up.aclose()

    async def _relay(node: NodeView, up: httpx.Response, first: bytes, chunks: AsyncIterator[bytes],
                     ctx: "_StreamCtx", skip_role: bool = False) -> AsyncIterator[bytes]:
        """Relay whole events from `node`; if it dies before the answer is complete, continue on
        another node (resume.py), else end with an OpenAI-style error event: never a hang."""
        split = EventSplitter()
        receipt = None
        try:
            pending = split.feed(first)
            async for c in _chain(pending, chunks, split):
                m = _RECEIPT.search(c)
                receipt = m.group(1).decode() if m else receipt
                if skip_role and is_role_only(c):
                    skip_role = False
                    continue
                ctx.text.see(c)
                yield c
        except httpx.HTTPError as e:
            node.fail()
            metrics.requests.labels(node.id, "died_mid_stream").inc()
            resumed = False
            if not ctx.text.finished:  # ctx.text holds every node's part: a continuation can resume too
                async for c in _resume(node, ctx):
                    resumed = True
                    yield c
            if not resumed:
                msg = {"error": {"message": f"node {node.id} failed mid-stream: {type(e).__name__}",
                                 "type": "server_error", "code": "upstream_error", "param": None}}
                yield f"data: {json.dumps(msg)}\n\n".encode()
        finally:
            node.inflight -= 1
            await up.aclose()
            if receipt:
                fleet.remember_receipt(receipt, node, ctx.headers)

    async def _resume(dead: NodeView, ctx: "_StreamCtx") -> AsyncIterator[bytes]:
        """The rest of the answer from the best other node that opens a stream (at most two tried)."""
        body = resume_body(ctx.req, ctx.chat, ctx.text.text, ctx.text.events)
        if body is None:
            return
        data = json.dumps(body).encode()
        ranked = [n for n in policy.rank(list(fleet.nodes.values()), ctx.model, ctx.prefs) if n is not dead]
        for node in ranked[:MAX_TRIES - 1]:
            metrics.resumed.inc()
            res, retry = await _send(node, ctx.path, data, ctx.headers, ctx, ctx.model, continuation=True)
            if retry or res is None:
                continue
            if not isinstance(res, StreamingResponse):  # an error answer (4xx): nothing to continue with
                return
            log.warning("resumed a stream cut by node %s on node %s", dead.url, node.url)
            async for c in res.body_iterator:
                yield c
            return

    async def _chain(pending: list[bytes], chunks: AsyncIterator[bytes],
                     split: EventSplitter) -> AsyncIterator[bytes]:
        for c in pending:
            yield c
        async for raw in chunks:
            for c in split.feed(raw):
                yield c
        if rest := split.rest():
            yield rest

    @app.post("/v1/completions")
    async def completions(raw: Request) -> Response:
        return await proxy(raw, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat(raw: Request) -> Response:
        return await proxy(raw, "/v1/chat/completions")

    @app.get("/v1/models")
    async def models() -> dict:
        """The union of the nodes' models; an adapter's `state` is its best tier on any usable node."""
        ids: dict[str, dict] = {}
        for n in fleet.nodes.values():
            if not n.usable():
                continue
            if n.model:
                ids.setdefault(n.model, {"id": n.model, "object": "model", "owned_by": "openlora", "nodes": 0})
                ids[n.model]["nodes"] += 1
            for a, tier in n.adapters.items():
                card = ids.setdefault(a, {"id": a, "object": "model", "owned_by": "openlora", "parent": n.model,
                                          "nodes": 0, "state": tier})
                card["nodes"] += 1
                if _TIER_RANK.get(tier, 9) < _TIER_RANK.get(card["state"], 9):
                    card["state"] = tier
        return {"object": "list", "data": list(ids.values())}

    @app.get("/v1/nodes")
    async def nodes() -> dict:
        return {"object": "list", "data": fleet.snapshot()}

    async def _receipt_get(receipt_id: str, suffix: str, raw: Request) -> Response:
        """GET a receipt route from the node that signed it (remembered), else ask every usable node."""
        headers = {k: v for k, v in raw.headers.items() if k.lower() in PASS_HEADERS}
        url = fleet.receipt_node.get(receipt_id)
        order = [fleet.nodes[url]] if url in fleet.nodes else [n for n in fleet.nodes.values() if n.usable()]
        for n in order:
            try:
                r = await fleet.client.get(f"{n.url}/v1/receipts/{receipt_id}{suffix}", headers=headers)
            except httpx.HTTPError:
                continue
            if r.status_code != 404:
                return _passthrough(r, r.content, n)
        return _error(404, f"no receipt {receipt_id!r}", "not_found_error")

    @app.get("/v1/epochs")
    async def epochs(raw: Request) -> dict:
        """Every usable node's closed epochs (each row names its node), newest first."""
        headers = {k: v for k, v in raw.headers.items() if k.lower() in PASS_HEADERS}
        rows = []
        for n in [n for n in fleet.nodes.values() if n.usable()]:
            try:
                r = await fleet.client.get(f"{n.url}/v1/epochs", headers=headers)
                data = r.json().get("data", []) if r.status_code == 200 else []
            except (httpx.HTTPError, ValueError):
                continue
            rows += [{**e, "node": n.id} for e in data if isinstance(e, dict)]
        rows.sort(key=lambda e: e.get("closed_at_ms") or 0, reverse=True)
        return {"object": "list", "data": rows}

    @app.get("/v1/receipts/{receipt_id}")
    async def receipt(receipt_id: str, raw: Request) -> Response:
        return await _receipt_get(receipt_id, "", raw)

    @app.get("/v1/receipts/{receipt_id}/proof")
    async def receipt_proof(receipt_id: str, raw: Request) -> Response:
        return await _receipt_get(receipt_id, "/proof", raw)

    @app.get("/health")
    async def health() -> Response:
        ok = any(n.usable() for n in fleet.nodes.values())
        return Response("ok" if ok else "no healthy node", status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prom() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    mount_web(app, network_map=True)

    return app


@dataclass
class _StreamCtx:
    """What a stream's relay needs to continue it elsewhere (kept only while it runs)."""

    req: dict
    path: str
    model: str | None
    prefs: Prefs
    headers: dict[str, str]
    chat: bool = field(init=False)
    text: StreamText = field(init=False)

    def __post_init__(self) -> None:
        self.chat = self.path.endswith("/chat/completions")
        self.text = StreamText(self.chat)


class PrefixMap:
    """Which node last served a prompt prefix, by a salted hash of its first 512 bytes (the
    gateway keeps no prompt; the salt is random per process). Bounded LRU."""

    def __init__(self, size: int = 50_000) -> None:
        self.salt = os.urandom(16)
        self.size = size
        self.map: OrderedDict[bytes, str] = OrderedDict()

    def key(self, req: dict) -> bytes | None:
        head = req.get("messages") if "messages" in req else req.get("prompt")
        if head is None:
            return None
        raw = json.dumps([req.get("model"), head], separators=(",", ":"))[:512].encode()
        return hashlib.blake2b(raw, key=self.salt, digest_size=16).digest()

    def get(self, key: bytes | None) -> str | None:
        return self.map.get(key) if key is not None else None

    def put(self, key: bytes | None, url: str) -> None:
        if key is None:
            return
        self.map[key] = url
        self.map.move_to_end(key)
        while len(self.map) > self.size:
            self.map.popitem(last=False)


def _now_resident(node: NodeView, model: str | None) -> None:
    """The node just served `model`: it is resident there now. Noted at once, because the next poll
    may be a second away and the next request for it may not."""
    if model and model != node.model and model in node.adapters:
        node.adapters[model] = "resident"


def _out_headers(up: httpx.Response, node: NodeView) -> dict[str, str]:
    h = {NODE_HEADER: node.id}
    for k in ("x-openlora-adapter-state", "x-request-id"):
        if k in up.headers:
            h[k] = up.headers[k]
    return h


def _passthrough(up: httpx.Response, content: bytes, node: NodeView) -> Response:
    return Response(content, status_code=up.status_code, headers=_out_headers(up, node),
                    media_type=up.headers.get("content-type", "application/json"))
