"""A replica's AttributionService: manifests, access checks and span matching run here (as on a single
node); signing and the ledger are the LedgerOwner actor's (owner.py), reached through Ray calls."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from openlora.attribution.service import AttributionService
from openlora.outputs import UsageEvent

OWNER_TIMEOUT_S = 60.0  # a commit waits for one fsync on the owner; the receipt hook waits 30 s itself


def owner_call(ref: Any) -> Any:
    """ray.get with the owner's own exception re-raised (ReceiptNotFound stays a 404, LedgerError a
    LedgerError), rather than Ray's wrapper with the remote traceback in its message."""
    import ray
    from ray.exceptions import RayTaskError

    try:
        return ray.get(ref, timeout=OWNER_TIMEOUT_S)
    except RayTaskError as e:
        if isinstance(e.cause, Exception):
            raise e.cause from None
        raise


class _NodeAddress:
    """The owner's identity as a replica knows it: the address only (replicas never sign)."""

    def __init__(self, address: str) -> None:
        self.address = address

    def sign(self, _msg: Any) -> bytes:
        raise AssertionError("replicas do not sign: the LedgerOwner does")


class _OwnerPart:
    """`att.ledger` / `att.epochs` on a replica: each read method call goes to the owner."""

    def __init__(self, owner: Any, part: str) -> None:
        self._owner, self._part = owner, part

    def __getattr__(self, method: str) -> Any:
        return lambda *args: owner_call(self._owner.read.remote(self._part, method, *args))

    def __len__(self) -> int:
        return owner_call(self._owner.read.remote(self._part, "__len__"))


class RemoteAttribution(AttributionService):
    """AttributionService whose commit, receipt reads and epoch closes run on the LedgerOwner."""

    def __init__(self, owner: Any, node: str, base_model_id: str) -> None:
        # The base class wants a ledger to start from; this replica-local one is closed at once and never
        # written (every write is `commit`, below).
        self._scratch = Path(tempfile.mkdtemp(prefix="openlora-replica-"))
        super().__init__(self._scratch / "unused.sqlite", _NodeAddress(node), base_model_id=base_model_id)
        self.ledger.close()
        self.owner = owner
        self.ledger = _OwnerPart(owner, "ledger")
        self.epochs = _OwnerPart(owner, "epochs")

    def commit(self, event: UsageEvent, manifests: list, outcome: Any = None) -> Any:
        return owner_call(self.owner.commit.remote(event, manifests, outcome))

    def get_receipt(self, receipt_or_request_id: str) -> dict[str, Any]:
        return owner_call(self.owner.get_receipt.remote(receipt_or_request_id))

    def close_epoch(self) -> Any:
        return owner_call(self.owner.close_epoch.remote())

    def close(self) -> None:
        shutil.rmtree(self._scratch, ignore_errors=True)
