"""EngineReplica: one Ray Serve replica = the single-node app (openlora.server.app) and its engine.

In chain mode the payment gate, chain routes and explorer use proxies of the LedgerOwner's Settler and
Payments (remote_chain.py): the application is one node on chain.

Each request arrives from the ingress as a packed dict (relay.py) and runs through the same FastAPI app
`openlora serve` runs, so routes, streaming, errors, receipts and metrics are the single node's. The
response start gets `x-openlora-replica: <Serve replica id>`, which names the replica that answered.

Adapters are Serve multiplexed models: `deploy.replica_class` adds the `@serve.multiplexed` loader
(`adapter`), sized to the LoRA manager's host cache. Calling it tells Serve this replica holds the
adapter, so later requests for it come here. NOTE: the loader does not load any weights: the engine
loads an adapter when a request for it is admitted (after the app's access checks, so a caller who may
not use a private adapter cannot warm it), and the LoRA manager's own LRU decides residency.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from openlora.scale.relay import Item, run_asgi

log = logging.getLogger("openlora.scale")

REPLICA_HEADER = "x-openlora-replica"


class AdapterLease:
    """What the multiplexed loader returns for an adapter id: Serve keeps it in its per-replica LRU
    (and drops it, calling nothing of ours, when more ids than the cache holds came by)."""

    def __init__(self, adapter_id: str) -> None:
        self.adapter_id = adapter_id


class EngineReplica:
    """Deployment class (see the module docstring); `deploy.replica_class` subclasses it."""

    def __init__(self, opts: Any, owner: Any, node: str) -> None:
        from ray import serve

        from openlora.server.app import build_state, create_app

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

        def remote_attribution(_opts: Any, model_id: str, _base_hash: str) -> Any:
            from openlora.scale.remote_attribution import RemoteAttribution

            return RemoteAttribution(owner, node, model_id)

        def remote_chain(state: Any, o: Any, adapters: list) -> None:
            from openlora.scale.remote_chain import join_remote_chain

            join_remote_chain(owner, state, o, adapters)

        self.state = build_state(opts, attribution_factory=remote_attribution if opts.attribution else None,
                                 chain_joiner=remote_chain)
        self.app = create_app(self.state)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self._header = [(REPLICA_HEADER.encode(), self.replica_id.encode())]
        self._life: Any = None  # the app's lifespan, entered on the serving loop by the first request
        self._start_lock = asyncio.Lock()
        log.info("replica %s ready: model %r, %d adapters", self.replica_id, self.state.model_id,
                 len(self.state.lora.cards()))

    async def _started(self) -> None:
        """Start the engine (the app's lifespan) on the loop Serve runs requests on."""
        if self._life is None:
            async with self._start_lock:
                if self._life is None:
                    life = self.app.router.lifespan_context(self.app)
                    await life.__aenter__()
                    self._life = life

    async def _lease(self, adapter_id: str) -> AdapterLease:
        return AdapterLease(adapter_id)

    async def relay(self, req: dict[str, Any]) -> AsyncIterator[Item]:
        """Serve one packed request (relay.py), streaming the response items back to the ingress."""
        from ray import serve

        await self._started()
        adapter_id = serve.get_multiplexed_model_id()
        if adapter_id and self.state.lora.card(adapter_id) is not None:
            await self.adapter(adapter_id)  # registers the id as held here (affinity); unknown ids 404 below
        async for item in run_asgi(self.app, req, self._header):
            yield item

    async def adapter(self, adapter_id: str) -> AdapterLease:  # replaced by the multiplexed loader
        return await self._lease(adapter_id)

    def check_health(self) -> None:
        """Serve's periodic probe: a draining replica (shutting down) takes no new requests."""
        if self.state.engine.draining:
            raise RuntimeError("engine is shutting down")

    async def __del__(self) -> None:
        """Serve calls this when it stops the replica: drain (the lifespan's exit), as a single node does."""
        if self._life is not None:
            await self._life.__aexit__(None, None, None)
