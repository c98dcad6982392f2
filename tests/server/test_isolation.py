"""Tenant isolation through the real server (conftest's: keys alice and bob, an admin key, adapter "secret"
restricted to alice): receipts are the payer's, private adapters do not exist for others, and the
prefix cache is per tenant (a client salt narrows it, never widens it)."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from conftest import ADMIN_KEY, API_KEY, OTHER_KEY

from openlora.server.tenancy import Caller, Tenancy

ALICE, BOB = API_KEY, OTHER_KEY


def _client(server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0)


def _get(server, path: str, key: str) -> httpx.Response:
    return httpx.get(server.base_url + path, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def _error(fn) -> tuple[int, dict]:
    with pytest.raises(openai.APIStatusError) as ei:
        fn()
    return ei.value.status_code, ei.value.body


def test_a_receipt_is_its_payers_alone(server):
    r = _client(server, ALICE).completions.create(model="a1", prompt="t5 t6", max_tokens=2, user="bob")
    rid = r.model_extra["attribution"]["receipt_id"]
    mine = _get(server, f"/receipts/{rid}", ALICE)
    assert mine.status_code == 200 and mine.json()["payer"] == "alice"  # the key, not the claimed user
    # Served id and content hash of the base model, never the node's file path.
    assert mine.json()["base_model"] == "tiny" and "/" not in mine.json()["base_model"]
    assert _get(server, f"/receipts/{rid}", ADMIN_KEY).status_code == 200
    unknown_id = "0x" + "ab" * 32
    for path in ("/receipts/{}", "/receipts/{}/proof"):
        theirs, unknown = _get(server, path.format(rid), BOB), _get(server, path.format(unknown_id), BOB)
        assert theirs.status_code == unknown.status_code == 404
        assert theirs.json() == {"error": {**unknown.json()["error"],
                                           "message": unknown.json()["error"]["message"].replace(unknown_id, rid)}}
    assert _get(server, f"/receipts/{rid}/proof", ALICE).status_code == 200


def test_a_private_adapter_does_not_exist_for_others(server):
    bob, alice = _client(server, BOB), _client(server, ALICE)
    assert "secret" not in {m.id for m in bob.models.list().data}
    assert "secret" in {m.id for m in alice.models.list().data}
    seen = _error(lambda: bob.completions.create(model="secret", prompt="t5", max_tokens=2))
    none = _error(lambda: bob.completions.create(model="nosuch", prompt="t5", max_tokens=2))
    assert seen[0] == none[0] == 404
    assert seen[1] == {**none[1], "message": none[1]["message"].replace("nosuch", "secret")}
    # Claiming to be alice changes nothing; naming it in a composition or as a merge source neither.
    for extra in ({"user": "alice"}, {"extra_body": {"adapters": [{"id": "a1"}, {"id": "secret"}]}},
                  {"extra_body": {"merge": {"adapters": ["a1", "secret"], "strategy": "linear"}}}):
        kw = dict(extra)
        model = "secret" if "user" in kw else "tiny"
        status, body = _error(lambda: bob.completions.create(model=model, prompt="t5", max_tokens=2, **kw))
        assert (status, body["message"]) == (404, "adapter 'secret' is not registered"), extra
    chat = _error(lambda: bob.chat.completions.create(model="secret", messages=[{"role": "user", "content": "t5"}]))
    assert chat[0] == 404 and chat[1]["type"] == none[1]["type"]
    assert alice.completions.create(model="secret", prompt="t5", max_tokens=2).choices


def _cached(client: openai.OpenAI, prompt: str, **kw) -> int:
    u = client.completions.create(model="a2", prompt=prompt, max_tokens=1, temperature=0, **kw).usage
    return u.prompt_tokens_details.cached_tokens if u.prompt_tokens_details else 0  # omitted when 0


def test_prefix_cache_hits_within_a_tenant_and_never_across(server):
    alice, bob = _client(server, ALICE), _client(server, BOB)
    prompt = " ".join(f"t{(7 * i) % 90}" for i in range(70))  # several full KV blocks
    assert _cached(alice, prompt) == 0
    assert _cached(alice, prompt) > 0  # her own prompt, again: a hit
    assert _cached(bob, prompt, user="alice") == 0  # the same text from another tenant: no hit, whatever
    assert _cached(bob, prompt) > 0  # the body claims; bob's own copy now hits
    assert _cached(alice, prompt) > 0  # and alice still hits hers (checked both ways)
    # A client salt narrows the scope: alice's salted request misses her unsalted entry, then hits its own.
    assert _cached(alice, prompt, extra_body={"cache_salt": "conversation-1"}) == 0
    assert _cached(alice, prompt, extra_body={"cache_salt": "conversation-1"}) > 0
    # ... and the same salt from bob does not reach alice's salted blocks.
    assert _cached(bob, prompt, extra_body={"cache_salt": "conversation-1"}) == 0


def test_cache_scopes() -> None:
    t = Tenancy({"key-a": "team", "key-b": "team"})
    a, b, c = (Caller(key_id=k, authenticated=True) for k in ("key-a", "key-b", "key-c"))
    assert t.cache_scope(a, None) == t.cache_scope(b, None) == "g:team"  # an operator's opt-in group
    assert t.cache_scope(c, None) == "t:key-c"
    assert t.cache_scope(Caller(key_id="team", authenticated=True), None) == "t:team"  # no collision
    assert t.cache_scope(a, "x") != t.cache_scope(a, None)
    assert t.cache_scope(a, "x") != t.cache_scope(c, "x")
    # With keys, the body's user is no tenant; on a server without keys it is the only label there is.
    assert Caller(key_id=None, user="alice", authenticated=True).tenant == ""
    assert Caller(user="alice").tenant == "alice"
    assert Caller(payer="0xAbC", key_id=None, authenticated=True).tenant == "0xAbC"
    assert Tenancy.owns(Caller(payer="0xabc", authenticated=True), "0xABC")
    assert not Tenancy.owns(Caller(key_id="bob", authenticated=True), "alice")
    assert Tenancy.owns(Caller(key_id="admin", authenticated=True), "alice")
    assert not Tenancy.owns(Caller(authenticated=True), "")  # nobody authenticated owns nothing


def test_run_time_registrations_stay_inside_the_adapter_roots(server, assets, tmp_path):
    """The admin API may only point at folders under --adapter-root (and the command line's folders);
    a hostile adapter inside them (NaN weights) fails its own registration, and serving goes on."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    url, admin = server.base_url + "/adapters", {"Authorization": f"Bearer {ADMIN_KEY}"}
    outside = shutil.copytree(assets["adapter_dir"] / "a2", tmp_path / "elsewhere")
    r = httpx.post(url, json={"id": "stray", "source": str(outside)}, headers=admin, timeout=60)
    assert r.status_code == 400 and "outside the allowed adapter roots" in r.json()["error"]["message"]
    nan = shutil.copytree(assets["adapter_dir"] / "a2", assets["root"] / "nan-adapter")
    sd = load_file(str(nan / "adapter_model.safetensors"))
    first = sorted(sd)[0]
    sd[first] = torch.full_like(sd[first], float("nan"))
    save_file(sd, str(nan / "adapter_model.safetensors"))
    r = httpx.post(url, json={"id": "nan", "source": str(nan)}, headers=admin, timeout=60)
    assert 400 <= r.status_code < 500 or r.status_code == 503, r.text
    assert "NaN or infinite" in r.json()["error"]["message"]
    ok = _client(server, ALICE).completions.create(model="a2", prompt="t5", max_tokens=2)
    assert ok.choices


def test_same_name_with_new_weights_never_reuses_old_kv(server, assets):
    """An adapter id re-registered with other weights has another content hash, so the prompt that hit
    the prefix cache under the old weights misses under the new ones."""
    url, admin = server.base_url + "/adapters", {"Authorization": f"Bearer {ADMIN_KEY}"}
    alice = _client(server, ALICE)
    prompt = " ".join(f"t{(11 * i) % 90}" for i in range(70))

    def cached() -> int:
        u = alice.completions.create(model="swap", prompt=prompt, max_tokens=1, temperature=0).usage
        return u.prompt_tokens_details.cached_tokens if u.prompt_tokens_details else 0

    r = httpx.post(url, json={"id": "swap", "source": str(assets["adapter_dir"] / "a2")}, headers=admin, timeout=60)
    assert r.status_code == 200, r.text
    assert cached() == 0 and cached() > 0
    assert httpx.delete(f"{url}/swap", headers=admin, timeout=60).status_code == 200
    r = httpx.post(url, json={"id": "swap", "source": str(assets["adapter_dir"] / "a3")}, headers=admin, timeout=60)
    assert r.status_code == 200, r.text
    assert cached() == 0  # new weights: the old blocks are not reused
    assert httpx.delete(f"{url}/swap", headers=admin, timeout=60).status_code == 200


def test_outputs_are_bit_identical_alone_and_beside_another_tenants_requests(server):
    """alice's request, greedy with logprobs, alone and again while bob's longer requests (other adapters,
    other lengths) run in the same batches: the same tokens and the same logprobs, bit for bit."""
    import threading

    alice, bob = _client(server, ALICE), _client(server, BOB)
    ask = dict(model="a1", prompt="t5 t9 t33 t2 t71 t8", max_tokens=8, temperature=0, logprobs=3,
               extra_body={"ignore_eos": True})
    alone = alice.completions.create(**ask).choices[0]
    started = threading.Barrier(4)

    def bob_load(model: str, n: int) -> None:
        started.wait()
        bob.completions.create(model=model, prompt=" ".join(f"t{i}" for i in range(3, 3 + n)), max_tokens=40,
                               extra_body={"ignore_eos": True})

    threads = [threading.Thread(target=bob_load, args=a) for a in (("a2", 5), ("a3", 23), ("tiny", 12))]
    for t in threads:
        t.start()
    started.wait()
    time.sleep(0.2)  # bob's requests are running
    beside = alice.completions.create(**ask).choices[0]
    for t in threads:
        t.join(120)
    assert beside.text == alone.text
    assert beside.logprobs.token_logprobs == alone.logprobs.token_logprobs
    assert beside.logprobs.top_logprobs == alone.logprobs.top_logprobs
