"""End to end on a real anvil: `openlora chain up`, the CLI for the payer, and `openlora serve
--chain` with the demo model and adapters, driven by the official `openai` client; on-chain
balances read back with web3.py.

Checks: the node registers itself (the GPU map lists it); a payer deposits and authorizes; paid
requests; closing the epoch credits every payee exactly its receipt payouts; a second close
changes nothing; 402 before any work for a payer who cannot pay, 401 for a forged token; a claim
moves OPEN to the payee's wallet; a node restarted mid-epoch settles everything once.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import openai
import pytest
from eth_account import Account

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
from helpers import ChainUp, ServerProcess  # noqa: E402

from openlora.chain.authorization import sign_authorization  # noqa: E402
from openlora.chain.cli import faucet  # noqa: E402
from openlora.chain.client import Chain, Deployment  # noqa: E402
from openlora.demo.manifests import demo_key  # noqa: E402

pytestmark = pytest.mark.slow  # real processes, the demo model, a browser or a chain: not in `make test-fast`

ADMIN = "admin-secret"
Q = [{"role": "user", "content": "Say hello."}]
CLI = [sys.executable, "-m", "openlora.cli"]


def cli(*args: str) -> str:
    p = subprocess.run([*CLI, "chain", *args], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return p.stdout


@pytest.fixture(scope="module")
def chain_up(tmp_path_factory):
    up = ChainUp(tmp_path_factory.mktemp("chain"))
    yield up.info
    up.stop()


@pytest.fixture(scope="module")
def payer(chain_up):
    acct = Account.create()
    dep = chain_up["deployment"]
    cli("faucet", "--deployment", dep, acct.address, str(10**21))
    cli("deposit", "--deployment", dep, "--key", acct.key.hex(), str(10**19))
    return acct


@pytest.fixture(scope="module")
def node(chain_up, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("node")
    args = ["--chain", chain_up["deployment"], "--admin-key", ADMIN, "--epoch-seconds", "3600",
            "--region", "FR", "--location", "48.9,2.4", "--ledger", str(tmp / "ledger.sqlite"),
            "--max-model-len", "1024", "--kv-cache-memory", "128MiB"]
    state = {"srv": ServerProcess(args, tmp, timeout=300.0), "args": args, "tmp": tmp}
    yield state
    state["srv"].stop()  # the restart test replaces the process: stop whichever runs now


def authorize(dep: str, payer, node_addr: str, cap: int) -> str:
    """The CLI's bearer token (its last line)."""
    return cli("authorize", "--deployment", dep, "--key", payer.key.hex(), "--node", node_addr,
               "--cap", str(cap)).strip().splitlines()[-1]


def authorize_here(dep: str, payer, node_addr: str, cap: int) -> str:
    """The same token made in-process (the CLI path is covered above; this saves a process)."""
    d = Deployment.load(dep)
    return sign_authorization(payer.key, node_addr, cap, int(time.time()) + 3600, None, d.chain_id,
                              d.address("Settlement")).to_token()


def node_address(dep: str) -> str:
    nodes = Chain(Deployment.load(dep)).nodes()
    assert len(nodes) == 1
    return nodes[0]["address"]


def paid_chats(base_url: str, token: str, models: list[str]) -> list[dict]:
    client = openai.OpenAI(base_url=base_url, api_key=token, max_retries=0)
    receipts = []
    for m in models:
        r = client.chat.completions.create(model=m, messages=Q, max_tokens=8, temperature=0)
        att = r.model_extra["attribution"]
        receipts.append(httpx.get(f"{base_url}/receipts/{att['receipt_id']}", timeout=10,  # the payer's alone
                                  headers={"Authorization": f"Bearer {token}"}).json())
    return receipts


def payouts(receipts: list[dict]) -> Counter:
    out: Counter = Counter()
    for r in receipts:
        for p in r["payouts"]:
            out[p["recipient"]] += p["amount"]
    return out


