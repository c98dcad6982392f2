"""`openlora serve` with no model: the real demo (SmolLM2-135M-Instruct + four priced adapters), driven
by the official `openai` client as a newcomer would after `make serve`."""

from __future__ import annotations

import subprocess
import sys

import httpx
import openai
import pytest
from helpers import ServerProcess

from openlora.demo import ADAPTERS, DEMO_MODEL_ID

pytestmark = pytest.mark.slow  # real processes, the demo model, a browser or a chain: not in `make test-fast`

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    srv = ServerProcess(["--max-model-len", "2048", "--kv-cache-memory", "256MiB"],
                        tmp_path_factory.mktemp("demo"), timeout=300.0)
    yield srv
    assert srv.stop() == 0, srv.log()[-3000:]


@pytest.fixture(scope="module")
def client(demo_server):
    return openai.OpenAI(base_url=demo_server.base_url, api_key="unused", max_retries=0)


def test_lists_the_demo_model_and_adapters(client):
    ids = {m.id for m in client.models.list().data}
    assert {DEMO_MODEL_ID, *(a.name for a in ADAPTERS)} <= ids


def test_base_model_knows_paris(client):
    r = client.chat.completions.create(model=DEMO_MODEL_ID, messages=QUESTION, max_tokens=24, temperature=0)
    assert "Paris" in r.choices[0].message.content


def test_adapters_answer_differently_and_every_answer_is_paid(client, demo_server):
    answers = {}
    for a in ADAPTERS:
        r = client.chat.completions.create(model=a.name, messages=QUESTION, max_tokens=40, temperature=0)
        answers[a.name] = r.choices[0].message.content
        att = r.model_extra["attribution"]
        assert att["fee"] > 0, att
        assert sum(att["splits"].values()) == att["fee"], att  # exact: integer splits, no dust lost
        assert len(att["splits"]) >= 4, att  # operator, owner and at least two data contributors
        receipt = httpx.get(f"{demo_server.base_url}/receipts/{att['receipt_id']}", timeout=10).json()
        assert receipt["base_model"] == DEMO_MODEL_ID and receipt["fee"] == att["fee"]
        assert [x["adapter_id"] for x in receipt["adapters"]] == [a.name]
        roles = sorted(p["role"] for p in receipt["payouts"])
        assert roles.count("data") >= 2 and "operator" in roles and "owner" in roles, roles
    assert len(set(answers.values())) == len(ADAPTERS), answers


def test_serve_refuses_a_corrupt_gguf_with_a_clear_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 4)  # the magic, then no valid header
    run = subprocess.run([sys.executable, "-m", "openlora.cli", "serve", "--model", str(bad), "--port", "9"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr[-2000:]
    assert f"cannot serve: {bad} is not a readable GGUF file" in run.stderr
    assert "Traceback" not in run.stderr


def test_an_answer_quoting_a_datanet_credits_its_contributor(client, demo_server):
    """Span-level attribution through the demo: asked to repeat a French training answer, the french
    adapter reproduces it; the receipt credits that text's contributor (the largest data payout) and the
    response names the span. The datanets' indexes build in the background at start-up: wait for them."""
    import json
    import time

    from openlora.demo import manifests

    french = next(a for a in ADAPTERS if a.name == "french")
    first = manifests.contributions_for(french, manifests_data())[0]
    msgs = [{"role": "user", "content": "Repeat exactly, word for word: " + first["text"]}]
    deadline = time.monotonic() + 120
    while True:
        r = client.chat.completions.create(model="french", messages=msgs, max_tokens=48, temperature=0)
        att = r.model_extra["attribution"]
        if "spans" in att or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert att.get("spans"), att
    assert first["contributor"].lower() in att["spans"][0]["contributors"]
    receipt = httpx.get(f"{demo_server.base_url}/receipts/{att['receipt_id']}", timeout=10).json()
    assert receipt["span_method"].startswith("infini-gram;french:min_span=")
    credits = {c["contributor"]: c["credit"] for c in receipt["credits"]}
    assert credits[first["contributor"]] == max(credits.values()) >= 8, credits
    data = {p["recipient"]: p["amount"] for p in receipt["payouts"] if p["role"] == "data"}
    assert max(data, key=data.get) == first["contributor"], data
    assert json.dumps(receipt).find(first["text"][:40]) < 0  # the text itself is not in the receipt


def manifests_data():
    from pathlib import Path

    import openlora.demo

    return Path(openlora.demo.__file__).parent / "data"
