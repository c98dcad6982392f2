"""The node's chain side in-process, against a real anvil: manifest checks against the registry,
the payment gate (402/403), and settlement when the chain is down (nothing lost, nothing twice)."""

from __future__ import annotations

import time

import pytest
from eth_account import Account

from openlora.attribution import AttributionService, NodeIdentity
from openlora.attribution.manifest import parse_manifest
from openlora.chain.anvil import DEV_KEYS, Anvil, ChainError
from openlora.chain.authorization import sign_authorization
from openlora.chain.cli import faucet
from openlora.chain.client import Chain
from openlora.chain.deploy import deploy
from openlora.chain.payments import PaymentRequired, Payments
from openlora.chain.registry_sync import NodeProfile, check_adapter, ensure_node, register_adapter
from openlora.chain.settler import Settler
from openlora.errors import AccessDenied, InvalidRequest
from openlora.outputs import UsageEvent
from openlora.request import AdapterUse

pytestmark = pytest.mark.slow  # real processes, the demo model, a browser or a chain: not in `make test-fast`

OWNER = Account.create()
CONTRIB = Account.create()


def manifest(access="public", price=1000) -> dict:
    return {"owner": OWNER.address, "version": "1", "base_model": "m",
            "datasets": [{"id": "ds-a", "hash": "sha256:" + "ab" * 32,
                          "contributors": [{"address": CONTRIB.address, "weight": 1}]}],
            "price_per_1k_prompt_tokens": price, "price_per_1k_completion_tokens": 3 * price,
            "split": {"operator": 2000, "owner": 5000, "data": 3000}, "access": access}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with Anvil(state=tmp_path_factory.mktemp("anvil") / "state.json") as node:
        dep = deploy(node.rpc, Account.from_key(DEV_KEYS[0]), local=True)
        dep.extra["faucet_key"] = DEV_KEYS[0]
        ident = NodeIdentity.create()
        chain = Chain(dep, ident._account)
        ensure_node(chain, NodeProfile(endpoint="http://127.0.0.1:9", region="DE", price_prompt=10,
                                       price_completion=20))
        owner = Chain(dep, OWNER)
        faucet(chain, OWNER.address, 0)
        register_adapter(owner, "open", parse_manifest(manifest()))
        register_adapter(owner, "private", parse_manifest(manifest({"allow": []})))
        tmp = tmp_path_factory.mktemp("ledger")
        att = AttributionService(tmp / "l.sqlite", ident, base_model_id="m", chain_id=dep.chain_id)
        att.manifest_check = lambda n, m: check_adapter(chain, n, m)
        settler = Settler(chain, att.ledger, att.epochs)
        yield {"node": node, "dep": dep, "chain": chain, "att": att, "settler": settler,
               "pay": Payments(chain, settler, att, ttl=0.0)}
        att.close()


def payer_with(world, amount: int) -> Account:
    acct = Account.create()
    c = Chain(world["dep"], acct)
    faucet(world["chain"], acct.address, amount)
    if amount:
        c.send(c.c["OpenToken"].functions.approve(world["dep"].address("Settlement"), amount))
        c.send(c.c["Settlement"].functions.deposit(amount))
    return acct


def auth_for(world, payer, cap):
    d = world["dep"]
    return sign_authorization(payer.key, world["chain"].address, cap, int(time.time()) + 3600, None, d.chain_id,
                              d.address("Settlement"))


def test_manifests_are_checked_against_the_registry(world):
    att = world["att"]
    att.register_manifest("open", manifest())  # equal terms: accepted
    with pytest.raises(InvalidRequest, match="adapter 'open'.*prices"):
        att.register_manifest("open", manifest(price=999))
    with pytest.raises(InvalidRequest, match="adapter 'ghost'.*not registered on chain"):
        att.register_manifest("ghost", manifest())
    with pytest.raises(InvalidRequest, match="adapter 'open'.*without a manifest"):
        att.register_manifest("open", None)
    # An adapter looked up without a manifest (e.g. from the hub) whose name is on chain: refused.
    with pytest.raises(InvalidRequest, match="adapter 'private'.*without a manifest"):
        att.manifest("private")


def test_gate_refuses_before_work(world):
    pay = world["pay"]
    rich = payer_with(world, 10**6)
    pay.admit(["req-ok"], auth_for(world, rich, 10**6), ["open"], 5000)  # fits
    pay.release("req-ok")
    with pytest.raises(AccessDenied, match="private"):
        pay.admit(["req-p"], auth_for(world, rich, 10**6), ["private"], 1)
    with pytest.raises(PaymentRequired, match="cap"):
        pay.admit(["req-c"], auth_for(world, rich, 100), ["open"], 101)
    poor = payer_with(world, 50)
    with pytest.raises(PaymentRequired, match="escrow"):
        pay.admit(["req-e"], auth_for(world, poor, 10**6), ["open"], 51)
    # In-flight reservations count: two requests of 30 do not fit in an escrow of 50.
    pay.admit(["req-1"], auth_for(world, poor, 10**6), ["open"], 30)
    with pytest.raises(PaymentRequired):
        pay.admit(["req-2"], auth_for(world, poor, 10**6), ["open"], 30)
    pay.release("req-1")