def close(url: str) -> dict:
    r = httpx.post(f"{url}/v1/epochs/close", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_node_on_the_map_paid_requests_settle_exactly_once(chain_up, payer, node):
    dep_path = chain_up["deployment"]
    srv = node["srv"]
    listing = json.loads(cli("nodes", "--deployment", dep_path, "--json"))[0]
    assert listing["endpoint"] == f"http://127.0.0.1:{srv.port}" and listing["active"]
    assert listing["region"]["code"] == "FR" and abs(listing["region"]["lat"] - 48.9) < 1e-9
    assert listing["hardware"]["cpu_cores"] >= 1 and listing["stake"] >= 10**18
    addr = listing["address"]
    chain = Chain(Deployment.load(dep_path))
    token = authorize(dep_path, payer, addr, 10**18)

    receipts = paid_chats(srv.base_url, token, ["pirate", "french", "json", "legal", "SmolLM2-135M-Instruct"])
    assert all(r["payer"] == payer.address for r in receipts)
    want = payouts(receipts)
    fees = sum(r["fee"] for r in receipts)
    assert fees > 0
    before = {a: chain.claimable(a) for a in want}
    escrow0 = chain.escrow(payer.address)

    res = close(srv.url)
    paid = [r for r in receipts if r["fee"] > 0]  # the base model is free here: zero fees stay off chain
    assert len(paid) == 4 and res["settled"] == len(paid) and res["total"] == fees, res
    for a, amount in want.items():
        assert chain.claimable(a) - before[a] == amount, a
    assert chain.escrow(payer.address) == escrow0 - fees

    again = close(srv.url)  # nothing new: no transaction, nothing credited twice
    assert again["batches"] == [] and again["settled"] == 0
    assert all(chain.claimable(a) - before[a] == amount for a, amount in want.items())

    # A data contributor claims its OPEN.
    contributor = next(p["recipient"] for p in receipts[0]["payouts"] if p["role"] == "data" and p["amount"] > 0)
    seed = next(s for s in ("ahab", "bonny") if Account.from_key(demo_key(f"contributor/{s}")).address == contributor)
    key = demo_key(f"contributor/{seed}")
    cli("faucet", "--deployment", dep_path, contributor, "0")  # gas only
    wallet0, due = chain.token_balance(contributor), chain.claimable(contributor)
    out = json.loads(cli("claim", "--deployment", dep_path, "--key", "0x" + key.hex(), "--json"))
    assert out["claimed"] == due > 0
    assert chain.token_balance(contributor) == wallet0 + due and chain.claimable(contributor) == 0


def test_refusals_before_any_work(chain_up, node):
    dep_path = chain_up["deployment"]
    srv = node["srv"]
    addr = node_address(dep_path)
    poor = Account.create()
    chain = Chain(Deployment.load(dep_path), poor)
    faucet(chain, poor.address, 1000)
    chain.send(chain.c["OpenToken"].functions.approve(chain.d.address("Settlement"), 10))
    chain.send(chain.c["Settlement"].functions.deposit(10))
    token = authorize_here(dep_path, poor, addr, 10**18)
    client = openai.OpenAI(base_url=srv.base_url, api_key=token, max_retries=0)
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="pirate", messages=Q, max_tokens=8)
    assert e.value.status_code == 402 and "escrow" in str(e.value)
    forged = token[:-6] + ("AAAAAA" if not token.endswith("AAAAAA") else "BBBBBB")
    r = httpx.post(f"{srv.base_url}/chat/completions", headers={"Authorization": f"Bearer {forged}"},
                   json={"model": "pirate", "messages": Q, "max_tokens": 4}, timeout=30)
    assert r.status_code == 401, r.text
    r = httpx.post(f"{srv.base_url}/chat/completions", json={"model": "pirate", "messages": Q, "max_tokens": 4},
                   timeout=30)
    assert r.status_code == 402 and "authorization" in r.json()["error"]["message"]


def test_restart_mid_epoch_settles_everything_once(chain_up, payer, node):
    dep_path = chain_up["deployment"]
    srv = node["srv"]
    addr = node_address(dep_path)
    chain = Chain(Deployment.load(dep_path))
    token = authorize_here(dep_path, payer, addr, 10**18)
    receipts = paid_chats(srv.base_url, token, ["pirate", "legal"])
    assert srv.stop() == 0  # mid-epoch: these two are not settled yet
    want = payouts(receipts)
    before = {a: chain.claimable(a) for a in want}
    srv2 = ServerProcess(node["args"], node["tmp"], timeout=300.0)
    node["srv"] = srv2
    assert node_address(dep_path) == addr  # same key, same entry
    res = close(srv2.url)
    assert res["settled"] == 2 and res["total"] == sum(r["fee"] for r in receipts), res
    for a, amount in want.items():
        assert chain.claimable(a) - before[a] == amount, a
    assert close(srv2.url)["settled"] == 0


def test_gateway_finds_the_node_in_the_registry(chain_up, payer, node, tmp_path):
    from helpers import free_port as fp
    from helpers import wait_healthy

    dep_path = chain_up["deployment"]
    addr = node_address(dep_path)
    port = fp()
    log = open(tmp_path / "gw.log", "wb")
    gw = subprocess.Popen([*CLI, "gateway", "--chain", dep_path, "--port", str(port), "--poll-interval", "0.5"],
                          stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_healthy(url, gw, 60), (tmp_path / "gw.log").read_text()
        listed = httpx.get(url + "/v1/nodes", timeout=5).json()["data"]
        assert [n["address"] for n in listed] == [addr]
        assert listed[0]["region"] == "FR" and listed[0]["url"] == node["srv"].url and listed[0]["healthy"]
        token = authorize_here(dep_path, payer, addr, 10**18)  # the payer's token passes through
        client = openai.OpenAI(base_url=url + "/v1", api_key=token, max_retries=0)
        r = client.chat.completions.with_raw_response.create(model="pirate", messages=Q, max_tokens=4)
        assert r.headers["x-openlora-node"] == addr and r.parse().model_extra["attribution"]["fee"] > 0
    finally:
        gw.send_signal(signal.SIGTERM)
        gw.wait(20)
        log.close()
