"""The ledger's one owner: a Ray actor holding the node key and the SQLite ledger.

NOTE: receipts form one hash chain (seq, prev_hash) signed by one key, so exactly one process may sign
and append. Replicas price a finished request themselves (manifests and span matching are theirs,
AttributionService.record_attributed) and send the result here; `commit` signs, chains and commits it
(group commit across the actor's threads, as on a single node). The actor is pinned to the node the
`openlora serve` driver runs on, so the ledger file is where the operator put it; Ray restarts it if it
dies, and a retried `commit` is idempotent on request_id (the ledger returns the stored receipt).

Chain mode (`--chain`): the application is one node on chain, so the owner joins it as a single node
does (app.join_chain: registers the node with the public URL, signs and sends the settle transactions,
runs the Settler) and keeps the Payments bookkeeping. NOTE: a payer's in-flight reservations must be
counted in one place, or two replicas could each admit up to the whole escrow; replicas reach them
through the methods below (remote_chain.py), none of which signs what a replica hands it.
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
        self.settler: Any = None  # chain mode: Settler and Payments (app.join_chain)
        self.payments: Any = None
        try:  # the base model hash comes with every event (UsageEvent.base_model_hash): "" here
            self.att = open_attribution(opts, model_id, "")
            if opts.chain:
                self._join(opts, model_id)
        except Exception as e:
            self.error = e

    def _join(self, opts: Any, model_id: str) -> None:
        from openlora.server.app import join_chain, served_adapters

        # The registry lists the base model by its hash, as a single node does (cached per file by the
        # replicas' engines on this machine; a folder checkpoint only, else the model id).
        self.att.base_model_hash = _model_hash(opts.model)
        self.settler, self.payments = join_chain(self.att, opts, model_id, served_adapters(opts))

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

    # ---- chain mode (remote_chain.py): what the replicas' payment gate, chain routes and explorer need

    def chain_info(self) -> dict[str, Any]:
        """The deployment (contracts, RPC), the node address and its base price version."""
        return {"deployment": self.settler.chain.d, "node": self.settler.chain.address,
                "price_version": self.settler.price_version}

    def check_manifest(self, name: str, manifest: Any) -> None:
        """An adapter's terms against the on-chain registry (raises InvalidRequest)."""
        self.att.manifest_check(name, manifest)

    def admit(self, request_ids: list[str], auth: Any, adapter_names: list[str], max_fee: int) -> None:
        """Payments.admit: access and funds, counting every replica's requests in flight (402/403)."""
        self.payments.admit(request_ids, auth, adapter_names, max_fee)

    def release(self, request_id: str) -> None:
        self.payments.release(request_id)

    def close_and_settle(self) -> dict[str, Any]:
        return self.settler.close_and_settle()

    def settlements(self) -> list[dict[str, Any]]:
        return self.settler.settlements()

    def close(self) -> None:
        if self.settler is not None:  # unsettled receipts stay in the ledger for the next start
            self.settler.stop()
        if self.error is None:
            self.att.close()


def _model_hash(model: str | None) -> str:
    from pathlib import Path

    from openlora.engine.model_hash import base_model_hash

    if model is None:
        from openlora.demo import ensure_demo_model

        model = str(ensure_demo_model())
    return base_model_hash(model) if Path(model).is_dir() else ""
