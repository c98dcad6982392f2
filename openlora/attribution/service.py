"""AttributionService: usage events in, signed receipts out, durably chained in the ledger.

The server calls `check_access` before admitting a request and `record(event)` when the engine
emits the request's UsageEvent; the response carries `receipt.summary()` =
`{receipt_id, fee, splits}`. The engine never imports this module.

Durability and speed (NOTE): `record` returns only after the receipt's transaction has committed
with `synchronous=FULL`, so a receipt whose summary was sent to a client is never lost. To keep
the fsync off the critical path when many worker threads finish at once, commits are *grouped*:
each caller builds and signs its receipt under a short lock (the chain needs an order), queues it,
then the first caller to reach the flush lock commits every queued receipt in one transaction; the
others find theirs already committed. A single thread pays exactly one commit per receipt; N
concurrent threads share one fsync. Epochs are closed in the flushing thread once `epoch_size`
receipts are waiting (O(epoch_size) hashing, ~30 ms per 1000 receipts).

If a commit fails (disk full, I/O error), every receipt of that batch and every receipt already
built on top of it fails with LedgerError; the in-memory chain head is reset from the database,
so later receipts chain correctly.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Union

from openlora.attribution.epochs import EpochManager
from openlora.attribution.identity import NodeIdentity
from openlora.attribution.ledger import Ledger, LedgerError
from openlora.attribution.manifest import DefaultPolicy, Manifest, load_manifest, parse_manifest
from openlora.attribution.receipts import Receipt, build_receipt
from openlora.errors import AccessDenied, InvalidRequest, OpenLoRAError
from openlora.outputs import UsageEvent

log = logging.getLogger(__name__)

ManifestLike = Union[Manifest, dict, str, Path, None]
ManifestLookup = Union[Mapping[str, ManifestLike], Callable[[str], ManifestLike], None]


class ReceiptNotFound(OpenLoRAError, KeyError):
    """No receipt with that receipt id or request id."""

    status = 404
    code = "not_found_error"

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "receipt not found"


class AttributionService:
    """Thread-safe front door of the attribution layer (see the module docstring)."""

    def __init__(
        self, ledger_path: str | Path, identity: NodeIdentity, manifests: ManifestLookup = None,
        base_model_id: str = "", base_model_hash: str = "",
        default_policy: DefaultPolicy | None = None, chain_id: int = 0, epoch_size: int = 1000,
    ) -> None:
        self.identity = identity
        self.base_model_id = base_model_id
        self.base_model_hash = base_model_hash
        self.default_policy = default_policy or DefaultPolicy()
        self.operator = self.default_policy.operator or identity.address
        self.chain_id = chain_id
        self.ledger = Ledger(ledger_path)
        self.epochs = EpochManager(self.ledger, identity, epoch_size)
        self._lookup = manifests
        self._base_manifest = self.default_policy.manifest_for(self.operator, base_model_id)
        self._manifests: dict[str, Manifest] = {}  # registered or looked-up, validated
        self._pinned: dict[tuple[str, str], Manifest] = {}  # (adapter id, content hash) of a replaced version
        # Called with (adapter id, manifest or None) before an adapter's terms are used; chain mode
        # checks them against the on-chain registry (raises InvalidRequest naming the adapter).
        self.manifest_check: Callable[[str, Manifest | None], None] | None = None
        self._checked: set[str] = set()  # adapters whose terms manifest_check accepted
        self._lock = threading.Lock()  # guards the chain head, queue, in-flight map, manifests, _epoch_done
        self._flush_lock = threading.Lock()  # one committer at a time; guards _committed
        self._seq, self._head = self.ledger.head()
        last_epoch = self.epochs.last()
        self._epoch_done = last_epoch.last_seq if last_epoch else 0
        self._ticket = 0  # last ticket handed out
        self._committed = 0  # every ticket <= this has been committed (or failed)
        self._queue: list[tuple[int, Receipt]] = []
        self._inflight: dict[str, tuple[int, Receipt]] = {}
        self._failed: dict[int, BaseException] = {}
        # Span-level attribution (span_service.SpanAttributor), set by the server once it has the
        # model's tokenizer; None: every dataset keeps its fixed contributor weights.
        self.spans: Any = None

    # -------------------------------------------------------------------------------- manifests

    def register_manifest(self, adapter_id: str, manifest: ManifestLike) -> Manifest | None:
        """Register (or replace) an adapter's manifest: a Manifest, a dict, or an adapter folder
        holding `attribution.json` (a folder without one registers nothing: default policy)."""
        m = self.check_manifest(adapter_id, manifest)
        if m is not None:
            self.set_manifest(adapter_id, m)
        return m

    def check_manifest(self, adapter_id: str, manifest: ManifestLike) -> Manifest | None:
        """Validate a manifest for `adapter_id` (and, in chain mode, check it against the registry)
        without using it yet: an adapter update checks its new terms before its new files load."""
        m = self._parse(manifest)
        if self.manifest_check is not None:
            self.manifest_check(adapter_id, m)
            with self._lock:
                self._checked.add(adapter_id)
        if m is not None:
            self._check_base(adapter_id, m)
        return m

    def set_manifest(self, adapter_id: str, m: Manifest) -> None:
        """Price `adapter_id` by `m` (from check_manifest) from now on."""
        with self._lock:
            self._manifests[adapter_id] = m
        if self.spans is not None:
            self.spans.prepare(m)  # its datanets' indexes build in the background

    def pin_version(self, adapter_id: str, content_hash: str, manifest: Manifest | None = None) -> None:
        """Keep `manifest` (default: the one now in effect for `adapter_id`) for the content
        `content_hash`: called when an adapter is updated in place, before its new manifest is set, so
        the receipts of requests that still run on the old version carry the old version's terms
        (version string, prices, splits)."""
        if content_hash:
            m = manifest if manifest is not None else self.manifest(adapter_id)
            with self._lock:
                self._pinned[(adapter_id, content_hash)] = m

    def _served_manifest(self, adapter_id: str, content_hash: str) -> Manifest:
        """The manifest of the adapter version that served: pinned to its content, else the id's."""
        with self._lock:
            m = self._pinned.get((adapter_id, content_hash))
        return m if m is not None else self.manifest(adapter_id)

    def manifest(self, adapter_id: str) -> Manifest:
        """The manifest that prices `adapter_id` (the default policy's if it has none)."""
        with self._lock:
            m = self._manifests.get(adapter_id)
        if m is not None:
            return m
        raw: ManifestLike = None
        if callable(self._lookup):
            raw = self._lookup(adapter_id)
        elif self._lookup is not None:
            raw = self._lookup.get(adapter_id)
        m = self._parse(raw)
        if self.manifest_check is not None:
            with self._lock:
                checked = adapter_id in self._checked
            if not checked:
                self.manifest_check(adapter_id, m)  # e.g. an adapter from the hub that is on chain
                with self._lock:
                    self._checked.add(adapter_id)
        if m is None:
            return self._base_manifest
        self._check_base(adapter_id, m)
        with self._lock:
            self._manifests.setdefault(adapter_id, m)
        if self.spans is not None:
            self.spans.prepare(m)
        return m

    def manifest_for_base(self) -> Manifest:
        """The default policy's manifest (prices base-only requests)."""
        return self._base_manifest

    @staticmethod
    def _parse(raw: ManifestLike) -> Manifest | None:
        if raw is None:
            return None
        if isinstance(raw, (str, Path)):
            return load_manifest(raw)
        return parse_manifest(raw)

    def _check_base(self, adapter_id: str, m: Manifest) -> None:
        if self.base_model_id and m.base_model != self.base_model_id:
            raise InvalidRequest(
                f"base_model: adapter {adapter_id!r} was trained for {m.base_model!r}, "
                f"this node serves {self.base_model_id!r}")

    def permits(self, adapter_id: str, payer: str | None, api_key_id: str | None = None) -> bool:
        """Whether the manifest's access policy admits the payer or the API-key id."""
        return self.manifest(adapter_id).access.permits(payer, api_key_id)

    def check_access(self, adapter_id: str, payer: str | None, api_key_id: str | None = None) -> None:
        """Raise AccessDenied (403) unless the manifest's access policy admits the payer or key."""
        if not self.permits(adapter_id, payer, api_key_id):
            raise AccessDenied(f"access to adapter {adapter_id!r} is restricted by its owner")

    # ---------------------------------------------------------------------------------- record

    def record(self, event: UsageEvent) -> Receipt:
        """Turn a usage event into a signed receipt and commit it; idempotent on request_id.

        Returns only after the receipt is durable. Raises InvalidRequest for a malformed event
        and LedgerError if the commit failed.
        """
        return self.record_attributed(event)[0]

    def record_attributed(self, event: UsageEvent, spans: bool = True) -> tuple[Receipt, Any]:
        """`record`, with span-level attribution of the answer when its adapters' datanets are indexed
        (and `spans`: the request did not opt out). Also returns the span_service.SpanOutcome (its
        `spans` go to the caller only), or None when no span attribution ran."""
        manifests = [self._served_manifest(a.adapter_id, a.content_hash) for a in event.adapters]
        outcome = None
        if spans and self.spans is not None and event.adapters and event.status == "finished":
            # Off the lock: matching is the slow part, and it reads nothing the lock guards.
            outcome = self.spans.attribute([a.adapter_id for a in event.adapters], manifests,
                                           [list(t) for t in event.output_token_ids])
        return self.commit(event, manifests, outcome), outcome

    def commit(self, event: UsageEvent, manifests: list[Manifest], outcome: Any = None) -> Receipt:
        """Sign the receipt of `event` priced by `manifests` (one per adapter, as `record_attributed`
        chose them) and the span outcome, chain it and commit it; idempotent on request_id (a request
        already recorded returns its stored receipt). The one step that must run where the ledger and
        the key are: openlora.scale sends it to the process that owns them."""
        with self._lock:
            hit = self._inflight.get(event.request_id)
            if hit is not None:
                ticket, receipt = hit
            else:
                existing = self.ledger.get_by_request_id(event.request_id)
                if existing is not None:
                    return existing
                receipt = build_receipt(
                    event, seq=self._seq + 1, node=self.identity.address, operator=self.operator,
                    manifests=manifests, base_manifest=self._base_manifest, prev_hash=self._head,
                    sign=self.identity.sign, base_model=self.base_model_id,
                    base_model_hash=self.base_model_hash, chain_id=self.chain_id,
                    span_method=outcome.method if outcome else "", data_weights=outcome.weights if outcome else None,
                    credits=outcome.credits if outcome else (),
                )
                self._seq, self._head = receipt.seq, receipt.receipt_hash
                self._ticket += 1
                ticket = self._ticket
                self._queue.append((ticket, receipt))
                self._inflight[event.request_id] = (ticket, receipt)
        self._flush(ticket)
        return receipt

    def _flush(self, ticket: int) -> None:
        """Make sure `ticket` is committed: commit the whole queue if nobody has yet."""
        with self._flush_lock:
            if ticket > self._committed:
                with self._lock:
                    batch, self._queue = self._queue, []
                assert batch, "a queued ticket above the committed mark implies a non-empty queue"
                try:
                    self.ledger.append_many([r for _, r in batch])
                except BaseException as e:
                    self._fail(batch, e)
                else:
                    with self._lock:
                        for _, r in batch:
                            self._inflight.pop(r.request_id, None)
                        due = batch[-1][1].seq - self._epoch_done >= self.epochs.epoch_size
                    self._committed = batch[-1][0]
                    if due:
                        self._close_epochs()
        with self._lock:
            err = self._failed.get(ticket)
        if err is not None:
            raise LedgerError(f"receipt not recorded: {err}") from err

    def _close_epochs(self) -> None:
        """Close full epochs; a failure here is logged, never charged to the committed request."""
        try:
            closed = self.epochs.maybe_close()
        except Exception:  # the receipts are safe; the next flush retries
            log.exception("closing an attribution epoch failed")
            return
        if closed:
            self._epoch_done_at_least(closed[-1].last_seq)

    def close_epoch(self) -> Any:
        """Close an epoch now over every committed receipt not yet in one (None if there is none)."""
        ep = self.epochs.close()
        if ep is not None:
            self._epoch_done_at_least(ep.last_seq)
        return ep

    def _epoch_done_at_least(self, seq: int) -> None:
        """Raise the last receipt seq known to be in a closed epoch (flushes and the close route race)."""
        with self._lock:
            self._epoch_done = max(self._epoch_done, seq)

    def _fail(self, batch: list[tuple[int, Receipt]], err: BaseException) -> None:
        """A commit failed: fail its receipts and all queued ones built on them; reset the head."""
        with self._lock:
            doomed = batch + self._queue
            self._queue = []
            for t, r in doomed:
                self._failed[t] = err
                self._inflight.pop(r.request_id, None)
            self._committed = max(t for t, _ in doomed)
            self._seq, self._head = self.ledger.head()

    # ----------------------------------------------------------------------------------- reads

    def get_receipt(self, receipt_or_request_id: str) -> dict[str, Any]:
        """The public JSON form of a receipt; raises ReceiptNotFound (404)."""
        r = self.ledger.get(receipt_or_request_id)
        if r is None:
            raise ReceiptNotFound(f"no receipt {receipt_or_request_id!r}")
        return r.to_dict()

    def close(self) -> None:
        """Close the ledger (pending receipts were committed by their record() calls)."""
        self.ledger.close()
