"""Per-request merges through the engine: PEFT parity of the served logits, the merge cache, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import load_hf

from openlora import LLM, SamplingParams
from openlora.errors import AdapterNotFound, InvalidRequest

ATOL = 1e-4  # the engine-vs-transformers tolerance; merged A/B themselves match PEFT to 1e-5 (test_merge.py)
PROMPT = [5, 17, 33, 2, 90, 11, 64]


@pytest.fixture(scope="module")
def env(tiny_model_factory, tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    path = tiny_model_factory("llama")
    root = tmp_path_factory.mktemp("merge_adapters")
    base = load_hf(path)
    specs = {"a": dict(r=8, lora_alpha=16), "b": dict(r=8, lora_alpha=8), "c4": dict(r=4, lora_alpha=8)}
    for i, (name, kw) in enumerate(specs.items()):
        torch.manual_seed(10 + i)
        pm = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, target_modules="all-linear", **kw))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.mul_(3.0)
        pm.save_pretrained(str(root / name))
    llm = LLM(str(path), dtype="float32", block_size=4, num_kv_blocks=128)
    for name in specs:
        llm.register_adapter(name, str(root / name))
    return path, root, llm


def engine_logits(llm, merge, n=4):
    cap: list = []
    llm.engine.runner.capture_logits = cap
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), merge=merge)[0]
    llm.engine.runner.capture_logits = None
    assert out.error is None, out.error
    return out.outputs[0].token_ids, torch.stack([r for _, r in cap])


def peft_merged_logits(path, root, strategy, weights, toks, **kw):
    from peft import PeftModel

    m = PeftModel.from_pretrained(load_hf(path), str(root / "a"), adapter_name="a")
    m.load_adapter(str(root / "b"), adapter_name="b")
    m.add_weighted_adapter(["a", "b"], weights, "m", combination_type=strategy, **kw)
    m.set_adapter("m")
    with torch.no_grad():
        return m(torch.tensor([PROMPT + toks])).logits[0, len(PROMPT) - 1: len(PROMPT) - 1 + len(toks)]


@pytest.mark.parametrize("strategy,kw", [
    ("cat", {}), ("linear", {}), ("ties", {"density": 0.5}), ("magnitude_prune", {"density": 0.6}),
    ("svd", {"svd_rank": 6}), ("ties_svd", {"density": 0.7, "svd_rank": 8}),
])
def test_served_merge_equals_peft(env, strategy, kw):
    path, root, llm = env
    weights = [0.7, 0.4]
    merge = {"adapters": [{"id": "a", "weight": 0.7}, {"id": "b", "weight": 0.4}], "strategy": strategy, **kw}
    toks, got = engine_logits(llm, merge)
    peft_kw = {k: v for k, v in kw.items() if k in ("density",)}
    if "svd_rank" in kw:
        peft_kw["svd_rank"] = kw["svd_rank"]
    want = peft_merged_logits(path, root, strategy, weights, toks, **peft_kw)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_merge_cache_and_usage_sources(env):
    _, _, llm = env
    events = []
    llm.engine.usage_listeners.append(events.append)
    merge = {"adapters": [{"id": "a", "weight": 0.5}, {"id": "b", "weight": 0.5}], "strategy": "ties", "density": 0.3}
    stats = llm.engine.merges.stats
    built, hits = stats["merges_built"], stats["merge_cache_hits"]
    t1, _ = engine_logits(llm, merge)
    t2, _ = engine_logits(llm, merge)
    assert t1 == t2
    assert stats["merges_built"] == built + 1 and stats["merge_cache_hits"] == hits + 1
    ev = events[-1]
    assert [a.adapter_id for a in ev.adapters] == ["a", "b"] and all(a.content_hash for a in ev.adapters)
    assert ev.merge["strategy"] == "ties" and ev.merge["merged_adapter"].startswith("merge:")
    llm.engine.usage_listeners.remove(events.append)


def test_dare_seeded_reproducible_and_density_one_is_linear(env):
    _, _, llm = env
    ab = [{"id": "a", "weight": 0.6}, {"id": "b", "weight": 0.9}]
    t1, l1 = engine_logits(llm, {"adapters": ab, "strategy": "dare_linear", "density": 0.5, "seed": 3})
    t2, l2 = engine_logits(llm, {"adapters": ab, "strategy": "dare_linear", "density": 0.5, "seed": 3})
    # Same merged adapter (a cache hit); the second run reads its prompt KV from the prefix cache,
    # which rounds differently in the last bits, hence 1e-5 rather than bit equality.
    assert t1 == t2
    torch.testing.assert_close(l1, l2, atol=1e-5, rtol=0)
    _, l4 = engine_logits(llm, {"adapters": ab, "strategy": "dare_linear", "density": 0.5, "seed": 4})
    assert (l4 - l1).abs().max() > 1e-3  # another seed draws another mask
    _, l3 = engine_logits(llm, {"adapters": ab, "strategy": "dare_linear", "density": 1.0, "seed": 3})
    _, lin = engine_logits(llm, {"adapters": ab, "strategy": "linear"})
    torch.testing.assert_close(l3, lin, atol=1e-5, rtol=0)


def test_bad_merge_requests(env):
    _, _, llm = env
    p = SamplingParams(max_tokens=2)
    with pytest.raises(InvalidRequest, match="density"):
        llm.generate([PROMPT], p, merge={"adapters": ["a", "b"], "weights": [1, 1], "strategy": "ties", "density": 1.5})
    with pytest.raises(InvalidRequest, match="weights"):
        llm.generate([PROMPT], p, merge={"adapters": ["a", "b"], "weights": [1.0], "strategy": "linear"})
    with pytest.raises(InvalidRequest, match="strategy"):
        llm.generate([PROMPT], p, merge={"adapters": ["a", "b"], "strategy": "average"})
    with pytest.raises(AdapterNotFound):
        llm.generate([PROMPT], p, merge={"adapters": ["a", "nope"], "strategy": "linear"})
    with pytest.raises(InvalidRequest, match="equal rank"):  # sources already in host memory: immediate 400
        llm.generate([PROMPT], p, merge={"adapters": ["a", "c4"], "strategy": "linear"})
    # Sources not in host memory yet: the rank check runs in the background build, and the request's
    # output carries the exception itself (HTTP: 400 invalid_request_error, not internal_error).
    _, root, _ = env
    llm.lora.register("b_cold", str(root / "b"))  # registered, not loaded
    llm.lora.register("c4_cold", str(root / "c4"))
    out = llm.generate([PROMPT], p, merge={"adapters": ["b_cold", "c4_cold"], "strategy": "linear"})[0]
    assert isinstance(out.exc, InvalidRequest) and "equal rank" in out.error and out.error_status == 400, out
    # The engine keeps serving.
    assert llm.generate([PROMPT], p)[0].outputs[0].token_ids
