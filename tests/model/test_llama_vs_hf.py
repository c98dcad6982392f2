"""Ladder rung: the engine's logits and greedy tokens against transformers, fp32, tolerance 1e-4."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ARCHS, load_hf

from openlora import LLM, SamplingParams

ATOL = 1e-4  # fp32: same math, different kernels (fused qkv, paged attention, SDPA)


def engine_run(path, prompts, max_tokens, **opts):
    """Greedy-generate with the engine; return (outputs, {request index: [logits per sampled token]})."""
    llm = LLM(str(path), dtype="float32", **opts)
    cap: list = []
    llm.engine.runner.capture_logits = cap
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    by_req: dict[int, list[torch.Tensor]] = {}
    for rid, row in cap:
        by_req.setdefault(int(rid.split("-")[1]), []).append(row)
    return llm, outs, by_req


def check_against_hf(hf, prompts, outs, logits):
    for i, (p, o) in enumerate(zip(prompts, outs)):
        ids = torch.tensor([p + o.outputs[0].token_ids])
        with torch.no_grad():
            ref = hf(ids).logits[0]  # [L, V]
        got = torch.stack(logits[i])  # [max_tokens, V]
        want = ref[len(p) - 1: len(p) - 1 + got.shape[0]]
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
        with torch.no_grad():
            gen = hf.generate(torch.tensor([p]), max_new_tokens=len(o.outputs[0].token_ids), do_sample=False,
                              min_new_tokens=len(o.outputs[0].token_ids), pad_token_id=0)
        assert gen[0, len(p):].tolist() == o.outputs[0].token_ids


PROMPTS = [[5, 9, 33, 2, 71, 8, 100, 42, 17], [3, 4], list(range(10, 47)), [200, 201, 202, 203, 204, 205]]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_batch_of_different_lengths(tiny_model_factory, arch):
    path = tiny_model_factory(arch)
    hf = load_hf(path)
    _, outs, logits = engine_run(path, PROMPTS, 12, block_size=4, num_kv_blocks=128)
    check_against_hf(hf, PROMPTS, outs, logits)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_single_sequence_long_decode(tiny_model_factory, arch):
    path = tiny_model_factory(arch)
    _, outs, logits = engine_run(path, [PROMPTS[0]], 60, block_size=4, num_kv_blocks=64)
    check_against_hf(load_hf(path), [PROMPTS[0]], outs, logits)


@pytest.mark.parametrize("arch", ["llama", "llama3"])
def test_chunked_prefill(tiny_model_factory, arch):
    path = tiny_model_factory(arch)
    prompts = [list(range(3, 60)), [7, 8, 9]]
    llm, outs, logits = engine_run(path, prompts, 10, block_size=4, num_kv_blocks=128, max_num_batched_tokens=8)
    assert llm.engine.stats["steps"] > 8  # the 57-token prompt took several chunks
    check_against_hf(load_hf(path), prompts, outs, logits)


def test_preempted_and_recomputed(tiny_model_factory):
    path = tiny_model_factory("llama")
    prompts = [[i + 3, i + 4, i + 5, i + 6, i + 7, i + 8, i + 9, i + 10] for i in range(4)]
    # 4 sequences x (8 + 20) tokens need 28 blocks of 4; give 14 so some must be preempted.
    llm, outs, logits = engine_run(path, prompts, 20, block_size=4, num_kv_blocks=14, max_model_len=56)
    assert llm.engine.scheduler.num_preemptions > 0
    check_against_hf(load_hf(path), prompts, outs, logits)


def test_prefix_cache_hit_gives_same_logits(tiny_model_factory):
    path = tiny_model_factory("qwen2")
    llm = LLM(str(path), dtype="float32", block_size=4, num_kv_blocks=64)
    p = list(range(20, 45))
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    a = llm.generate([p], params)[0]
    b = llm.generate([p], params)[0]
    assert b.num_cached_tokens == 24 and a.num_cached_tokens == 0
    assert a.outputs[0].token_ids == b.outputs[0].token_ids


def test_bfloat16_close_to_hf(tiny_model_factory):
    path = tiny_model_factory("llama")
    hf = load_hf(path, torch.bfloat16)
    llm = LLM(str(path), dtype="bfloat16", block_size=4, num_kv_blocks=64)
    cap: list = []
    llm.engine.runner.capture_logits = cap
    llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=1))
    with torch.no_grad():
        ref = hf(torch.tensor([PROMPTS[0]])).logits[0, -1].float()
    # bf16 has 8 mantissa bits; the two implementations round differently in places.
    torch.testing.assert_close(cap[0][1], ref, atol=0.05, rtol=0.02)


def test_gather_sdpa_decode_path_matches_hf(tiny_model_factory):
    """The portable decode path (gather + SDPA, used on GPUs or when the C++ kernel is missing)."""
    path = tiny_model_factory("mistral")
    llm = LLM(str(path), dtype="float32", block_size=4, num_kv_blocks=128, kernels="attention=sdpa")
    assert not llm.engine.runner.plan.paged_attention
    cap: list = []
    llm.engine.runner.capture_logits = cap
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    rows: dict[int, list] = {}
    for rid, row in cap:
        rows.setdefault(int(rid.split("-")[1]), []).append(row)
    check_against_hf(load_hf(path), PROMPTS, outs, rows)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_portable_kernel_plan_matches_hf(tiny_model_factory, arch):
    """Every part of the plan forced to its portable path (F.linear, torch SGMV, gather + SDPA, torch
    composites, Python loop: what a machine without our extensions runs) still matches transformers."""
    path = tiny_model_factory(arch)
    kernels = "linear=torch,lora=torch,attention=sdpa,fused_ops=off,layer_loop=python"
    llm, outs, logits = engine_run(path, PROMPTS, 10, block_size=4, num_kv_blocks=128, kernels=kernels)
    assert llm.engine.runner.plan.describe() == "linear=torch lora=torch attention=sdpa fused=off loop=python"
    check_against_hf(load_hf(path), PROMPTS, outs, logits)


def test_sliding_window_matches_hf(tiny_model_factory):
    """A window (8) shorter than the prompts: row-wise prefill rows and decode rows both see only the last
    8 positions, as transformers' Mistral masks them."""
    path = tiny_model_factory("mistral", sliding_window=8)
    llm, outs, logits = engine_run(path, PROMPTS, 12, block_size=4, num_kv_blocks=128)
    assert llm.engine.runner.config.model.sliding_window == 8
    check_against_hf(load_hf(path), PROMPTS, outs, logits)


def test_row_wise_and_sdpa_prefill_chunks_in_one_batch(tiny_model_factory, monkeypatch):
    """With the row-wise limit lowered to 8 tokens, the 9- and 37-token prompts take the SDPA prefill branch
    while the 2- and 6-token ones join the decode rows in the C++ call, all in the same steps."""
    from openlora.worker import model_runner

    monkeypatch.setattr(model_runner, "FUSED_PREFILL_MAX_TOKENS", 8)
    path = tiny_model_factory("qwen2")
    llm, outs, logits = engine_run(path, PROMPTS, 10, block_size=4, num_kv_blocks=128)
    assert llm.engine.runner.plan.paged_attention
    check_against_hf(load_hf(path), PROMPTS, outs, logits)
