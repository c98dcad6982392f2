"""`openlora serve --ray-replicas`: two engine replicas on Ray Serve, on 127.0.0.1 (tiny model, one
thread each): adapter affinity through Serve's multiplexed model ids (the x-openlora-replica header
names the replica that answered), one ledger for both replicas, and a killed replica replaced.

One Ray cluster for the module, started by this process on 127.0.0.1 and stopped by ray.shutdown()
(only the processes of that cluster)."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray Serve is an optional extra: pip install 'openlora[ray]'")
serve = pytest.importorskip("ray.serve", reason="Ray Serve is an optional extra: pip install 'openlora[ray]'")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
import httpx  # noqa: E402
from helpers import free_port, write_manifest  # noqa: E402
from ray_app import ENGINE, ray_app, tiny_model_with_adapters  # noqa: E402

pytestmark = pytest.mark.slow

KEY = "sk-ray-alice"
ADAPTERS = ("a1", "a2", "a3")
REPLICA = "x-openlora-replica"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from openlora.server.app import ServeOptions

    root = tmp_path_factory.mktemp("ray")
    model = tiny_model_with_adapters(root, ADAPTERS, seed=10)
    write_manifest(root / "adapters" / "a1", "tiny")
    opts = ServeOptions(model=str(model), adapter_dirs=[str(root / "adapters")], api_keys={KEY: "alice"},
                        engine=dict(ENGINE, max_cpu_loras=4), ledger=str(root / "ledger.sqlite"),
                        node_key=str(root / "node_key.json"), grace_period=5.0)
    with ray_app(opts, free_port()) as app:
        client = httpx.Client(base_url=app.url, timeout=120, headers={"Authorization": f"Bearer {KEY}"})
        yield {"app": app, "client": client, "ledger": root / "ledger.sqlite", "receipts": {}}
        client.close()


def _complete(c: httpx.Client, model: str, receipts: dict, **kw) -> httpx.Response:
    r = c.post("/v1/completions", json={"model": model, "prompt": "hello there", "max_tokens": 4, **kw})
    if r.status_code == 200:  # receipt id -> the replica that answered
        receipts[r.json()["attribution"]["receipt_id"]] = r.headers[REPLICA]
    return r


def test_adapter_requests_go_to_the_replica_that_holds_it(cluster):
    c, seen = cluster["client"], {}
    # First request per adapter: a replica takes it and reports the id to Serve's controller, which tells
    # the router a moment later. Requests in that window may go to either replica (and load it there
    # too), so the warm-up waits for the report before the next adapter; affinity is checked after it.
    for a in ADAPTERS:
        r = _complete(c, a, cluster["receipts"])
        assert r.status_code == 200, r.text
        seen[a] = {r.headers[REPLICA]}
        time.sleep(2.0)
    for _ in range(4):
        for a in ADAPTERS:
            r = _complete(c, a, cluster["receipts"])
            assert r.status_code == 200, r.text
            seen.setdefault(a, set()).add(r.headers[REPLICA])
    assert all(len(reps) == 1 for reps in seen.values()), seen
    # A stream for a1 goes to a1's replica and carries its receipt, as on a single node.
    body = {"model": "a1", "prompt": "hi", "max_tokens": 4, "stream": True}
    with c.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers[REPLICA] in seen["a1"]
        text = r.read().decode()
    assert text.rstrip().endswith("data: [DONE]") and '"receipt_id"' in text
    assert c.post("/v1/completions", json={**body, "model": "nope"}).status_code == 404


def test_receipts_of_both_replicas_land_in_one_ledger(cluster):
    from openlora.attribution.ledger import Ledger

    c, receipts = cluster["client"], cluster["receipts"]
    for _ in range(30):  # base-model requests go to either replica (no multiplexed id)
        assert _complete(c, "tiny", receipts).status_code == 200
        if len(set(receipts.values())) == 2:
            break
    assert len(set(receipts.values())) == 2, receipts
    rid = next(iter(receipts))
    got = c.get(f"/v1/receipts/{rid}")
    assert got.status_code == 200 and got.json()["receipt_id"] == rid  # read through the owner actor
    ledger = Ledger(cluster["ledger"])
    try:
        assert ledger.verify(node=cluster["app"].node) is None
        stored = {r.receipt_hash for r in ledger.iter()}
        assert set(receipts) <= stored
        assert {r.node for r in ledger.iter()} == {cluster["app"].node}  # one signing key for the application
    finally:
        ledger.close()


def test_killed_replica_is_replaced_and_serving_continues(cluster):
    from openlora.attribution.ledger import Ledger

    c, receipts = cluster["client"], cluster["receipts"]
    held = {_complete(c, "a1", receipts).headers[REPLICA] for _ in range(3)}
    time.sleep(1.0)  # replicas report the adapters they hold to Serve's routers every few hundred ms
    assert len(held) == 1, held
    victim = held.pop()
    out: dict = {}
    # A long answer for a1 is running on the victim when it dies: the ingress retries it on the other replica
    # (no byte was sent yet), or answers a clear 503.
    t = threading.Thread(target=lambda: out.setdefault("r", _complete(c, "a1", receipts, max_tokens=2000,
                                                                          ignore_eos=True)))
    t.start()
    time.sleep(1.0)
    ray.kill(ray.get_actor(f"SERVE_REPLICA::openlora#EngineReplica#{victim}", namespace="serve"), no_restart=True)
    t.join(120)
    r = out["r"]
    if r.status_code == 200:
        assert r.headers[REPLICA] != victim and r.headers.get("x-openlora-retried") == "1"
    else:
        assert r.status_code == 503 and "retry" in r.json()["error"]["message"], r.text
    # Serve starts a new replica; requests keep being served meanwhile and afterwards.
    deadline, replicas, n = time.monotonic() + 90, set(), 0
    while time.monotonic() < deadline:
        r = _complete(c, (*ADAPTERS, "tiny")[n % 4], receipts)
        n += 1
        assert r.status_code in (200, 503), r.text
        if r.status_code == 200:
            replicas.add(r.headers[REPLICA])
        st = serve.status().applications["openlora"].deployments["EngineReplica"]
        if st.status == "HEALTHY" and len(replicas - {victim}) == 2:
            break
        time.sleep(0.2)
    assert victim not in replicas and len(replicas) == 2, replicas
    ledger = Ledger(cluster["ledger"])
    try:  # nothing committed before the kill is lost; the chain still verifies
        assert ledger.verify(node=cluster["app"].node) is None
        assert set(receipts) <= {r.receipt_hash for r in ledger.iter()}
    finally:
        ledger.close()
