"""An HTTP request carried across a Ray call: the ingress packs it into a dict, the replica runs it
through its in-process ASGI app and yields the response back as a stream of small tuples.

Wire shapes (picklable, no Starlette objects cross the hop):
- request: {"method", "path", "query_string": bytes, "headers": [(bytes, bytes)], "client": (host, port)
  or None, "scheme", "body": bytes}
- response items: ("start", status, [(bytes, bytes)]) once, then ("body", bytes) for each chunk.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

log = logging.getLogger("openlora.scale")

Item = tuple[Any, ...]


def pack_request(method: str, path: str, query_string: bytes, headers: list[tuple[bytes, bytes]],
                 client: tuple[str, int] | None, scheme: str, body: bytes) -> dict[str, Any]:
    """The request dict (module docstring)."""
    return {"method": method, "path": path, "query_string": query_string, "headers": headers,
            "client": client, "scheme": scheme, "body": body}


def _scope(req: dict[str, Any]) -> dict[str, Any]:
    # spec_version 2.3: Starlette's StreamingResponse then watches receive() for the disconnect,
    # which is how a cancelled Ray call stops the engine request (see run_asgi).
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": req["method"], "scheme": req["scheme"], "path": req["path"], "raw_path": req["path"].encode(),
            "root_path": "", "query_string": req["query_string"], "headers": req["headers"],
            "client": req["client"], "server": None, "state": {}}


async def run_asgi(app: Any, req: dict[str, Any], extra_headers: list[tuple[bytes, bytes]]) -> AsyncIterator[Item]:
    """Run one request through `app`, yielding the response items; `extra_headers` are added to the
    start. When the consumer stops early (client gone, Ray call cancelled), the app sees
    http.disconnect, so a streaming route aborts its engine request as on a single node."""
    out: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    body_sent = False

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": req["body"], "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(msg: dict[str, Any]) -> None:
        await out.put(msg)

    def done(t: asyncio.Future) -> None:  # the app returned (or raised): no more messages
        if not t.cancelled() and t.exception() is not None:
            log.error("request %s %s failed in the app", req["method"], req["path"], exc_info=t.exception())
        out.put_nowait(None)

    task = asyncio.ensure_future(app(_scope(req), receive, send))
    task.add_done_callback(done)
    try:
        while (msg := await out.get()) is not None:
            if msg["type"] == "http.response.start":
                yield ("start", msg["status"], [*msg.get("headers", []), *extra_headers])
            elif msg["type"] == "http.response.body":
                if msg.get("body"):
                    yield ("body", bytes(msg["body"]))
                if not msg.get("more_body", False):
                    break
    finally:
        gone.set()  # ends the app's disconnect watcher (and a stream still running)
