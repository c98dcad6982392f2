"""Versioned in-place adapter updates over HTTP: PUT /v1/adapters/{id} (and a POST of a registered id)
swaps versions atomically under load. No request fails; each output equals the offline engine with
the version its receipt names (content hash and manifest version); a prompt cached under the old
version is recomputed under the new one; a broken new version fails the PUT and the old one serves on."""

from __future__ import annotations

import shutil
import threading
import time

import httpx
import openai
import pytest
from conftest import ADMIN_KEY, API_KEY
from helpers import make_peft_adapter, write_manifest

from openlora import SamplingParams

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
ALICE = {"Authorization": f"Bearer {API_KEY}"}
PROMPTS = ["t5 t6 t7 t8", "t40 t41", "t100 t3 t9 t27 t88 t31", "t12 t13", "t77 t2 t61"]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def versions(assets, offline) -> dict:
    """Two versions of one adapter under the server's --adapter-root (v1 with attribution.json 1.0.0, v2
    other weights and rank), registered on the offline engine as upd-v1 / upd-v2 (the oracle), and the
    greedy texts each version gives for PROMPTS."""
    root = assets["root"] / "updates"
    v1 = make_peft_adapter(assets["model"], root / "v1", seed=201, r=4)
    write_manifest(v1, "tiny")
    v2 = make_peft_adapter(assets["model"], root / "v2", seed=202, r=6)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    want = {}
    for name, path in (("v1", v1), ("v2", v2)):
        offline.register_adapter(f"upd-{name}", str(path))
        want[name] = {p: o.outputs[0].text for p, o in zip(PROMPTS, offline.generate(PROMPTS, params,
                                                                                     adapters=f"upd-{name}"))}
    assert all(want["v1"][p] != want["v2"][p] for p in PROMPTS)  # the test can tell the versions apart
    return {"root": root, "v1": v1, "v2": v2, "want": want}


def _manifest_v2() -> dict:
    return {"owner": "0x5B38Da6a701c568545dCfcB03FcB875f56beddC4", "version": "2.0.0", "base_model": "tiny",
            "price_per_1k_prompt_tokens": 2000, "price_per_1k_completion_tokens": 8000,
            "split": {"operator": 2000, "owner": 8000, "data": 0}}


