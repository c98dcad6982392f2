"""`openlora serve --ray-replicas 2 --chain`: the Ray Serve application is one node on a local anvil
chain. The LedgerOwner registers it once (its key, the given endpoint); both replicas take a payer's
authorization token and answer 402/401 as a single node does; closing the epoch settles the receipts
of both replicas on chain (read back with web3.py through the chain client).

One anvil and one Ray cluster for the module, on 127.0.0.1, stopped by their handles (anvil's pid,
ray.shutdown())."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray Serve is an optional extra: pip install 'openlora[ray]'")
serve = pytest.importorskip("ray.serve", reason="Ray Serve is an optional extra: pip install 'openlora[ray]'")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
import httpx  # noqa: E402
from eth_account import Account  # noqa: E402
from helpers import free_port  # noqa: E402
from ray_app import ENGINE, ray_app, tiny_model_with_adapters  # noqa: E402

from openlora.chain.client import Chain  # noqa: E402

pytestmark = pytest.mark.slow

ADMIN = "admin-ray-chain"
ADAPTERS = ("c1", "c2", "c3", "c4", "c5", "c6")
REPLICA = "x-openlora-replica"
OWNER = Account.create()
CONTRIB = Account.create()


def _manifest() -> dict:
    return {"owner": OWNER.address, "version": "1", "base_model": "tiny",
            "datasets": [{"id": "ds-ray", "hash": "sha256:" + "cd" * 32,
                          "contributors": [{"address": CONTRIB.address, "weight": 1}]}],
            "price_per_1k_prompt_tokens": 1000, "price_per_1k_completion_tokens": 3000,
            "split": {"operator": 2000, "owner": 5000, "data": 3000}, "access": "public"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from openlora.attribution.manifest import parse_manifest
    from openlora.chain.anvil import DEV_KEYS, Anvil
    from openlora.chain.cli import faucet
    from openlora.chain.deploy import deploy as deploy_contracts
    from openlora.chain.registry_sync import register_adapter
    from openlora.server.app import ServeOptions

    root = tmp_path_factory.mktemp("raychain")
    model = tiny_model_with_adapters(root, ADAPTERS, seed=20)
    with Anvil() as node:
        dep = deploy_contracts(node.rpc, Account.from_key(DEV_KEYS[0]), local=True)
        dep.extra["faucet_key"] = DEV_KEYS[0]
        dep.save(root / "dep.json")
        owner = Chain(dep, OWNER)
        faucet(owner, OWNER.address, 0)
        for name in ADAPTERS:  # on chain by their owner, as `openlora chain register-adapter` does
            (root / "adapters" / name / "attribution.json").write_text(json.dumps(_manifest()))
            register_adapter(owner, name, parse_manifest(_manifest()))
        port = free_port()
        opts = ServeOptions(model=str(model), adapter_dirs=[str(root / "adapters")], admin_key=ADMIN,
                            engine=dict(ENGINE, max_cpu_loras=8), ledger=str(root / "ledger.sqlite"),
                            node_key=str(root / "node_key.json"), grace_period=5.0, chain=str(root / "dep.json"),
                            epoch_seconds=3600.0, region="DE", public_url=f"http://127.0.0.1:{port}")
        with ray_app(opts, port) as app:
            client = httpx.Client(base_url=app.url, timeout=120)
            yield {"app": app, "client": client, "dep": dep, "chain": Chain(dep), "root": root, "opts": opts}
            client.close()


def _payer(world, amount: int) -> Account:
    from openlora.chain.cli import faucet

    acct = Account.create()
    faucet(Chain(world["dep"]), acct.address, amount)
    if amount:
        c = Chain(world["dep"], acct)
        c.send(c.c["OpenToken"].functions.approve(world["dep"].address("Settlement"), amount))
        c.send(c.c["Settlement"].functions.deposit(amount))
    return acct


def _token(world, payer: Account, node: str, cap: int = 10**18) -> str:
    from openlora.chain.authorization import sign_authorization

    d = world["dep"]
    return sign_authorization(payer.key, node, cap, int(time.time()) + 3600, None, d.chain_id,
                              d.address("Settlement")).to_token()


def _complete(world, model: str, token: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return world["client"].post("/v1/completions", headers=headers,
                                json={"model": model, "prompt": "hello there", "max_tokens": 4})


def test_the_application_is_one_node_on_chain(world):
    from openlora.engine.model_hash import base_model_hash

    nodes = world["chain"].nodes()
    assert len(nodes) == 1, nodes  # registered once, by the owner, not per replica
    assert nodes[0]["address"] == world["app"].node and nodes[0]["endpoint"] == world["opts"].public_url
    assert nodes[0]["region"]["code"] == "DE" and nodes[0]["models"] == ["0x" + base_model_hash(world["opts"].model)]
    info = world["client"].get("/v1/chain").json()  # a replica's chain route, through the owner's proxy
    assert info["node"] == world["app"].node and info["chain_id"] == world["dep"].chain_id


def test_gate_answers_as_a_single_node(world):
    node = world["app"].node
    r = _complete(world, "c1", None)
    assert r.status_code == 402 and r.json()["error"]["type"] == "payment_required", r.text
    poor = _payer(world, 0)
    r = _complete(world, "c1", _token(world, poor, node))
    assert r.status_code == 402 and "escrow" in r.json()["error"]["message"], r.text
    stranger = Account.create().address  # a token for another node
    r = _complete(world, "c1", _token(world, poor, stranger))
    assert r.status_code == 401, r.text


def test_paid_requests_on_both_replicas_settle_on_chain(world):
    from openlora.attribution.ledger import Ledger

    chain, node = world["chain"], world["app"].node
    payer = _payer(world, 10**18)
    token = _token(world, payer, node)
    fees: dict[str, int] = {}  # receipt id -> fee
    replicas: set[str] = set()
    for name in ADAPTERS:  # each new adapter goes to either replica (nobody holds it yet)
        for _ in range(2):
            r = _complete(world, name, token)
            assert r.status_code == 200, r.text
            fees[r.json()["attribution"]["receipt_id"]] = int(r.json()["attribution"]["fee"])
            replicas.add(r.headers[REPLICA])
        if len(replicas) == 2 and len(fees) >= 4:
            break
    assert len(replicas) == 2, replicas  # the token was accepted by both replicas
    assert all(f > 0 for f in fees.values())
    escrow0 = chain.escrow(payer.address)
    r = world["client"].post("/v1/epochs/close", headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["settled"] == len(fees) and res["total"] == sum(fees.values()), res
    assert chain.escrow(payer.address) == escrow0 - sum(fees.values())  # read back with web3.py
    ledger = Ledger(world["root"] / "ledger.sqlite")
    try:
        assert chain.last_seq(node) == ledger.head()[0]
        assert ledger.verify(node=node) is None
    finally:
        ledger.close()
    assert chain.claimable(CONTRIB.address) > 0 and chain.claimable(OWNER.address) > 0
    assert world["client"].get("/v1/epochs").status_code == 200  # the explorer, through the owner
    assert world["client"].post("/v1/epochs/close", headers={"Authorization": f"Bearer {ADMIN}"}).json()[
        "settled"] == 0  # nothing twice
