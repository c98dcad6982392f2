"""The paid-request gate of a node on chain: accept a payer's authorization token as the bearer,
refuse with 402 a payer whose escrow or cap cannot cover the request's maximum fee, with 403 a
payer that a private adapter does not allow, and bind each admitted request to its authorization.

What may still be charged to a payer = escrow not announced for withdrawal (a chain view cached
for `ttl` seconds) - fees of its receipts not yet settled - maximum fees of its requests in
flight. The same for the authorization's cap, with the contract's `spent` in place of escrow.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from web3.exceptions import Web3Exception

from openlora.attribution.ids import name_id_bytes
from openlora.chain.anvil import ChainError
from openlora.chain.authorization import Authorization, parse_token
from openlora.chain.client import Chain
from openlora.chain.settler import Settler
from openlora.errors import AccessDenied, OpenLoRAError


class PaymentRequired(OpenLoRAError):
    """The payer's escrow or authorization cap cannot cover the request's maximum fee (402)."""

    status = 402
    code = "payment_required"


class Payments:
    """See the module docstring. Thread-safe."""

    def __init__(self, chain: Chain, settler: Settler, attribution: Any, ttl: float = 2.0) -> None:
        self.chain = chain
        self.settler = settler
        self.attribution = attribution
        self.ttl = ttl
        self._cache: dict[tuple, tuple[float, Any]] = {}
        self._inflight: dict[str, tuple[str, str, int]] = {}  # request id -> (payer, digest, max fee)
        self._lock = threading.Lock()

    def authorize(self, token: str) -> Authorization:
        """Parse and check a bearer token for this node (401 when bad)."""
        return parse_token(token, node=self.chain.address, chain_id=self.chain.d.chain_id,
                           contract=self.chain.d.address("Settlement"))

    def _cached(self, key: tuple, fetch) -> Any:
        """A chain view, fresh for `ttl` seconds. When the chain cannot be reached, the last value
        seen is used (serving goes on); with none, the request fails alone with 503."""
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and now - hit[0] < self.ttl:
            return hit[1]
        try:
            v = fetch()
        except (OSError, Web3Exception) as e:
            if hit is not None:
                return hit[1]
            raise ChainError(f"chain unreachable at {self.chain.d.rpc}: {e}") from None
        self._cache[key] = (now, v)
        return v

    def max_fee(self, adapter_names: list[str], prompt_tokens: int, max_completion: int) -> int:
        """An upper bound of the fee: composition weights sum to one, so no request costs more
        than at the dearest of its adapters' prices."""
        ms = [self.attribution.manifest(a) for a in adapter_names] or [self.attribution.manifest_for_base()]
        pp = max(m.price_per_1k_prompt_tokens for m in ms)
        pc = max(m.price_per_1k_completion_tokens for m in ms)
        return (prompt_tokens * pp + max_completion * pc + 999) // 1000

    def _unsettled(self, payer: str, digest: str) -> tuple[int, int]:
        """Fees of this payer's (and this authorization's) receipts not yet settled on chain."""
        last = self._cached(("last_seq",), lambda: self.chain.last_seq(self.chain.address))
        rows = self.settler.ledger.read_conn().execute(
            "SELECT b.digest, json_extract(r.body, '$.fee') FROM receipts r JOIN chain_bindings b "
            "ON b.request_id = r.request_id JOIN chain_auths a ON a.digest = b.digest "
            "WHERE r.seq > ? AND a.payer = ?", (last, payer)).fetchall()
        return sum(int(f) for _, f in rows), sum(int(f) for d, f in rows if d == digest)

    def admit(self, request_ids: list[str], auth: Authorization, adapter_names: list[str], max_fee: int) -> None:
        """Check access and funds for a request, then bind its engine requests to `auth`.
        Raises AccessDenied (403) or PaymentRequired (402) before any work is done."""
        adapters = self.chain.c["AdapterRegistry"].functions
        for a in adapter_names:
            ok = self._cached(("can_use", a, auth.payer),
                              lambda a=a: adapters.get(name_id_bytes(a)).call()[0] == "0x" + "00" * 20
                              or adapters.can_use(name_id_bytes(a), auth.payer).call())
            if not ok:
                raise AccessDenied(f"access to adapter {a!r} is restricted by its owner: {auth.payer} is not on "
                                   "its on-chain allow-list")
        digest = "0x" + auth.digest().hex()
        available = self._cached(("available", auth.payer), lambda: self.chain.available(auth.payer))
        spent = self._cached(("spent", digest), lambda: self.chain.spent(auth.digest()))
        with self._lock:
            due_payer, due_auth = self._unsettled(auth.payer, digest)
            for p, d, f in self._inflight.values():
                due_payer += f if p == auth.payer else 0
                due_auth += f if d == digest else 0
            total = max_fee * len(request_ids)
            if total > available - due_payer:
                raise PaymentRequired(
                    f"escrow of {auth.payer} cannot cover this request: up to {total} needed, "
                    f"{max(0, available - due_payer)} available (deposit more OPEN)")
            if total > auth.cap - spent - due_auth:
                raise PaymentRequired(
                    f"authorization cap reached: up to {total} needed, {max(0, auth.cap - spent - due_auth)} left "
                    "of the cap (sign a new authorization)")
            for rid in request_ids:
                self._inflight[rid] = (auth.payer, digest, max_fee)
        for rid in request_ids:
            self.settler.bind(rid, auth)

    def release(self, request_id: str) -> None:
        """The request's receipt is in the ledger (or it never ran): drop its reservation."""
        with self._lock:
            self._inflight.pop(request_id, None)