def _receipt(server, receipt_id: str) -> dict:
    r = httpx.get(f"{server.base_url}/receipts/{receipt_id}", headers=ALICE, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def _cached(client: openai.OpenAI, model: str, prompt: str) -> int:
    u = client.completions.create(model=model, prompt=prompt, max_tokens=1, temperature=0).usage
    return u.prompt_tokens_details.cached_tokens if u.prompt_tokens_details else 0


def test_update_under_load(server, versions):
    """Eight clients stream greedy completions without pause while PUT swaps v1 for v2 (with a new
    manifest). Every request succeeds; requests in flight at the swap finish on v1; each text equals the
    offline engine with the version whose content hash its receipt names, and the receipt carries that
    version's manifest version. A prompt cached under v1 misses right after the swap."""
    url = f"{server.base_url}/adapters"
    r = httpx.post(url, json={"id": "upd", "source": str(versions["v1"])}, headers=ADMIN, timeout=60)
    assert r.status_code == 200, r.text
    h1 = r.json()["content_hash"]
    assert h1 and r.json()["version"] == "1.0.0"
    client = openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=120)
    long_prompt = " ".join(f"t{(13 * i) % 90}" for i in range(70))
    assert _cached(client, "upd", long_prompt) == 0 and _cached(client, "upd", long_prompt) > 0

    results: list[tuple[str, str, str, float, float]] = []  # prompt, text, receipt id, start, end
    errors: list[BaseException] = []
    stop = threading.Event()

    def stream(k: int) -> None:
        i = k
        while not stop.is_set():
            p = PROMPTS[i % len(PROMPTS)]
            i += 1
            t0 = time.monotonic()
            try:
                s = client.completions.create(model="upd", prompt=p, max_tokens=MAX_TOKENS, temperature=0, stream=True,
                                              stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
                chunks = list(s)
            except BaseException as e:  # noqa: BLE001  (reported below: no request may fail)
                errors.append(e)
                return
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            results.append((p, text, chunks[-1].model_extra["attribution"]["receipt_id"], t0, time.monotonic()))

    threads = [threading.Thread(target=stream, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while len(results) < 8 and not errors:
        assert time.monotonic() < deadline, "no load"
        time.sleep(0.05)
    r = httpx.put(f"{url}/upd", json={"source": str(versions["v2"]), "manifest": _manifest_v2()}, headers=ADMIN,
                  timeout=60)
    t_swapped = time.monotonic()
    assert r.status_code == 200, r.text
    card = r.json()
    h2 = card["content_hash"]
    assert card["id"] == "upd" and card["version"] == "2.0.0" and h2 and h2 != h1
    n_before = len(results)
    while len(results) < n_before + 16 and not errors:
        assert time.monotonic() < deadline + 60, "no load after the update"
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join(120)
    assert not errors, errors

    served = {}
    for p, text, rid, t0, t1 in results:
        rec = _receipt(server, rid)
        (line,) = rec["adapters"]
        assert line["adapter_id"] == "upd" and line["content_hash"] in (h1, h2)
        v = "v1" if line["content_hash"] == h1 else "v2"
        assert line["version"] == ("1.0.0" if v == "v1" else "2.0.0")
        assert text == versions["want"][v][p], (v, p)
        if t0 > t_swapped:  # sent after the PUT answered
            assert v == "v2"
        served.setdefault(v, []).append((t0, t1))
    # Requests admitted before the swap and still decoding when the PUT answered finished on v1.
    assert any(t1 > t_swapped for _, t1 in served["v1"])
    assert len(served["v2"]) >= 16
    # The KV cached for v1's content is not reused for v2's: a miss, then v2's own blocks hit.
    assert _cached(client, "upd", long_prompt) == 0 and _cached(client, "upd", long_prompt) > 0
    assert httpx.delete(f"{url}/upd", headers=ADMIN, timeout=60).status_code == 200


def test_broken_new_version_fails_the_put_and_the_old_one_serves_on(server, versions):
    """NaN weights and a missing weights file each fail the PUT with 422 naming the loader's error; the
    old version answers as before. PUT needs the admin key (401) and a registered id (404); a POST of a
    registered id replaces its version too."""
    import torch
    from safetensors.torch import load_file, save_file

    url = f"{server.base_url}/adapters"
    r = httpx.post(url, json={"id": "upd2", "source": str(versions["v1"])}, headers=ADMIN, timeout=60)
    assert r.status_code == 200, r.text
    h1 = r.json()["content_hash"]
    client = openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=120)

    def answer() -> tuple[str, str]:
        out = client.completions.create(model="upd2", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                        extra_body={"ignore_eos": True})
        return out.choices[0].text, _receipt(server, out.model_extra["attribution"]["receipt_id"])["adapters"][0][
            "content_hash"]

    assert answer() == (versions["want"]["v1"][PROMPTS[0]], h1)
    nan = shutil.copytree(versions["v2"], versions["root"] / "v2-nan")
    sd = load_file(str(nan / "adapter_model.safetensors"))
    first = sorted(sd)[0]
    sd[first] = torch.full_like(sd[first], float("nan"))
    save_file(sd, str(nan / "adapter_model.safetensors"))
    missing = shutil.copytree(versions["v2"], versions["root"] / "v2-missing")
    (missing / "adapter_model.safetensors").unlink()
    for folder, words in ((nan, "NaN or infinite"), (missing, "adapter_model")):
        r = httpx.put(f"{url}/upd2", json={"source": str(folder)}, headers=ADMIN, timeout=60)
        assert r.status_code == 422 and r.json()["error"]["type"] == "adapter_load_error", r.text
        assert words in r.json()["error"]["message"], r.text
        assert answer() == (versions["want"]["v1"][PROMPTS[0]], h1)
    body = {"source": str(versions["v2"])}
    assert httpx.put(f"{url}/upd2", json=body, timeout=60).status_code == 401
    assert httpx.put(f"{url}/upd2", json=body, headers=ALICE, timeout=60).status_code == 401
    r = httpx.put(f"{url}/nobody", json=body, headers=ADMIN, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
    r = httpx.put(f"{url}/upd2", json={"source": str(server.log_path)}, headers=ADMIN, timeout=60)
    assert r.status_code in (400, 422), r.text  # not an adapter folder
    r = httpx.post(url, json={"id": "upd2", "source": str(versions["v2"])}, headers=ADMIN, timeout=60)
    assert r.status_code == 200 and r.json()["content_hash"] not in ("", None, h1), r.text
    assert answer() == (versions["want"]["v2"][PROMPTS[0]], r.json()["content_hash"])
    assert httpx.delete(f"{url}/upd2", headers=ADMIN, timeout=60).status_code == 200
