"""The real server process driven by the official `openai` client; outputs equal the offline engine's."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from conftest import ADAPTERS, ADMIN_KEY, API_KEY, OTHER_KEY

from openlora.sampling_params import SamplingParams

PROMPTS = ["t5 t6 t7 t8", "t40 t41", "t100 t3 t9 t27 t88 t31"]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=60)


def aclient(server, key: str = API_KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.base_url, api_key=key, max_retries=0, timeout=60)


def offline_texts(offline, prompts, params: SamplingParams, adapters=None) -> list[list[str]]:
    outs = offline.generate(prompts, params, adapters=adapters)
    return [[c.text for c in o.outputs] for o in outs]


def chat_ids(offline, messages) -> list[int]:
    """The prompt the server builds for chat: the model's template, special tokens from the template only."""
    from openlora.engine.tokenizer import apply_chat_template

    text = apply_chat_template(offline.tokenizer, messages)
    return offline.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_models_lists_base_and_adapters(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"tiny", *ADAPTERS, "secret", "bad"}  # alice may use "secret"
    assert models["tiny"].model_extra.get("parent") is None
    for a in ADAPTERS:
        extra = models[a].model_extra
        assert extra["parent"] == "tiny"
        assert extra["state"] in ("resident", "host", "disk", "loading", "registered")


@pytest.mark.parametrize("model", ["tiny", "a1", "a3"])
def test_sync_completions_match_offline(client, offline, model):
    """Greedy, a batch of string prompts plus a token-id prompt, one request each way."""
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    adapter = None if model == "tiny" else model
    want = offline_texts(offline, PROMPTS, params, adapter)
    r = client.completions.create(model=model, prompt=PROMPTS, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    got = sorted(r.choices, key=lambda c: c.index)
    assert [[c.text] for c in got] == want
    assert all(c.finish_reason == "length" for c in got)
    assert r.usage.completion_tokens == 36
    ids = offline.tokenizer.encode(PROMPTS[0])
    r2 = client.completions.create(model=model, prompt=ids, max_tokens=12, temperature=0,
                                   extra_body={"ignore_eos": True})
    assert r2.choices[0].text == want[0][0]


def test_sync_stream_seeded_matches_offline(client, offline):
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=11, max_tokens=20, n=2, ignore_eos=True)
    want = offline_texts(offline, [PROMPTS[2]], params, "a2")[0]
    stream = client.completions.create(model="a2", prompt=PROMPTS[2], max_tokens=20, temperature=0.9, top_p=0.95,
                                       seed=11, n=2, stream=True, extra_body={"top_k": 50, "ignore_eos": True})
    texts, finish = ["", ""], [None, None]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
            finish[c.index] = c.finish_reason or finish[c.index]
    assert texts == want
    assert finish == ["length", "length"]


def test_async_concurrent_chat_across_adapters_matches_offline(server, offline):
    """16 concurrent chat requests (half streaming) over the base model and three adapters."""
    jobs = []
    for i in range(16):
        model = ["tiny", *ADAPTERS][i % 4]
        msgs = [{"role": "system", "content": "t3 t4"}, {"role": "user", "content": f"t{10 + i} t{20 + i} t{30 + i}"}]
        seeded = i % 3 == 0
        jobs.append((model, msgs, i % 2 == 0, seeded))

    async def one(c: openai.AsyncOpenAI, model, msgs, stream, seeded):
        kw = dict(model=model, messages=msgs, max_tokens=10, temperature=0.7 if seeded else 0.0,
                  seed=5 if seeded else None, extra_body={"ignore_eos": True})
        if not stream:
            r = await c.chat.completions.create(**kw)
            assert r.choices[0].message.role == "assistant"
            return r.choices[0].message.content
        s = await c.chat.completions.create(**kw, stream=True)
        parts, roles, finish = [], [], None
        async for chunk in s:
            for ch in chunk.choices:
                if ch.delta.role:
                    roles.append(ch.delta.role)
                parts.append(ch.delta.content or "")
                finish = ch.finish_reason or finish
        assert roles == ["assistant"] and finish == "length"
        return "".join(parts)

    async def main():
        async with aclient(server) as c:
            return await asyncio.gather(*(one(c, *j) for j in jobs))

    got = asyncio.run(main())
    for (model, msgs, _, seeded), text in zip(jobs, got):
        params = SamplingParams(temperature=0.7 if seeded else 0.0, seed=5 if seeded else None, max_tokens=10,
                                ignore_eos=True)
        want = offline_texts(offline, [chat_ids(offline, msgs)], params, None if model == "tiny" else model)[0][0]
        assert text == want, (model, msgs)


