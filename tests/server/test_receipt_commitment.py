"""Receipts that commit to the prompt and the answer (issue 20, item 8), through the real server and the
official openai client: the client alone receives the key; anyone it shows (receipt, key, input,
output) to can check the node's signature and the HMAC, with the `openlora ledger check-commitment`
CLI; the node keeps neither the key nor the text."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import openai
from conftest import ADMIN_KEY, API_KEY, OTHER_KEY

from openlora.attribution import commitment
from openlora.attribution.cli import check_commitment

ALICE, BOB = API_KEY, OTHER_KEY


def _client(server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0)


def _receipt(server, rid: str, key: str = API_KEY) -> dict:
    r = httpx.get(f"{server.base_url}/receipts/{rid}", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_a_completion_commits_to_its_prompt_and_samples(server):
    prompt = "t5 t6 t7"
    r = _client(server, ALICE).completions.create(
        model="a1", prompt=prompt, max_tokens=4, n=2, temperature=1.0, seed=3, extra_body={"commit": True})
    att = r.model_extra["attribution"]
    assert att["commitment_scheme"] == "hmac-sha256/v1"
    key = commitment.parse_key(att["commitment_key"])
    texts = [c.text for c in sorted(r.choices, key=lambda c: c.index)]
    receipt = _receipt(server, att["receipt_id"])
    assert receipt["commitment"] == att["commitment"]
    assert "commitment_key" not in receipt  # the node does not keep the key
    assert check_commitment(receipt, key, {"input": prompt, "output": texts}) is None
    # Anything else fails: another answer, another prompt, another key, a forged receipt.
    assert "does not match" in check_commitment(receipt, key, {"input": prompt, "output": texts[::-1] + ["x"]})
    assert "does not match" in check_commitment(receipt, key, {"input": "t5 t6", "output": texts})
    assert "does not match" in check_commitment(receipt, commitment.new_key(), {"input": prompt, "output": texts})
    forged = {**receipt, "commitment": commitment.commit(key, prompt, ["something else"])}
    assert "does not match its fields" in check_commitment(forged, key, {"input": prompt, "output": ["something else"]})
    del forged["receipt_id"]  # a forger who drops the id still lacks the node's signature
    assert "signature recovers" in check_commitment(forged, key, {"input": prompt, "output": ["something else"]})


def test_a_streamed_chat_commits_to_the_messages_as_sent(server, tmp_path):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "t5 t9 ünï"}]
    stream = _client(server, ALICE).chat.completions.create(
        model="tiny", messages=messages, max_tokens=5, stream=True, extra_body={"commit": True})
    text, att = "", None
    for ch in stream:
        if ch.choices:
            text += ch.choices[0].delta.content or ""
        if (ch.model_extra or {}).get("attribution"):
            att = ch.model_extra["attribution"]
    assert att is not None and text
    receipt = _receipt(server, att["receipt_id"])
    # The CLI a third party runs: exit 0 for the true exchange, 1 for a changed one.
    (tmp_path / "receipt.json").write_text(json.dumps(receipt))
    for output, code in (([text], 0), ([text + "!"], 1)):
        (tmp_path / "exchange.json").write_text(json.dumps({"input": messages, "output": output}))
        run = subprocess.run([sys.executable, "-m", "openlora.cli", "ledger", "check-commitment",
                              str(tmp_path / "receipt.json"), "--key", att["commitment_key"],
                              "--exchange", str(tmp_path / "exchange.json"), "--node", receipt["node"]],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == code, run.stdout + run.stderr
        assert json.loads(run.stdout)["ok"] is (code == 0)


def test_a_list_of_prompts_gets_one_commitment_per_prompt_and_no_commit_means_none(server):
    prompts = ["t1 t2", "t3 t4"]
    r = _client(server, ALICE).completions.create(model="a2", prompt=prompts, max_tokens=3,
                                                  extra_body={"commit": True})
    atts = r.model_extra["attribution"]
    assert len(atts) == 2 and atts[0]["commitment_key"] == atts[1]["commitment_key"]
    key = commitment.parse_key(atts[0]["commitment_key"])
    for i, (p, att) in enumerate(zip(prompts, atts)):
        text = next(c.text for c in r.choices if c.index == i)
        assert check_commitment(_receipt(server, att["receipt_id"]), key, {"input": p, "output": [text]}) is None
    plain = _client(server, ALICE).completions.create(model="a2", prompt="t1", max_tokens=2).model_extra["attribution"]
    assert "commitment" not in plain and "commitment_key" not in plain
    assert "commitment" not in _receipt(server, plain["receipt_id"])


def test_private_adapters_are_absent_from_state_and_metrics_for_others(server):
    def get(path: str, key: str | None) -> httpx.Response:
        h = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.get(server.base_url.removesuffix("/v1") + path, headers=h, timeout=30)

    for key, sees in ((None, False), (BOB, False), ("not-a-key", False), (API_KEY, True), (ADMIN_KEY, True)):
        state = get("/v1/state", key)
        assert state.status_code == 200  # a router polls without a key: never a 401
        assert ("secret" in state.json()["adapters"]) is sees, key
        assert "a1" in state.json()["adapters"]
        metrics = get("/metrics", key)
        assert metrics.status_code == 200
        assert ('adapter="secret"' in metrics.text) is sees, key
        assert 'adapter="a1"' in metrics.text
