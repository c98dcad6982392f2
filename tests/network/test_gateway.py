"""The gateway with real processes on 127.0.0.1: three small nodes (tiny model, PEFT adapters) and
`openlora gateway`, driven by the official `openai` client.

Checks: sequential requests for one adapter stay on the node where it is resident; SIGKILL of that
node loses no request (retried elsewhere) and /v1/nodes shows it unhealthy within 10 s; a restarted
node rejoins; a node whose receipts are signed by another key than the one given is dropped;
streams pass through; the models list is the union of the nodes'.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
from helpers import Gateway, ServerProcess, make_peft_adapter  # noqa: E402

pytestmark = pytest.mark.slow  # real processes, the demo model, a browser or a chain: not in `make test-fast`

NODE_OPTS = ["--max-num-seqs", "8", "--kv-cache-memory", "16MiB", "--max-loras", "2", "--max-model-len", "256"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("net")
    model = root / "tiny"
    model.mkdir()
    make_tiny_model(model)
    adir = root / "adapters"
    for i, name in enumerate(("hot", "warm", "cold")):
        make_peft_adapter(model, adir / name, seed=30 + i)
    nodes = []
    for i in range(3):
        tmp = root / f"node{i}"
        tmp.mkdir()
        nodes.append(ServerProcess(["--model", str(model), "--adapter-dir", str(adir), *NODE_OPTS], tmp))
    addrs = {n.url: httpx.get(n.url + "/v1/state", timeout=5).json()["node"] for n in nodes}
    gw = Gateway([f"{n.url}@{addrs[n.url]}" for n in nodes], root / "gateway.log")
    yield {"root": root, "model": model, "adir": adir, "nodes": nodes, "addrs": addrs, "gw": gw}
    gw.stop()
    for n in nodes:
        n.stop()


def chat(gw_url: str, model: str, stream: bool = False) -> tuple[str, str]:
    """(node id that served it, text)."""
    client = openai.OpenAI(base_url=gw_url + "/v1", api_key="unused", max_retries=0)
    if stream:
        with client.chat.completions.with_streaming_response.create(
                model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True) as r:
            text = "".join(c.choices[0].delta.content or "" for c in r.parse() if c.choices)
            return r.headers["x-openlora-node"], text
    r = client.completions.with_raw_response.create(model=model, prompt="hello there", max_tokens=4, temperature=0)
    return r.headers["x-openlora-node"], r.parse().choices[0].text


def test_models_are_the_union_and_nodes_are_listed(cluster):
    gw = cluster["gw"]
    ids = {m["id"] for m in httpx.get(gw.url + "/v1/models", timeout=5).json()["data"]}
    assert {"tiny", "hot", "warm", "cold"} <= ids
    listed = gw.nodes()
    assert set(listed) == {n.url for n in cluster["nodes"]}
    for url, n in listed.items():
        assert n["healthy"] and n["address"] == cluster["addrs"][url] and n["id"] == n["address"]
        assert {"inflight", "running", "waiting", "kv_usage"} <= set(n["load"])


def test_sequential_requests_stay_where_the_adapter_is_resident(cluster):
    gw = cluster["gw"]
    served = [chat(gw.url, "hot")[0] for _ in range(8)]
    assert len(set(served)) == 1, served
    home = served[0]
    assert "hot" in gw.nodes()[next(u for u, a in cluster["addrs"].items() if a == home)]["resident_adapters"]
    node, text = chat(gw.url, "hot", stream=True)  # streaming passes through, same node
    assert node == home and isinstance(text, str)


def test_killed_node_loses_no_request_and_rejoins(cluster):
    gw, nodes = cluster["gw"], cluster["nodes"]
    home_addr = chat(gw.url, "warm")[0]
    victim = next(n for n in nodes if cluster["addrs"][n.url] == home_addr)
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait()
    t0 = time.monotonic()
    served = [chat(gw.url, "warm")[0] for _ in range(5)]  # every one succeeds elsewhere
    assert home_addr not in served
    while gw.nodes()[victim.url]["healthy"]:
        assert time.monotonic() - t0 < 10, "a dead node still shows healthy after 10 s"
        time.sleep(0.2)
    # The same node restarts on the same port with the same key, and rejoins.
    tmp = cluster["root"] / f"node{nodes.index(victim)}"
    again = ServerProcess(["--model", str(cluster["model"]), "--adapter-dir", str(cluster["adir"]), *NODE_OPTS],
                          tmp, port=victim.port)
    nodes[nodes.index(victim)] = again
    t1 = time.monotonic()
    while not gw.nodes()[victim.url]["healthy"]:
        assert time.monotonic() - t1 < 10, "the restarted node did not rejoin"
        time.sleep(0.2)


def test_a_node_with_the_wrong_key_is_dropped(cluster):
    impostor = cluster["nodes"][1]
    wrong = "0x000000000000000000000000000000000000dEaD"
    gw = Gateway([f"{impostor.url}@{wrong}"], cluster["root"] / "gateway-wrong.log")
    try:
        node, _ = chat(gw.url, "tiny")  # served (the gateway cannot know before the receipt)...
        assert node == wrong
        t0 = time.monotonic()
        while gw.nodes()[impostor.url]["dropped"] is None:  # ...then its receipt gives it away
            assert time.monotonic() - t0 < 10
            time.sleep(0.1)
        assert "does not verify" in gw.nodes()[impostor.url]["dropped"]
        r = httpx.post(gw.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2}, timeout=30)
        assert r.status_code == 503 and "no healthy node" in r.json()["error"]["message"]
    finally:
        gw.stop()


def _cut_stream(cluster, path: str, body: dict) -> tuple[list[dict], list[str]]:
    """Stream `body` through the gateway and SIGKILL the serving node after the first event; the
    victim restarts (same port and key) once the stream has ended. (events as JSON, raw data lines)"""
    gw, nodes = cluster["gw"], cluster["nodes"]
    lines = []
    with httpx.stream("POST", gw.url + path, json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        served = r.headers["x-openlora-node"]
        victim = next(n for n in nodes if cluster["addrs"][n.url] == served)
        it = r.iter_lines()
        lines.append(next(it))
        victim.proc.send_signal(signal.SIGKILL)  # dies while the answer streams
        victim.proc.wait()
        lines.extend(it)  # must end, not hang (the client's timeout would fail the test)
    i = nodes.index(victim)
    nodes[i] = ServerProcess(["--model", str(cluster["model"]), "--adapter-dir", str(cluster["adir"]), *NODE_OPTS],
                             cluster["root"] / f"node{i}", port=victim.port)
    data = [x[6:] for x in lines if x.startswith("data: ")]
    return [json.loads(d) for d in data if d != "[DONE]"], data


def _split_by_id(events: list[dict], piece) -> tuple[str, int, str, int]:
    """(text, events) of the first node's part and of the continuation (the ids differ)."""
    first_id = events[0]["id"]
    a = [piece(e) for e in events if e["id"] == first_id and e["choices"] and piece(e)]
    b = [piece(e) for e in events if e["id"] != first_id and e["choices"] and piece(e)]
    return "".join(a), len(a), "".join(b), len(b)