def test_weighted_adapters_match_offline(client, offline):
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    want = offline_texts(offline, [PROMPTS[0]], params, [("a1", 0.7), ("a2", 0.3)])[0][0]
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=10, temperature=0, extra_body={
        "ignore_eos": True, "adapters": [{"id": "a1", "weight": 0.7}, {"id": "a2", "weight": 0.3}]})
    assert r.choices[0].text == want
    single = offline_texts(offline, [PROMPTS[0]], params, "a1")[0][0]
    assert want != single  # the composition really differs from a1 alone


def test_logprobs_shapes(client):
    r = client.completions.create(model="a1", prompt=PROMPTS[1], max_tokens=5, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == r.choices[0].text
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0 and len(top) >= 3 and max(top.values()) == pytest.approx(chosen, abs=1e-5)  # greedy
    c = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "t9"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = c.choices[0].logprobs.content
    assert len(content) == 4 and "".join(t.token for t in content) == c.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob for t in content)


def test_stream_usage_counts_cached_prompt_tokens(client):
    """A repeated prompt hits the prefix cache: the streamed usage says so, like the non-streamed one."""
    prompt = " ".join(f"t{i % 50}" for i in range(80))

    def usage(stream: bool):
        if not stream:
            return client.completions.create(model="a1", prompt=prompt, max_tokens=2, temperature=0).usage
        chunks = list(client.completions.create(model="a1", prompt=prompt, max_tokens=2, temperature=0, stream=True,
                                                stream_options={"include_usage": True}))
        return chunks[-1].usage

    usage(False)  # fills the cache
    plain, streamed = usage(False), usage(True)
    assert plain.prompt_tokens_details.cached_tokens > 0
    assert streamed.prompt_tokens_details.cached_tokens == plain.prompt_tokens_details.cached_tokens


