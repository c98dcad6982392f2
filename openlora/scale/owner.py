"""The ledger's one owner: a Ray actor holding the node key and the SQLite ledger.

NOTE: receipts form one hash chain (seq, prev_hash) signed by one key, so exactly one process may sign
and append. Replicas price a finished request themselves (manifests and span matching are theirs,
AttributionService.record_attributed) and send the result here; `commit` signs, chains and commits it
(group commit across the actor's threads, as on a single node). The actor is pinned to the node the
`openlora serve` driver runs on, so the ledger file is where the operator put it; Ray restarts it if it
dies, and a retried `commit` is idempotent on request_id (the ledger returns the stored receipt).
"""

from __future__ import annotations

from typing import Any

from openlora.outputs import UsageEvent

# Reads the replicas' explorer and receipt routes may forward (owner.read): never a write.
READS = {"ledger": frozenset({"head", "get", "get_by_request_id", "__len__"}),
         "epochs": frozenset({"epochs", "last", "prove"})}


class LedgerOwner:
    """Wrapped by ray.remote in deploy.py (threaded actor, restarted when it dies)."""

    def __init__(self, opts: Any, model_id: str) -> None:
        import logging

        from openlora.server.app import open_attribution

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        # NOTE: an actor whose constructor raises is restarted forever (max_restarts=-1): keep the error
        # (a bad keystore password, an unwritable ledger) and raise it from `node()`, which deploy calls first.
        self.error: Exception | None = None
        try:  # the base model hash comes with every event (UsageEvent.base_model_hash): "" here
            self.att = open_attribution(opts, model_id, "")
        except Exception as e:
            self.error = e

    def node(self) -> str:
        """The node address every receipt is signed by (the application's one identity)."""
        if self.error is not None:
            raise self.error
        return self.att.identity.address

    def commit(self, event: UsageEvent, manifests: list, outcome: Any = None) -> Any:
        """AttributionService.commit: sign, chain and durably append one receipt."""
        return self.att.commit(event, manifests, outcome)

    def get_receipt(self, key: str) -> dict:
        return self.att.get_receipt(key)

    def close_epoch(self) -> Any:
        return self.att.close_epoch()

    def read(self, part: str, method: str, *args: Any) -> Any:
        """A read of the ledger or the epochs (allow-listed in READS)."""
        if method not in READS.get(part, ()):
            raise PermissionError(f"{part}.{method} is not a read the replicas may forward")
        return getattr(getattr(self.att, part), method)(*args)

    def close(self) -> None:
        if self.error is None:
            self.att.close()
