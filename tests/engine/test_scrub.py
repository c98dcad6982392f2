"""Scrubbing freed memory (CacheConfig.scrub_freed_memory, on by default): once requests are done their KV
blocks are zero, except full blocks the prefix cache keeps for their tenant; an unloaded adapter's pool
rows are zero. With scrubbing off the data stays (the test can see the difference)."""

from __future__ import annotations

import torch

from openlora import LLM, SamplingParams

PROMPTS = [[5, 9, 33, 2, 71, 8, 100, 42, 17], [3, 4], list(range(10, 47))]
P = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def _nonzero_blocks(llm: LLM) -> set[int]:
    kv = llm.engine.runner.kv  # [layers, 2, num_blocks, block_size, kv_heads, head_dim]
    return set(torch.nonzero(kv.abs().sum(dim=(0, 1, 3, 4, 5))).flatten().tolist())


def test_no_kv_left_after_requests_without_prefix_caching(tiny_model_factory):
    path = str(tiny_model_factory("llama"))
    llm = LLM(path, dtype="float32", block_size=4, num_kv_blocks=64, enable_prefix_caching=False)
    out = llm.generate(PROMPTS, P)
    assert all(len(o.outputs[0].token_ids) == 6 for o in out)
    assert _nonzero_blocks(llm) == set()
    kept = LLM(path, dtype="float32", block_size=4, num_kv_blocks=64, enable_prefix_caching=False,
               scrub_freed_memory=False)
    assert [o.outputs[0].token_ids for o in kept.generate(PROMPTS, P)] == [o.outputs[0].token_ids for o in out]
    assert _nonzero_blocks(kept)  # without scrubbing the last requests' KV is still there


def test_only_prefix_cached_blocks_remain(tiny_model_factory):
    llm = LLM(str(tiny_model_factory("llama")), dtype="float32", block_size=4, num_kv_blocks=64)
    llm.generate(PROMPTS, P)
    pool = llm.engine.kv.pool
    cached = {b for b in range(pool.num_blocks) if pool.block_hash[b] is not None}
    assert cached and _nonzero_blocks(llm) == cached


def test_an_unloaded_adapters_rows_are_zeroed(tiny_model_factory, tmp_path):
    from peft import LoraConfig, get_peft_model
    from tiny_models import load_hf

    path = tiny_model_factory("llama")
    torch.manual_seed(0)
    pm = get_peft_model(load_hf(path), LoraConfig(r=4, init_lora_weights=False, target_modules=["q_proj", "v_proj"]))
    pm.save_pretrained(str(tmp_path / "ad"))
    llm = LLM(str(path), dtype="float32", block_size=4, num_kv_blocks=64)
    llm.register_adapter("ad", str(tmp_path / "ad"))
    llm.generate(PROMPTS[:1], P, adapters="ad")
    a, bt = llm.lora.pool_tensors()
    assert any(t.abs().sum() > 0 for t in a.values())
    llm.lora.unregister("ad")
    assert all(t.abs().sum() == 0 for t in (*a.values(), *bt.values()))