def test_stream_usage_chunk_and_attribution(client, server, assets):
    from eth_account import Account

    from openlora.attribution import NodeIdentity, Receipt, verify_receipt

    s = client.chat.completions.create(model="a1", messages=[{"role": "user", "content": "t7 t8"}], max_tokens=6,
                                       temperature=0, stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    chunks = list(s)
    assert all(ch.usage is None for ch in chunks[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 6
    att = last.model_extra["attribution"]
    assert att["fee"] > 0 and sum(att["splits"].values()) == att["fee"]
    # Non-streaming response carries it too; the receipt is served, signed by the node key.
    r = client.completions.create(model="a1", prompt=PROMPTS[0], max_tokens=4, user="carol")  # a label only
    summary = r.model_extra["attribution"]
    got = httpx.get(f"{server.base_url}/receipts/{summary['receipt_id']}",
                    headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)
    assert got.status_code == 200, got.text
    body = got.json()
    receipt = Receipt.from_dict(body)
    node = NodeIdentity.load_or_create(assets["root"] / "node_key.json", "test-password").address
    assert verify_receipt(receipt, expected_node=node) is None
    signer = Account.recover_message(receipt.signable(), signature=bytes.fromhex(receipt.signature[2:]))
    assert signer == node and receipt.payer == "alice" and receipt.fee == summary["fee"]
    assert receipt.completion_tokens == 4
    missing = httpx.get(f"{server.base_url}/receipts/0x{'00' * 32}", headers={"Authorization": f"Bearer {API_KEY}"})
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"


def test_errors_are_openai_json(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="t5", temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:  # too long for the 256-token context
        client.completions.create(model="tiny", prompt="t5 " * 300, max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-adapter", prompt="t5", max_tokens=2)
    with pytest.raises(openai.BadRequestError):  # merge must be an object
        client.completions.create(model="a1", prompt="t5", max_tokens=2, extra_body={"merge": "ties"})
    for stream in (False, True):  # an adapter whose files are corrupt: 503, before any stream starts
        with pytest.raises(openai.InternalServerError) as e:
            r = client.completions.create(model="bad", prompt="t5", max_tokens=2, stream=stream)
        assert e.value.status_code == 503
    h = {"Authorization": f"Bearer {API_KEY}"}
    for body in ({"model": "tiny", "prompt": "t5", "max_tokens": "x"}, {"model": "tiny"}, {"prompt": []}, []):
        r = httpx.post(f"{server.base_url}/completions", json=body, headers=h)
        assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text
    r = httpx.post(f"{server.base_url}/chat/completions", content=b"{not json", headers=h)
    assert r.status_code == 400
    assert httpx.get(server.url + "/health").status_code == 200


def test_bad_key_is_401(server):
    for key in ("wrong", ""):
        bad = openai.OpenAI(base_url=server.base_url, api_key=key or "x", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            bad.completions.create(model="tiny", prompt="t5", max_tokens=2)
        assert e.value.body["code"] == "invalid_api_key"
    assert httpx.get(server.base_url + "/models").status_code == 401
    ok = openai.OpenAI(base_url=server.base_url, api_key=OTHER_KEY, max_retries=0)
    assert ok.completions.create(model="tiny", prompt="t5", max_tokens=2).choices


def test_admin_register_use_delete(server, assets, offline):
    url = f"{server.base_url}/adapters"
    body = {"id": "late", "source": str(assets["late"])}
    assert httpx.post(url, json=body).status_code == 401
    assert httpx.post(url, json=body, headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 401
    assert httpx.delete(f"{url}/a1", headers={"Authorization": "Bearer nope"}).status_code == 401
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    r = httpx.post(url, json={"id": "broken", "source": str(assets["root"] / "nowhere")}, headers=admin, timeout=30)
    assert r.status_code == 404, r.text  # no such folder
    r = httpx.post(url, json={"id": "broken", "source": str(assets["adapter_dir"] / "bad")}, headers=admin, timeout=30)
    assert r.status_code == 503 and r.json()["error"]["type"] == "adapter_load_error", r.text  # corrupt weights
    r = httpx.post(url, json=body, headers=admin, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["parent"] == "tiny"
    client = openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0)
    got = client.completions.create(model="late", prompt=PROMPTS[0], max_tokens=8, temperature=0,
                                    extra_body={"ignore_eos": True}).choices[0].text
    want = offline_texts(offline, [PROMPTS[0]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), "late")
    assert got == want[0][0]
    assert "late" in {m.id for m in client.models.list().data}
    assert httpx.delete(f"{url}/late", headers=admin).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="late", prompt="t5", max_tokens=2)
    assert httpx.delete(f"{url}/late", headers=admin).status_code == 404


def test_client_disconnect_aborts_and_frees_kv(server):
    """Close a long stream after a few chunks: the request is aborted (its receipt shows fewer tokens
    than asked for) and the engine has nothing running and no KV blocks held."""
    h = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": "a2", "prompt": "t5 t6", "max_tokens": 250, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", f"{server.base_url}/completions", json=body, headers=h) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            request_id = json.loads(first[6:])["id"]
            next(lines), next(lines)
    deadline = time.monotonic() + 20
    while True:
        m = server.metrics()
        if m["openlora_num_running"] == 0 and m["openlora_kv_cache_usage_ratio"] == 0:
            break
        assert time.monotonic() < deadline, m
        time.sleep(0.2)
    rec = None
    while rec is None:  # the receipt is written by a worker thread right after the abort
        got = httpx.get(f"{server.base_url}/receipts/{request_id}", headers=h)
        rec = got.json() if got.status_code == 200 else None
        assert time.monotonic() < deadline + 10, got.text
        time.sleep(0.1)
    assert rec["status"] == "aborted" and rec["completion_tokens"] < 250


def test_metrics_exposed(server, client):
    client.completions.create(model="a3", prompt="t5", max_tokens=3)
    client.completions.create(model="a1", prompt="t5", max_tokens=3)  # a1 has a priced manifest
    m = server.metrics()
    assert m['openlora_requests_total{route="/v1/completions",status="200"}'] >= 1
    assert m["openlora_time_to_first_token_seconds_count"] >= 1
    assert m["openlora_e2e_request_latency_seconds_count"] >= 1
    assert m['openlora_adapter_tokens_total{adapter="a3",kind="completion"}'] >= 3
    assert any(k.startswith('openlora_adapter_state{adapter="a3"') for k in m)
    assert m['openlora_receipts_total{adapter="a1"}'] >= 1 and m['openlora_fees_total{adapter="a1"}'] > 0


def test_merge_requests_over_http(client, offline):
    """The `merge` body field: a served ties merge equals the offline engine's; bad merges are 400/404."""
    merge = {"adapters": [{"id": "a1", "weight": 0.6}, {"id": "a3", "weight": 0.4}], "strategy": "svd", "svd_rank": 4}
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    want = offline.generate([PROMPTS[0]], params, merge=merge)[0].outputs[0].text
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True, "merge": merge})
    assert r.choices[0].text == want
    bad = [
        ({"adapters": ["a1", "a2"], "weights": [1, 1], "strategy": "ties", "density": 1.5}, 400, "density"),
        ({"adapters": ["a1", "a2"], "weights": [1.0], "strategy": "linear"}, 400, "weights"),
        ({"adapters": ["a1", "nope"], "strategy": "linear"}, 404, "nope"),
        ({"adapters": ["a1", "a2"], "strategy": "linear"}, 400, "rank"),  # r=4 and r=6
    ]
    for body, status, word in bad:
        with pytest.raises(openai.APIStatusError) as ei:
            client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=4, extra_body={"merge": body})
        assert ei.value.status_code == status, (body, ei.value)
        assert word in str(ei.value.body["message"]), (body, ei.value.body)
        # Also when the merge fails in its background build: the engine carries the exception itself.
        assert ei.value.body["type"] == ("invalid_request_error" if status == 400 else "not_found_error"), ei.value.body

