"""Chain-mode routes for the Open Chat wallet: what the page needs to act as a payer.

The page signs everything itself (its own key, or an injected EIP-1193 wallet); the node never sees a
payer key. Because the page talks to its own origin only, the node relays JSON-RPC to its chain, for
a fixed list of methods: reads, gas estimates and already-signed transactions, nothing that would
use a key held by the RPC node. On a local chain it also hands out test OPEN (the faucet).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from openlora.errors import InvalidRequest
from openlora.server.state import ServerState

RPC_METHODS = frozenset({
    "eth_chainId", "net_version", "eth_blockNumber", "eth_getBlockByNumber", "eth_getBalance", "eth_getCode",
    "eth_call", "eth_estimateGas", "eth_gasPrice", "eth_maxPriorityFeePerGas", "eth_feeHistory",
    "eth_getTransactionCount", "eth_sendRawTransaction", "eth_getTransactionReceipt", "eth_getTransactionByHash",
    "eth_getLogs",
})
MAX_RPC_BYTES = 256 * 1024
MAX_BATCH = 20
FAUCET_OPEN = 10 * 10**18  # test OPEN per faucet call (local chains only)


class FaucetRequest(BaseModel):
    address: str = Field(min_length=42, max_length=42)


def _rpc_error(id_: Any, code: int, message: str) -> dict:
    return {"jsonrpc": "2.0", "id": id_, "error": {"code": code, "message": message}}


def install_chain_routes(app: FastAPI, state: ServerState) -> None:
    """Add GET /v1/chain, POST /v1/chain/rpc and POST /v1/chain/faucet (chain mode only)."""
    chain = state.settler.chain
    client = httpx.AsyncClient(timeout=30.0)

    @app.get("/v1/chain")
    async def chain_info() -> dict:
        """Chain id, contract addresses, this node's address, and whether the faucet works here."""
        d = chain.d
        return {"chain_id": d.chain_id, "local": d.local, "node": chain.address,
                "contracts": {k: d.address(k) for k in ("OpenToken", "Settlement", "NodeRegistry", "AdapterRegistry")},
                "token": {"symbol": "OPEN", "decimals": 18},
                "faucet": d.local and "faucet_key" in d.extra, "faucet_amount": str(FAUCET_OPEN),
                "price_version": state.settler.price_version}

    @app.post("/v1/chain/rpc")
    async def rpc(raw: Request) -> JSONResponse:
        """JSON-RPC relay to the node's chain for the methods in RPC_METHODS (single or batch)."""
        body = await raw.body()
        if len(body) > MAX_RPC_BYTES:
            raise InvalidRequest(f"JSON-RPC body over {MAX_RPC_BYTES} bytes")
        try:
            msg = json.loads(body)
        except ValueError:
            return JSONResponse(_rpc_error(None, -32700, "parse error"), status_code=400)
        calls = msg if isinstance(msg, list) else [msg]
        if not calls or len(calls) > MAX_BATCH or not all(isinstance(c, dict) for c in calls):
            return JSONResponse(_rpc_error(None, -32600, f"expected 1 to {MAX_BATCH} request objects"), 400)
        refused = [c for c in calls if c.get("method") not in RPC_METHODS]
        if refused:
            return JSONResponse(_rpc_error(refused[0].get("id"), -32601,
                                           f"method {refused[0].get('method')!r} is not relayed here"), 400)
        try:
            r = await client.post(chain.d.rpc, json=msg)
        except httpx.HTTPError as e:
            return JSONResponse(_rpc_error(calls[0].get("id"), -32000, f"chain unreachable: {type(e).__name__}"), 502)
        return JSONResponse(r.json(), status_code=200 if r.status_code < 500 else 502)

    @app.post("/v1/chain/faucet")
    async def faucet_route(body: FaucetRequest) -> dict:
        """Local chains: FAUCET_OPEN test OPEN and gas to `address`."""
        from eth_utils import is_address, to_checksum_address

        from openlora.chain.cli import faucet

        if not is_address(body.address):
            raise InvalidRequest(f"{body.address!r} is not an address")
        addr = to_checksum_address(body.address)
        await asyncio.to_thread(faucet, chain, addr, FAUCET_OPEN)
        return {"address": addr, "token": str(await asyncio.to_thread(chain.token_balance, addr))}
