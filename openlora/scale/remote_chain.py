"""A replica's chain side (`--chain` with `--ray-replicas`): thin stand-ins for the single node's
Settler and Payments whose state lives on the LedgerOwner actor (owner.py), which holds the node key.

What stays on the replica: checking a payer's token (a signature check against the node address,
chain id and Settlement contract: no key, no state) and the request's maximum fee (the replica's own
manifests). What goes to the owner: admitting a request (access, escrow and cap against every
replica's reservations), releasing it, adapter manifest checks, closing and settling an epoch, and
the settlement list. The replica's Chain has no account, so `send` fails: replicas never sign.
"""

from __future__ import annotations

from typing import Any

from openlora.chain.client import Chain, Deployment
from openlora.chain.payments import Payments
from openlora.scale.remote_attribution import owner_call


class NodeChain(Chain):
    """The deployment's contracts for reads, named by the owner's node address, with no key."""

    def __init__(self, deployment: Deployment, node: str) -> None:
        super().__init__(deployment)
        self._node = node

    @property
    def address(self) -> str:
        return self._node


class RemoteSettler:
    """What the routes use of a Settler (chain, price_version, close_and_settle, settlements, stop)."""

    def __init__(self, owner: Any, info: dict[str, Any]) -> None:
        self.owner = owner
        self.chain = NodeChain(info["deployment"], info["node"])
        self.price_version: int = info["price_version"]

    def close_and_settle(self) -> dict[str, Any]:
        return owner_call(self.owner.close_and_settle.remote())

    def settlements(self) -> list[dict[str, Any]]:
        return owner_call(self.owner.settlements.remote())

    def stop(self) -> None:
        """The owner's Settler keeps running until the application stops (deploy.stop)."""


class RemotePayments(Payments):
    """Payments whose admit/release run on the owner; `authorize` and `max_fee` are the base class's,
    run here (see the module docstring), so the chain-view cache of the base class stays unused."""

    def __init__(self, owner: Any, settler: RemoteSettler, attribution: Any) -> None:
        super().__init__(settler.chain, settler, attribution)  # type: ignore[arg-type]
        self.owner = owner

    def admit(self, request_ids: list[str], auth: Any, adapter_names: list[str], max_fee: int) -> None:
        owner_call(self.owner.admit.remote(request_ids, auth, adapter_names, max_fee))

    def release(self, request_id: str) -> None:
        # Fire and forget (called on the receipt worker, or on the event loop for a rejected request):
        # it cannot overtake the request's admit, which returned before the request was queued.
        self.owner.release.remote(request_id)


def join_remote_chain(owner: Any, state: Any, opts: Any, _adapters: list[tuple[str, str]]) -> None:
    """build_state's chain_joiner on a replica: the owner joined the chain (one node, one key); wire the
    routes to it as app._join_chain wires a single node's own Settler and Payments."""
    info = owner_call(owner.chain_info.remote())
    att = state.attribution
    att.chain_id = info["deployment"].chain_id
    att.manifest_check = lambda name, m: owner_call(owner.check_manifest.remote(name, m))
    state.settler = RemoteSettler(owner, info)
    state.payments = RemotePayments(owner, state.settler, att)
    state.receipts.on_recorded.append(state.payments.release)
    state.chain_deployment = opts.chain
