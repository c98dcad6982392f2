"""What the routes share: the async engine, adapter manager, attribution, keys and metrics."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from threading import Lock
from typing import Any

from fastapi import Request

from openlora.engine.async_engine import AsyncEngine
from openlora.errors import OpenLoRAError
from openlora.outputs import UsageEvent
from openlora.server.errors import Unauthorized
from openlora.server.limits import TenantLimits
from openlora.server.metrics import Metrics
from openlora.server.tenancy import Caller, Tenancy

log = logging.getLogger("openlora.server")


class ReceiptHook:
    """Engine usage listener: records each UsageEvent through the AttributionService on a worker
    thread (the ledger commit blocks on disk) and resolves the request's future with the receipt
    summary, so the route can put `{receipt_id, fee, splits}` in its response."""

    def __init__(self, service: Any, metrics: Metrics, workers: int = 4) -> None:
        self.service = service
        self.metrics = metrics
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="attribution")
        self._pending: dict[str, Future] = {}
        self._no_spans: set[str] = set()  # requests that opted out of span-level attribution
        self._lock = Lock()
        self.on_recorded: list = []  # callbacks(request_id) once a receipt is in the ledger (or failed)

    def expect(self, request_id: str, spans: bool = True) -> Future:
        """Called before the request is queued: the future its summary will arrive on. `spans`: False
        when the request opted out of span-level attribution (its datasets keep their fixed weights)."""
        fut: Future = Future()
        with self._lock:
            self._pending[request_id] = fut
            if not spans:
                self._no_spans.add(request_id)
        return fut

    def discard(self, request_id: str) -> None:
        """The request was never queued (rejected): no event will come."""
        with self._lock:
            self._pending.pop(request_id, None)
            self._no_spans.discard(request_id)
        for cb in self.on_recorded:
            cb(request_id)

    def __call__(self, event: UsageEvent) -> None:  # engine thread: must not block
        with self._lock:
            fut = self._pending.pop(event.request_id, None)
            spans = event.request_id not in self._no_spans
            self._no_spans.discard(event.request_id)
        self.pool.submit(self._record, event, fut, spans)

    def _record(self, event: UsageEvent, fut: Future | None, spans: bool = True) -> None:
        try:
            receipt, outcome = self.service.record_attributed(event, spans=spans)
            summary = receipt.summary()
            if outcome is not None:  # token offsets of the reproduced spans: for this caller only
                summary["spans"] = outcome.spans
                self.metrics.span_seconds.observe(outcome.seconds)
        except Exception as e:  # the request already ran; report and keep going
            log.exception("recording the receipt of %s failed", event.request_id)
            if fut is not None:
                fut.set_exception(e)
            return
        finally:
            for cb in self.on_recorded:
                cb(event.request_id)
        self.metrics.observe_receipt([a.adapter_id for a in event.adapters], int(summary["fee"]))
        if fut is not None:
            fut.set_result(summary)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True)


@dataclass
class ServerState:
    """Everything the routes need, built by `openlora.server.app.build_state`."""

    engine: AsyncEngine
    lora: Any  # LoRAManager
    model_id: str
    metrics: Metrics
    attribution: Any = None  # AttributionService, or None with --no-attribution
    payments: Any = None  # chain.payments.Payments in chain mode (serve --chain), else None
    settler: Any = None  # chain.settler.Settler in chain mode
    declared: dict = field(default_factory=dict)  # region, location, hardware, price: what /v1/state declares
    chain_deployment: str | None = None  # the deployment file in chain mode (the map reads its registry)
    receipts: ReceiptHook | None = None
    api_keys: dict[str, str] = field(default_factory=dict)  # key -> key id
    admin_key: str | None = None
    tenancy: Tenancy = field(default_factory=Tenancy)
    limits: TenantLimits = field(default_factory=TenantLimits)
    adapter_kinds: tuple[str, ...] = ("local", "hub", "s3")  # source kinds the admin API may register
    adapter_roots: list[Path] = field(default_factory=list)  # where run-time local registrations may point
    grace_period: float = 30.0
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def tokenizer(self):
        return self.engine.engine.tokenizer

    def tokenizer_for(self, adapter_ids: list[str]):
        """The tokenizer a request for these adapters is encoded with (an adapter that adds tokens
        brings its own: openlora.lora.tokenizers)."""
        return self.engine.engine.tokenizer_for(adapter_ids)[0]

    def key_id(self, request: Request) -> str | None:
        """The caller's API-key id: "admin" for the admin key, None when the server runs without keys.
        Raises 401."""
        tok = _bearer(request)
        if tok is not None and self.admin_key and hmac.compare_digest(tok.encode(), self.admin_key.encode()):
            return "admin"
        if not self.api_keys:
            return None
        if tok is not None:
            for key, kid in self.api_keys.items():
                if hmac.compare_digest(tok.encode(), key.encode()):
                    return kid
        raise Unauthorized("invalid or missing API key (send 'Authorization: Bearer <key>')")

    def caller(self, request: Request) -> tuple[str | None, Any]:
        """(API-key id, payer authorization). In chain mode a payer's authorization token is a
        valid bearer on its own (401 if it is malformed, forged or for another node)."""
        if self.payments is not None:
            from openlora.chain.authorization import is_token

            tok = _bearer(request)
            if is_token(tok):
                return None, self.payments.authorize(tok)
        return self.key_id(request), None

    def who(self, request: Request, user: str | None = None) -> tuple[Caller, Any]:
        """(the authenticated Caller, payer authorization or None); raises 401 as caller() does."""
        key_id, auth = self.caller(request)
        return Caller(key_id=key_id, payer=auth.payer if auth else None, user=user,
                      authenticated=bool(self.api_keys) or self.payments is not None), auth

    def viewer(self, request: Request) -> Caller:
        """who(), for the public read-only routes (/v1/state, /metrics): a missing or bad credential
        makes an anonymous caller, who sees only public adapters, rather than a 401."""
        try:
            return self.who(request)[0]
        except OpenLoRAError:
            return Caller(authenticated=True)

    def admit(self, caller: Caller) -> None:
        """The tenant's rate limit and token quota (429 with Retry-After); the admin key is exempt."""
        if self.limits.active and not caller.admin:
            self.limits.admit(caller.tenant)

    def receipt(self, caller: Caller, receipt_id: str) -> dict:
        """A receipt for its payer (or the admin); anyone else gets the 404 of an unknown id."""
        from openlora.attribution.service import ReceiptNotFound

        if self.attribution is None:
            raise ReceiptNotFound("attribution is disabled on this server (--no-attribution)")
        d = self.attribution.get_receipt(receipt_id)
        if not self.tenancy.owns(caller, d["payer"]):
            raise ReceiptNotFound(f"no receipt {receipt_id!r}")
        return d

    def require_admin(self, request: Request) -> None:
        """Admin routes: 401 unless the admin key is presented (also 401 when none is configured)."""
        tok = _bearer(request)
        if not self.admin_key:
            raise Unauthorized("the admin API is disabled: start the server with --admin-key")
        if tok is None or not hmac.compare_digest(tok.encode(), self.admin_key.encode()):
            raise Unauthorized("invalid or missing admin key")

    async def receipt_summary(self, fut: Future | None, timeout: float = 30.0) -> dict | None:
        """Wait for a request's receipt summary; None (logged) if attribution failed."""
        if fut is None:
            return None
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), timeout)
        except Exception as e:
            log.warning("no receipt for a request: %s", e)
            return None


def _bearer(request: Request) -> str | None:
    h = request.headers.get("authorization", "")
    if h[:7].lower() == "bearer ":
        return h[7:].strip()
    return request.headers.get("x-api-key")