def test_a_stream_cut_midway_is_continued_on_another_node(cluster):
    """Completions: the continuation is exactly what a surviving node answers, greedy, to prompt +
    the text already sent, with the budget that was left; the client sees one whole stream."""
    body = {"model": "hot", "prompt": "count", "max_tokens": 120, "ignore_eos": True, "stream": True,
            "temperature": 0}
    events, data = _cut_stream(cluster, "/v1/completions", body)
    assert data[-1] == "[DONE]" and not any("error" in e for e in events), data[-3:]
    head, n_head, tail, n_tail = _split_by_id(events, lambda e: e["choices"][0]["text"])
    assert n_head >= 1 and n_tail >= 1, (n_head, n_tail)
    assert events[-1]["choices"] == [] or events[-2]["choices"][0]["finish_reason"] == "length"
    direct = httpx.post(cluster["gw"].url + "/v1/completions", timeout=60, json={
        **body, "stream": False, "prompt": "count" + head, "max_tokens": 120 - n_head}).json()
    assert tail == direct["choices"][0]["text"]
    assert direct["usage"]["completion_tokens"] == 120 - n_head


def test_a_chat_stream_cut_midway_continues_the_assistant_message(cluster):
    body = {"model": "warm", "messages": [{"role": "user", "content": "tell me a story"}], "max_tokens": 120,
            "ignore_eos": True, "stream": True, "temperature": 0}
    events, data = _cut_stream(cluster, "/v1/chat/completions", body)
    assert data[-1] == "[DONE]" and not any("error" in e for e in events), data[-3:]
    roles = [e for e in events if e["choices"] and "role" in e["choices"][0]["delta"]]
    assert len(roles) == 1, "the continuation's opening role event reached the client"
    head, n_head, tail, _ = _split_by_id(events, lambda e: e["choices"][0]["delta"].get("content"))
    direct = httpx.post(cluster["gw"].url + "/v1/chat/completions", timeout=60, json={
        **body, "stream": False, "max_tokens": 120 - n_head, "add_generation_prompt": False,
        "continue_final_message": True,
        "messages": [*body["messages"], {"role": "assistant", "content": head}]}).json()
    assert tail == direct["choices"][0]["message"]["content"]


def test_a_stream_that_cannot_be_continued_ends_with_an_error_event(cluster):
    body = {"model": "tiny", "prompt": "count", "max_tokens": 120, "ignore_eos": True, "stream": True,
            "temperature": 0, "n": 2}  # two choices: not resumed
    _, data = _cut_stream(cluster, "/v1/completions", body)
    assert "upstream_error" in data[-1] and "[DONE]" not in data[-1], data[-3:]