def test_chain_down_loses_nothing_and_settles_once(world):
    att, settler, chain = world["att"], world["settler"], world["chain"]
    att.register_manifest("open", manifest())
    payer = payer_with(world, 10**9)
    auth = auth_for(world, payer, 10**9)
    receipts = []
    for i in range(3):
        rid = f"down-{i}"
        world["pay"].admit([rid], auth, ["open"], 10**6)
        receipts.append(att.record(UsageEvent(rid, payer.address, "m", "", (AdapterUse("open", "", 1.0),),
                                              100, 0, 50, "finished", "stop")))
    node = world["node"]
    node.stop()  # the chain goes down (anvil writes its state file on SIGTERM)
    with pytest.raises(ChainError):
        settler.close_and_settle()
    assert att.ledger.get_by_request_id("down-2") is not None  # serving side untouched
    node.start()  # back, same port, same state
    due = sum(r.fee for r in receipts)
    res = settler.close_and_settle()
    assert res["settled"] == 3 and res["total"] == due
    for who in {p.recipient for r in receipts for p in r.payouts}:
        assert chain.claimable(who) >= sum(p.amount for r in receipts for p in r.payouts if p.recipient == who)
    assert settler.close_and_settle()["settled"] == 0  # nothing twice


def test_heartbeat_is_rate_limited(world):
    settler, chain = world["settler"], world["chain"]
    reg = chain.c["NodeRegistry"].functions
    chain.w3.provider.make_request("evm_increaseTime", [1000])
    chain.w3.provider.make_request("evm_mine", [])
    before = reg.get(chain.address).call()[6]
    assert settler.heartbeat(every=900) is True
    assert reg.get(chain.address).call()[6] > before
    assert settler.heartbeat(every=900) is False  # just sent


def test_cli_deploy_with_an_existing_token_and_a_keystore(world, tmp_path):
    import json
    import os
    import subprocess
    import sys

    key = Account.create()
    faucet(world["chain"], key.address, 0)
    ks = tmp_path / "key.json"
    ks.write_text(json.dumps(Account.encrypt(key.key, "pw", kdf="pbkdf2", iterations=2)))
    token = world["dep"].address("OpenToken")
    out = tmp_path / "dep.json"
    p = subprocess.run([sys.executable, "-m", "openlora.cli", "chain", "deploy", "--rpc", world["dep"].rpc,
                        "--keystore", str(ks), "--token", token, "--out", str(out), "--json"],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "OPENLORA_KEY_PASSWORD": "pw"})
    assert p.returncode == 0, p.stderr
    printed = json.loads(p.stdout)
    from openlora.chain.client import Deployment

    d = Deployment.load(out)
    assert d.address("OpenToken") == token == printed["contracts"]["OpenToken"]
    assert Chain(d).c["Settlement"].functions.token().call() == token
    bad = subprocess.run([sys.executable, "-m", "openlora.cli", "chain", "deploy", "--rpc", world["dep"].rpc,
                          "--keystore", str(ks), "--out", str(out)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OPENLORA_KEY_PASSWORD": "wrong"})
    assert bad.returncode == 2 and bad.stderr.startswith("error: cannot decrypt keystore"), bad.stderr


def _cli(*args: str, env: dict | None = None):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "openlora.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def test_cli_escrow_round_trip(world, tmp_path):
    """deposit, announce a withdrawal, wait out the delay (chain time), take it; balances as JSON."""
    import json

    dep_file = tmp_path / "dep.json"
    world["dep"].save(dep_file)
    payer = Account.create()
    faucet(world["chain"], payer.address, 10**6)
    key = "0x" + payer.key.hex().removeprefix("0x")
    assert _cli("chain", "deposit", "--deployment", str(dep_file), "--key", key, "600000").returncode == 0
    p = _cli("chain", "withdraw", "--deployment", str(dep_file), "--key", key, "200000", "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["requested"] == 200000, p.stderr
    chain = world["chain"]
    chain.w3.provider.make_request("evm_increaseTime", [86_401])
    chain.w3.provider.make_request("evm_mine", [])
    p = _cli("chain", "withdraw", "--deployment", str(dep_file), "--key", key, "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["withdrawn"] == 200000, p.stderr
    addr = payer.address.lower()  # keyed exactly as given
    p = _cli("chain", "balances", "--deployment", str(dep_file), "--json", addr)
    assert json.loads(p.stdout) == {addr: {"token": 600000, "escrow": 400000, "claimable": 0}}


def test_serve_with_an_unreachable_chain_exits_with_one_line(world, tmp_path):
    from openlora.chain.anvil import free_port

    d = world["dep"]
    dead = type(d)(chain_id=d.chain_id, rpc=f"http://127.0.0.1:{free_port()}", contracts=d.contracts, local=True)
    dead.save(tmp_path / "dead.json")
    p = _cli("serve", "--chain", str(tmp_path / "dead.json"), "--ledger", str(tmp_path / "l.sqlite"),
             "--node-key", str(tmp_path / "k.json"), "--max-model-len", "256", "--kv-cache-memory", "64MiB",
             env={"OPENLORA_NODE_KEY_PASSWORD": "pw"})
    assert p.returncode == 2, p.stderr[-2000:]
    assert "cannot join the chain" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
