"""Read-only routes behind the Open Chat explorer: a receipt's inclusion proof and settlement state,
the node's epochs and their settlement transactions, and (with `--chain`) the registry's node map.

Receipts are found by id only (a 32-byte hash): there is no listing of other callers' receipts. The
browser keeps the ids of its own answers and asks for them one by one.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI, Request

from openlora.attribution.epochs import verify_proof
from openlora.errors import AdapterNotFound, InvalidRequest
from openlora.server.state import ServerState
from openlora.server.tenancy import Caller


def install_explorer_routes(app: FastAPI, state: ServerState, chain_deployment: str | None) -> None:
    """Add GET /v1/receipts/{id}/proof, /v1/epochs and (chain mode) /v1/nodes to `app`."""

    def attribution():
        if state.attribution is None:
            raise AdapterNotFound("attribution is disabled on this server (--no-attribution)")
        return state.attribution

    @app.get("/v1/receipts/{receipt_id}/proof")
    async def receipt_proof(receipt_id: str, raw: Request) -> dict:
        """The receipt's EIP-712 message (to verify its signature in the browser), its epoch, Merkle
        proof and settlement: state is "open" (no epoch yet), "closed", "settled" or "skipped"."""
        caller, _ = state.who(raw)
        return await asyncio.to_thread(_proof, state, caller, receipt_id)

    @app.get("/v1/epochs")
    async def epochs(raw: Request, limit: int = 50) -> dict:
        """Closed epochs, newest first, each with its settlement transactions (chain mode)."""
        state.key_id(raw)
        if not 1 <= limit <= 1000:
            raise InvalidRequest("limit must be between 1 and 1000")
        return {"object": "list", "data": await asyncio.to_thread(_epochs, state, attribution(), limit)}

    if chain_deployment is not None:
        @app.get("/v1/nodes")
        async def nodes() -> dict:
            """The NodeRegistry's active nodes (the network map), as the gateway lists them."""
            from openlora.network.fleet import nodes_from_chain

            views = await asyncio.to_thread(nodes_from_chain, chain_deployment)
            rows = []
            for v in views:
                d = v.to_dict()
                d["healthy"] = None  # a node does not probe its peers; the gateway does
                rows.append(d)
            return {"object": "list", "data": rows}


def _hexify(obj: Any) -> Any:
    """bytes as 0x-hex, recursively: the typed data's bytes32 fields, as JSON and ethers expect them."""
    if isinstance(obj, bytes):
        return "0x" + obj.hex()
    if isinstance(obj, dict):
        return {k: _hexify(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_hexify(v) for v in obj]
    return obj


def _settlements(state: ServerState) -> list[dict[str, Any]]:
    return state.settler.settlements() if state.settler is not None else []


def _proof(state: ServerState, caller: Caller, receipt_id: str) -> dict[str, Any]:
    from openlora.attribution.receipts import Receipt

    d = state.receipt(caller, receipt_id)  # 404 when unknown or another tenant's
    att = state.attribution
    r = Receipt.from_dict(d, receipt_hash=d["receipt_id"])
    out: dict[str, Any] = {"receipt_id": r.receipt_hash, "request_id": r.request_id, "seq": r.seq,
                           "node": r.node, "typed_data": _hexify(r.typed_data()), "signature": r.signature,
                           "epoch": None, "state": "open", "settlement": None}
    try:
        p = att.epochs.prove(r.request_id)
    except InvalidRequest:  # not in a closed epoch yet
        return out
    out.update(epoch=p["epoch"], index=p["index"], proof=p["proof"], root=p["root"], state="closed",
               proof_verifies=verify_proof(r.receipt_hash, p["proof"], p["root"]))
    for s in _settlements(state):
        if s["first_seq"] <= r.seq <= s["last_seq"]:
            reason = s["skipped"].get(str(r.seq))
            out["state"] = "skipped" if reason else "settled"
            out["settlement"] = {"epoch": s["epoch"], "tx": s["tx"], "skipped": reason}
    return out


def _epochs(state: ServerState, att: Any, limit: int) -> list[dict[str, Any]]:
    settlements = _settlements(state)
    rows = []
    for ep in reversed(att.epochs.epochs()[-limit:]):
        rows.append({"epoch": ep.epoch, "first_seq": ep.first_seq, "last_seq": ep.last_seq,
                     "receipts": ep.last_seq - ep.first_seq + 1, "merkle_root": ep.merkle_root,
                     # base units, as strings (JSON numbers lose digits)
                     "totals": {a: str(v) for a, v in ep.totals.items()},
                     "closed_at_ms": ep.closed_at_ms, "signature": ep.signature,
                     "settlements": [{k: (str(v) if k == "total" else v) for k, v in s.items()}
                                     for s in settlements if s["epoch"] == ep.epoch]})
    return rows
