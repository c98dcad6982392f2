"""Versioned in-place adapter updates, offline (LLMEngine + LoRAManager.update): requests bound to the old
version finish on it and equal PEFT with it, later ones equal PEFT with the new version; usage events
name the content hash that served; a bad new version changes nothing; nothing cached for the old
content (prefix-cache blocks, merges) is reused for the new."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
from engine_steps import drain
from tiny_models import load_hf

from openlora import LLM, SamplingParams
from openlora.errors import AdapterLoadError, AdapterNotFound

STEPS = 6


def greedy(n: int = STEPS) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


@pytest.fixture(scope="module")
def setup(tiny_model_factory, tmp_path_factory):
    """The tiny model, two versions of one adapter (v1, v2: other seeds and ranks), a second adapter for
    merges, and each version's PEFT model (the oracle)."""
    from peft import LoraConfig, get_peft_model

    model = tiny_model_factory("llama")
    root = tmp_path_factory.mktemp("update_adapters")
    base = load_hf(model)
    peft = {}
    for name, seed, r in (("v1", 1, 4), ("v2", 2, 6), ("other", 3, 4)):
        torch.manual_seed(seed)
        cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                         init_lora_weights=False, lora_dropout=0.0)
        pm = get_peft_model(copy.deepcopy(base), cfg).eval()
        with torch.no_grad():  # large enough that the two versions generate different tokens
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.normal_(0.0, 0.3)
        pm.save_pretrained(str(root / name))
        peft[name] = pm
    return model, root, peft


def peft_greedy(pm, prompt: list[int], n: int = STEPS) -> list[int]:
    """PEFT's greedy continuation of `prompt` (full forward each step, fp32)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(pm(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def make_llm(model: Path, **kw) -> LLM:
    opts = dict(dtype="float32", max_loras=2, max_cpu_loras=4, max_num_seqs=2, num_kv_blocks=256, max_model_len=64,
                block_size=4)
    opts.update(kw)
    return LLM(str(model), **opts)


def prompt(i: int) -> list[int]:
    return [(7 * i + j) % 90 + 5 for j in range(5 + i % 4)]


def test_update_while_requests_run_and_queue(setup):
    """Requests running and queued on v1 when the update lands finish on v1; requests added after it run
    on v2; each equals PEFT with its own version; usage events name the hash that served; the old
    version's device rows are freed once its last request ends."""
    model, root, peft = setup
    llm = make_llm(model)
    events = []
    llm.engine.usage_listeners.append(events.append)
    llm.register_adapter("ad", str(root / "v1"))
    h1 = llm.lora.card("ad")["content_hash"]
    eng = llm.engine
    for i in range(4):  # max_num_seqs=2: two run, two wait in the queue
        eng.add_request(f"old{i}", prompt(i), greedy(), adapters="ad")
    eng.step()
    eng.step()
    replaced = llm.lora.update("ad", str(root / "v2"))
    assert replaced == h1
    h2 = llm.lora.card("ad")["content_hash"]
    assert h2 and h2 != h1
    for i in range(4, 7):
        eng.add_request(f"new{i}", prompt(i), greedy(), adapters="ad")
    final = drain(llm)
    assert all(o.error is None for o in final.values())
    for rid, o in final.items():
        i = int(rid[3:])
        version = "v1" if rid.startswith("old") else "v2"
        assert peft_greedy(peft["v1"], prompt(i)) != peft_greedy(peft["v2"], prompt(i))  # the test can tell
        assert o.outputs[0].token_ids == peft_greedy(peft[version], prompt(i)), (rid, version)
    served = {ev.request_id: ev.adapters[0].content_hash for ev in events}
    assert served == {rid: h1 if rid.startswith("old") else h2 for rid in final}
    assert llm.lora.resident_ids() == ["ad"]  # v1 left the device with its last request
    assert llm.lora.snapshot()["host"] == 1
    llm.lora.shutdown()


