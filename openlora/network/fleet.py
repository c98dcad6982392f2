"""The nodes the gateway routes to: found in a static list or the chain's NodeRegistry, polled for
their state (`GET /v1/state`, every `poll_s`, at most 5 s apart), and checked by their receipts.

Trust: a node's address is what the registry (or `--node URL@ADDRESS`) says; a node that was given
none is known by the address it reports until a receipt proves otherwise. After a response, the
gateway fetches its receipt from the node (in the background, off the request's path) and drops
the node for good when the signature does not recover the expected address.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Any

import httpx

from openlora.network.view import NodeView

log = logging.getLogger("openlora.gateway")


def parse_node_spec(spec: str) -> NodeView:
    """`URL` or `URL@0xADDRESS` (the address the node's receipts must be signed with)."""
    url, _, addr = spec.partition("@")
    url = url.rstrip("/").removesuffix("/v1")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"node {spec!r}: expected http(s)://HOST:PORT[@0xADDRESS]")
    if addr:
        from eth_utils import is_address, to_checksum_address

        if not is_address(addr):
            raise ValueError(f"node {spec!r}: {addr!r} is not an address")
        return NodeView(url=url, address=to_checksum_address(addr), pinned=True)
    return NodeView(url=url)


def nodes_from_chain(deployment: str) -> list[NodeView]:
    """Active nodes of the NodeRegistry (blocking web3 calls: run it in a thread)."""
    from openlora.chain.client import Chain, Deployment

    out = []
    for n in Chain(Deployment.load(deployment)).nodes():
        if not n["active"]:
            continue
        reg = n["region"]
        out.append(NodeView(url=n["endpoint"].rstrip("/"), address=n["address"], pinned=True,
                            region=reg["code"], location=(reg["lat"], reg["lon"]) if "lat" in reg else None,
                            hardware=n["hardware"], price=n["price"]))
    return out


class Fleet:
    """All known nodes, their polling and their receipt checks."""

    def __init__(self, nodes: list[NodeView], *, chain: str | None = None, poll_s: float = 1.0,
                 refresh_s: float = 30.0, timeout_s: float = 2.0) -> None:
        self.nodes: dict[str, NodeView] = {n.url: n for n in nodes}
        self.chain = chain
        self.poll_s = min(poll_s, 5.0)
        self.refresh_s = refresh_s
        self.timeout_s = timeout_s
        self.client: httpx.AsyncClient | None = None
        self.receipt_node: OrderedDict[str, str] = OrderedDict()  # receipt id -> node url (ids only)
        self._tasks: list[asyncio.Task] = []
        self._bg: set[asyncio.Task] = set()

    # ---------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout_s))
        if self.chain:
            await self.refresh()
        await self.poll_all()
        self._tasks = [asyncio.create_task(self._poll_loop())]
        if self.chain:
            self._tasks.append(asyncio.create_task(self._refresh_loop()))

    async def stop(self) -> None:
        for t in [*self._tasks, *self._bg]:
            t.cancel()
        if self.client is not None:
            await self.client.aclose()

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            await self.poll_all()

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
            except Exception as e:  # the chain being down must not stop routing to known nodes
                log.warning("reading the node registry failed: %s", e)

    async def refresh(self) -> None:
        """Merge the registry's active nodes in (declared facts updated, own counters kept)."""
        fresh = await asyncio.to_thread(nodes_from_chain, self.chain)
        for n in fresh:
            cur = self.nodes.get(n.url)
            if cur is None:
                self.nodes[n.url] = n
                log.info("node %s (%s) joined from the registry", n.url, n.address)
            else:
                cur.address, cur.pinned, cur.region, cur.location = n.address, True, n.region, n.location
                cur.hardware, cur.price = n.hardware, n.price

    # ------------------------------------------------------------------------------ polling

    async def poll_all(self) -> None:
        await asyncio.gather(*(self.poll(n) for n in list(self.nodes.values())))

    async def poll(self, n: NodeView) -> None:
        try:
            r = await self.client.get(f"{n.url}/v1/state", timeout=self.timeout_s)
            r.raise_for_status()
            s = r.json()
        except (httpx.HTTPError, ValueError):
            if n.healthy:
                log.warning("node %s failed its health check", n.url)
            n.fail()
            return
        n.model, n.model_hash = s.get("model"), s.get("model_hash")
        n.adapters = dict(s.get("adapters") or {})
        n.free_slots, n.running, n.waiting = s.get("free_slots", 0), s.get("running", 0), s.get("waiting", 0)
        n.max_num_seqs, n.kv_usage = max(1, s.get("max_num_seqs", 1)), float(s.get("kv_usage", 0.0))
        n.scraped_at = time.time()
        if not n.region:  # a static node: what it declares (a registry node's come from the chain)
            n.region = s.get("region") or ""
            n.location = tuple(s["location"]) if s.get("location") else None
            n.hardware, n.price = s.get("hardware") or {}, s.get("price") or {}
        if n.address is None and s.get("node"):
            n.address = s["node"]  # unpinned: the reported address, until a receipt disagrees
        if not n.healthy:
            log.info("node %s is healthy", n.url)
        n.ok(None)

    # ----------------------------------------------------------------------------- receipts

    def remember_receipt(self, receipt_id: str, n: NodeView, headers: dict[str, str]) -> None:
        """Map the receipt to its node and verify it in the background."""
        self.receipt_node[receipt_id] = n.url
        while len(self.receipt_node) > 100_000:
            self.receipt_node.popitem(last=False)
        t = asyncio.create_task(self.verify_receipt(n, receipt_id, headers))
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)

    async def verify_receipt(self, n: NodeView, receipt_id: str, headers: dict[str, str]) -> str | None:
        """Fetch the receipt from the node and check its signature against the node's address.
        Returns the reason the node was dropped, or None."""
        from openlora.attribution.receipts import Receipt, verify_receipt

        try:
            r = await self.client.get(f"{n.url}/v1/receipts/{receipt_id}", headers=headers)
            if r.status_code != 200:
                return None  # not ours to judge (auth, attribution off); the next one will tell
            receipt = Receipt.from_dict({k: v for k, v in r.json().items() if k != "receipt_id"})
        except (httpx.HTTPError, ValueError, TypeError, KeyError):
            return None
        reason = verify_receipt(receipt, expected_node=n.address) if n.address else None
        if reason is None and receipt.receipt_hash != receipt_id:
            reason = f"receipt hash {receipt.receipt_hash} differs from the id {receipt_id} it was served under"
        if reason is not None:
            n.dropped = f"receipt {receipt_id} does not verify: {reason}"
            log.error("dropping node %s: %s", n.url, n.dropped)
        return reason

    def snapshot(self) -> list[dict[str, Any]]:
        return [n.to_dict() for n in self.nodes.values()]
