"""Thousands of adapters per machine: 2,000 registered PEFT folders, a 16-slot device pool and a 64-entry
host cache serve a random, partly Zipf-skewed workload. Every output must equal the same request run
alone (fresh engine, only its adapter registered) and run in small batches; the pool never holds more
than max_loras adapters; evictions follow LRU among idle adapters; a corrupt adapter fails only its own
requests and works again once fixed."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from openlora import LLM, SamplingParams
from openlora.config import ModelConfig

N_ADAPTERS = 2000
MAX_LORAS = 16
MAX_CPU = 64


def write_random_adapter(folder: Path, num_layers: int, q: tuple[int, int], v: tuple[int, int], rank: int,
                         seed: int, base: str = "") -> Path:
    """A PEFT-format LoRA adapter on q_proj and v_proj with random weights, written directly (no peft).
    `q` / `v` are the (in, out) features of the projections."""
    rng = np.random.default_rng(seed)
    t = {}
    for layer in range(num_layers):
        for site, (fin, fout) in (("q_proj", q), ("v_proj", v)):
            pre = f"base_model.model.model.layers.{layer}.self_attn.{site}"
            t[f"{pre}.lora_A.weight"] = (rng.standard_normal((rank, fin)) * 0.3).astype(np.float32)
            t[f"{pre}.lora_B.weight"] = (rng.standard_normal((fout, rank)) * 0.3).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(t, str(folder / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
           "target_modules": ["q_proj", "v_proj"], "bias": "none", "base_model_name_or_path": base}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


def write_adapters(model: Path, root: Path, n: int, seed: int = 0) -> list[str]:
    """n adapters named a0000.. under root, ranks 2..8; returns the names."""
    mc = ModelConfig.from_pretrained(model)
    s = mc.shape
    rng = random.Random(seed)
    names = []
    for i in range(n):
        name = f"a{i:04d}"
        write_random_adapter(root / name, s.num_layers, s.site_dims("q_proj"), s.site_dims("v_proj"),
                             rng.randint(2, 8), seed=1000 + i)
        names.append(name)
    return names


def zipf_choice(rng: random.Random, names: list[str], s: float = 1.0) -> str:
    weights = [1.0 / (k + 1) ** s for k in range(len(names))]
    return rng.choices(names, weights)[0]


@pytest.fixture(scope="module")
def world(tiny_model_factory, tmp_path_factory):
    model = tiny_model_factory("llama")
    root = tmp_path_factory.mktemp("adapters2000")
    names = write_adapters(model, root, N_ADAPTERS)
    return model, root, names


def make_workload(names: list[str], n: int = 300, seed: int = 7) -> list[tuple[str, list[int], int]]:
    """(adapter, prompt ids, max_tokens): half uniform over all adapters, half Zipf-skewed; a few base."""
    rng = random.Random(seed)
    hot = rng.sample(names, 200)
    out = []
    for i in range(n):
        if i % 25 == 0:
            ad = None
        elif i % 2:
            ad = rng.choice(names)
        else:
            ad = zipf_choice(rng, hot)
        prompt = [rng.randint(3, 255) for _ in range(rng.randint(3, 10))]
        out.append((ad, prompt, rng.randint(2, 5)))
    return out


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def run_step_by_step(llm: LLM, work, bad: str | None = None):
    """Submit everything, step until done; check the pool bound after every step and the LRU rule at
    every eviction. Returns {index: RequestOutput}."""
    eng, lora = llm.engine, llm.lora
    evict = lora.slots._evict_one
    checked = []

    def checked_evict(now, keep):
        idle = [x for x in lora.slots._resident if not x.holders and not x.waiting and not x.pinned and x not in keep]
        expect = min(idle, key=lambda x: x.last_used).adapter_id if idle else None
        n = len(lora.eviction_log)
        ok = evict(now, keep)
        if ok and expect is not None:
            checked.append(lora.eviction_log[n])
            assert lora.eviction_log[n] == expect, "device eviction must pick the LRU idle adapter"
        return ok

    lora.slots._evict_one = checked_evict
    sched = eng.scheduler.schedule

    def schedule():
        out = sched()
        distinct = {u.adapter_id for s in out.scheduled for u in s.request.adapters}
        assert len(distinct) <= MAX_LORAS, f"{len(distinct)} adapters in one step"
        return out

    eng.scheduler.schedule = schedule
    for i, (ad, prompt, mt) in enumerate(work):
        eng.add_request(f"r{i}", prompt, greedy(mt), adapters=ad)
    final = {}
    steps = 0
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                final[int(out.request_id[1:])] = out
        steps += 1
        assert lora.num_resident() <= MAX_LORAS
        assert steps < 20000
    lora.slots._evict_one = evict
    eng.scheduler.schedule = sched
    return final, checked


def test_2000_adapters_mixed_workload(world, tmp_path):
    model, root, names = world
    llm = LLM(str(model), max_loras=MAX_LORAS, max_cpu_loras=MAX_CPU, max_num_seqs=32, num_kv_blocks=512,
              max_model_len=64)
    registered = llm.lora.register_dir(root)
    assert len(registered) == N_ADAPTERS
    snap = llm.lora.snapshot()
    assert snap["counts"]["registered"] == N_ADAPTERS and snap["host"] == 0  # nothing loaded yet

    work = make_workload(names)
    # One adapter's weights are corrupt: only its requests may fail.
    bad = work[1][0]
    bad_file = root / bad / "adapter_model.safetensors"
    good_bytes = bad_file.read_bytes()
    bad_file.write_bytes(b"\x00garbage" * 10)
    bad_idx = {i for i, w in enumerate(work) if w[0] == bad}

    final, checked = run_step_by_step(llm, work)
    assert len(final) == len(work)
    assert len(checked) > 20, "the workload must force many LRU evictions"
    for i, out in final.items():
        if i in bad_idx:
            assert out.outputs[0].finish_reason == "error" and out.error and bad in out.error
        else:
            assert out.error is None and out.outputs[0].finish_reason == "length", (i, out.error)
    assert llm.lora.card(bad)["state"] == "failed"
    snap = llm.lora.snapshot()
    assert snap["resident"] <= MAX_LORAS and snap["host"] <= MAX_CPU
    assert snap["adapters"][bad]["state"] == "failed"
    assert llm.lora.stats["evictions"] >= 20 and llm.lora.stats["host_evictions"] > 0

    # Fixed files: a new request retries the adapter and succeeds.
    bad_file.write_bytes(good_bytes)
    i0 = min(bad_idx)
    fixed = llm.generate([work[i0][1]], greedy(work[i0][2]), adapters=bad)[0]
    assert fixed.error is None

    # Same requests in small batches (4 at a time) on a fresh engine.
    ref = LLM(str(model), max_loras=MAX_LORAS, max_cpu_loras=MAX_CPU, max_num_seqs=32, num_kv_blocks=512,
              max_model_len=64)
    used = sorted({w[0] for w in work if w[0]})
    for n in used:
        ref.register_adapter(n, str(root / n), load=False)
    small = {}
    for k in range(0, len(work), 4):
        chunk = list(range(k, min(k + 4, len(work))))
        outs = ref.generate([work[i][1] for i in chunk], [greedy(work[i][2]) for i in chunk],
                            adapters=[work[i][0] for i in chunk])
        small.update(zip(chunk, outs))
    assert fixed.outputs[0].token_ids == small[i0].outputs[0].token_ids
    for i, out in final.items():
        if i not in bad_idx:
            assert out.outputs[0].token_ids == small[i].outputs[0].token_ids, f"request {i} ({work[i][0]})"
    ref.lora.shutdown()

    # A random sample against a fresh engine holding only that request's adapter.
    rng = random.Random(3)
    sample = rng.sample([i for i in range(len(work)) if work[i][0] and i not in bad_idx], 20)
    for i in sample:
        ad, prompt, mt = work[i]
        solo = LLM(str(model), max_loras=1, max_cpu_loras=1, num_kv_blocks=64, max_model_len=64)
        solo.register_adapter(ad, str(root / ad))
        got = solo.generate([prompt], greedy(mt), adapters=ad)[0]
        solo.lora.shutdown()
        assert final[i].outputs[0].token_ids == got.outputs[0].token_ids, f"request {i} ({ad})"
    llm.lora.shutdown()