def test_bad_new_version_keeps_the_old_one_serving(setup, tmp_path):
    """A new version with NaN weights, or a folder that does not exist, fails the update with the
    loader's error; the old version keeps serving. Updating an unknown id is AdapterNotFound."""
    from safetensors.torch import load_file, save_file

    model, root, peft = setup
    llm = make_llm(model)
    llm.register_adapter("ad", str(root / "v1"))
    before = llm.lora.card("ad")
    nan = shutil.copytree(root / "v2", tmp_path / "nan")
    sd = load_file(str(nan / "adapter_model.safetensors"))
    first = sorted(sd)[0]
    sd[first] = torch.full_like(sd[first], float("nan"))
    save_file(sd, str(nan / "adapter_model.safetensors"))
    with pytest.raises(AdapterLoadError, match="NaN or infinite"):
        llm.lora.update("ad", str(nan))
    with pytest.raises(AdapterNotFound):
        llm.lora.update("ad", str(tmp_path / "nowhere"))
    with pytest.raises(AdapterLoadError, match="NaN or infinite"):  # re-registering with load checks first too
        llm.register_adapter("ad", str(nan))
    with pytest.raises(AdapterNotFound):
        llm.lora.update("unknown", str(root / "v2"))
    assert llm.lora.card("ad")["content_hash"] == before["content_hash"]
    assert llm.lora.card("unknown") is None
    out = llm.generate([prompt(1)], greedy(), adapters="ad")[0]
    assert out.outputs[0].token_ids == peft_greedy(peft["v1"], prompt(1))
    assert llm.lora.snapshot()["host"] == 1  # the failed versions left nothing in host memory
    llm.lora.shutdown()


def test_prefix_cached_under_the_old_version_is_recomputed(setup):
    """A prompt cached under v1 hits under v1, misses right after the update, then hits under v2."""
    model, root, peft = setup
    llm = make_llm(model, enable_prefix_caching=True)
    llm.register_adapter("ad", str(root / "v1"))
    p = [(5 * j) % 90 + 3 for j in range(24)]

    def run() -> tuple[int, list[int]]:
        o = llm.generate([p], greedy(3), adapters="ad")[0]
        return o.num_cached_tokens, o.outputs[0].token_ids

    assert run()[0] == 0 and run()[0] > 0
    llm.lora.update("ad", str(root / "v2"))
    cached, toks = run()
    assert cached == 0 and toks == peft_greedy(peft["v2"], p, 3)
    assert run()[0] > 0
    llm.lora.shutdown()


def test_a_merge_of_the_old_version_is_never_reused(setup):
    """An SVD merge cached for (ad=v1, other) is rebuilt once ad is updated, and equals the same merge
    made with v2 on a fresh engine; a merge keyed before the update refuses to build from v2."""
    model, root, _ = setup
    merge = {"adapters": [{"id": "ad", "weight": 0.7}, {"id": "other", "weight": 0.5}], "strategy": "svd",
             "svd_rank": 4}
    p = prompt(2)
    llm = make_llm(model)
    events = []
    llm.engine.usage_listeners.append(events.append)
    llm.register_adapter("ad", str(root / "v1"))
    llm.register_adapter("other", str(root / "other"))
    h1 = llm.lora.card("ad")["content_hash"]
    first = llm.generate([p], greedy(), merge=merge)[0].outputs[0].token_ids
    assert llm.generate([p], greedy(), merge=merge)[0].outputs[0].token_ids == first
    stats = llm.engine.merges.stats
    assert (stats["merges_built"], stats["merge_cache_hits"]) == (1, 1)
    stale = llm.lora.identity("ad")
    llm.lora.update("ad", str(root / "v2"))
    after = llm.generate([p], greedy(), merge=merge)[0].outputs[0].token_ids
    assert stats["merges_built"] == 2
    # Usage events name the source versions each merge was built from.
    assert [ev.adapters[0].content_hash for ev in events] == [h1, h1, llm.lora.card("ad")["content_hash"]]
    with pytest.raises(AdapterLoadError, match="was updated"):
        llm.lora.source_adapter("ad", stale)
    fresh = make_llm(model)
    fresh.register_adapter("ad", str(root / "v2"))
    fresh.register_adapter("other", str(root / "other"))
    assert after == fresh.generate([p], greedy(), merge=merge)[0].outputs[0].token_ids
    llm.lora.shutdown()
    fresh.lora.shutdown()


def test_same_id_registered_lazily_is_replaced_too(setup):
    """register() without load on a busy id replaces it (no more 'in use' refusal): its queued requests
    keep the old version."""
    model, root, peft = setup
    llm = make_llm(model)
    llm.register_adapter("ad", str(root / "v1"))
    llm.engine.add_request("old", prompt(0), greedy(), adapters="ad")
    llm.lora.register("ad", str(root / "v2"))  # not loaded yet: the first request loads it
    llm.engine.add_request("new", prompt(0), greedy(), adapters="ad")
    final = drain(llm)
    assert final["old"].outputs[0].token_ids == peft_greedy(peft["v1"], prompt(0))
    assert final["new"].outputs[0].token_ids == peft_greedy(peft["v2"], prompt(0))
    llm.lora.shutdown()
