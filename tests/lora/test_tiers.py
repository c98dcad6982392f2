"""Adapter tiers and adapter-aware scheduling on a tiny model: background loads never block the step,
LRU eviction order, bounded host cache with prefetch, fairness across adapters under a flood, failures,
unregister while serving, and an s3:// adapter equal to the same adapter from a local folder."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from engine_steps import drain
from test_many_adapters import write_random_adapter
from test_sources import free_port, moto_url, s3, upload  # noqa: F401  (fixtures)

import openlora.lora.host_cache as host_cache_mod
from openlora import LLM, SamplingParams
from openlora.config import ModelConfig
from openlora.errors import AdapterNotFound


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tiny_model_factory, tmp_path_factory):
    model = tiny_model_factory("llama")
    s = ModelConfig.from_pretrained(model).shape
    root = tmp_path_factory.mktemp("tier_adapters")
    for i, name in enumerate("ABCDEFGH"):
        write_random_adapter(root / name, s.num_layers, s.site_dims("q_proj"), s.site_dims("v_proj"), 2 + i % 4,
                             seed=50 + i)
    return model, root, s


def make_llm(model: Path, root: Path, names: str, **kw) -> LLM:
    opts = dict(max_loras=2, max_cpu_loras=8, max_num_seqs=8, num_kv_blocks=256, max_model_len=64)
    opts.update(kw)
    llm = LLM(str(model), **opts)
    for n in names:
        llm.lora.register(n, str(root / n))
    return llm


def solo(model: Path, root: Path, name: str, prompt: list[int], n: int) -> list[int]:
    llm = make_llm(model, root, name, max_loras=1, max_cpu_loras=1)
    out = llm.generate([prompt], greedy(n), adapters=name)[0]
    llm.lora.shutdown()
    return out.outputs[0].token_ids


def test_slow_load_does_not_block_other_adapters(tiny, monkeypatch):
    model, root, _ = tiny
    gate = threading.Event()
    real = host_cache_mod.load_peft_adapter

    def slow(path, adapter_id, *a, **kw):
        if adapter_id == "C":
            assert gate.wait(60), "the test never released the slow load"
        return real(path, adapter_id, *a, **kw)

    monkeypatch.setattr(host_cache_mod, "load_peft_adapter", slow)
    llm = make_llm(model, root, "ABC", max_loras=3)
    eng = llm.engine
    eng.add_request("c0", [5, 6, 7], greedy(4), adapters="C")
    for i in range(6):
        eng.add_request(f"x{i}", [9, 10 + i], greedy(4), adapters="AB"[i % 2])
    done = {}
    deadline = time.monotonic() + 60
    try:
        # If the step waited for C's load this loop would hang (the load only ends when we set the gate).
        while len(done) < 6:
            t0 = time.monotonic()
            outs = eng.step()
            assert time.monotonic() - t0 < 5.0
            for o in outs:
                if o.finished:
                    done[o.request_id] = o
            if not outs:
                time.sleep(0.005)  # A and B are still loading
            assert time.monotonic() < deadline
    finally:
        gate_after = not gate.is_set()
    assert gate_after and "c0" not in done and llm.lora.card("C")["state"] == "loading"
    assert llm.lora.snapshot()["adapters"]["C"]["waiting"] == 1
    gate.set()
    done.update(drain(llm))
    assert done["c0"].outputs[0].token_ids == solo(model, root, "C", [5, 6, 7], 4)
    llm.lora.shutdown()


def test_lru_eviction_order_and_pinned(tiny):
    model, root, _ = tiny
    llm = make_llm(model, root, "ABCDE", max_loras=3)
    llm.lora.pin("E")
    run = lambda name: llm.generate([[4, 5, 6]], greedy(2), adapters=name)  # noqa: E731
    for name in "EABA":  # E pinned; LRU among idle: B then A
        run(name)
    assert llm.lora.eviction_log == []
    run("C")  # evicts B (A was used after B)
    run("D")  # evicts A
    run("B")  # evicts C
    assert llm.lora.eviction_log == ["B", "A", "C"]
    assert llm.lora.card("E")["state"] == "resident"
    assert llm.lora.card("A")["state"] == "host"
    llm.lora.shutdown()


def test_host_cache_bounded_prefetch_no_thrash(tiny):
    model, root, _ = tiny
    llm = make_llm(model, root, "ABCDEFGH", max_loras=1, max_cpu_loras=3)
    lora = llm.lora
    dropped_with_queue = []
    drop = lora.host_cache._drop_one

    def watched():
        before = set(lora.host_cache._lru)
        ok = drop()
        dropped_with_queue.extend(x for x in before - set(lora.host_cache._lru) if x.waiting)
        return ok

    lora.host_cache._drop_one = watched
    for i, name in enumerate("ABCDEFGH" * 2):
        llm.engine.add_request(f"r{i}", [3, 4, 5 + i], greedy(3), adapters=name)
    # Bounded by time, not steps (as drain() above): a step with nothing runnable returns at once, so
    # the step count while loads run in the background depends on how fast the machine steps.
    deadline = time.monotonic() + 120.0
    while llm.engine.has_unfinished_requests():
        if not llm.engine.step():
            time.sleep(0.002)
        with lora.lock:
            assert len(lora.host_cache) + lora.host_cache.num_loading <= 3
        assert time.monotonic() < deadline, "requests did not finish"
    assert dropped_with_queue == []
    # Each adapter loaded from disk exactly once: a prefetched copy is kept until its queue is served.
    assert lora.stats["loads"] == 8
    lora.shutdown()


def test_fairness_under_flood(tiny):
    """max_loras=2, a flood for A and B and two requests for C: with time slices C finishes within a
    bounded number of steps; without them (infinite slice) it waits for the flood."""
    model, root, _ = tiny

    def run(slice_steps: float) -> tuple[int, dict[str, int]]:
        tick = [0.0]
        llm = make_llm(model, root, "ABC", max_loras=2, max_num_seqs=4)
        lora = llm.lora
        lora.clock = lambda: tick[0]  # one "second" per step: slices in steps
        lora.slots.time_slice_s = slice_steps
        eng = llm.engine
        lora.prefetch("ABC")  # all in host memory first: the test is about slots, not load timing
        deadline = time.monotonic() + 60
        while any(lora.card(n)["state"] != "host" for n in "ABC"):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        for i in range(60):
            eng.add_request(f"{'AB'[i % 2]}{i}", [7, 8, 9], greedy(4), adapters="AB"[i % 2])
        first: dict[str, int] = {}
        c_done = None
        step = 0
        while eng.has_unfinished_requests():
            if step == 3:  # C arrives when A and B own both slots
                eng.add_request("C0", [7, 8], greedy(4), adapters="C")
                eng.add_request("C1", [7, 9], greedy(4), adapters="C")
                c_start = step
            for o in eng.step():
                first.setdefault(o.request_id, step)
                if o.finished and o.request_id == "C1":
                    c_done = step
            step += 1
            tick[0] += 1
            assert lora.num_resident() <= 2
        lora.shutdown()
        return c_done - c_start, first

    fair, first = run(4.0)
    unfair, _ = run(float("inf"))
    assert fair <= 25, fair
    assert unfair > fair + 20, (fair, unfair)
    # FCFS within an adapter: A's requests got their first token in submission order.
    a_order = sorted((int(r[1:]), s) for r, s in first.items() if r.startswith("A"))
    assert [s for _, s in a_order] == sorted(s for _, s in a_order)


def test_failures_are_isolated_and_retried(tiny, tmp_path):
    model, root, s = tiny
    llm = make_llm(model, root, "AB", max_loras=2)
    # Incompatible: hidden size 48 instead of the model's; missing: a folder that does not exist yet.
    write_random_adapter(tmp_path / "wrong", s.num_layers, (48, 48), (48, 24), 4, seed=1)
    llm.lora.register("wrong", str(tmp_path / "wrong"))
    llm.lora.register("missing", str(tmp_path / "later"))
    names = ["A", "wrong", "B", "missing", "A"]
    outs = llm.generate([[3, 4, 5]] * 5, greedy(3), adapters=names)
    for name, o in zip(names, outs):
        if name in ("wrong", "missing"):
            assert o.outputs[0].finish_reason == "error" and o.error
            assert llm.lora.card(name)["state"] == "failed"
        else:
            assert o.error is None and len(o.outputs[0].token_ids) == 3
    assert "shape" in outs[1].error and "later" in outs[3].error
    write_random_adapter(tmp_path / "later", s.num_layers, s.site_dims("q_proj"), s.site_dims("v_proj"), 3, seed=2)
    again = llm.generate([[3, 4, 5]], greedy(3), adapters="missing")[0]
    assert again.error is None and llm.lora.card("missing")["state"] == "resident"
    llm.lora.shutdown()


def test_unregister_while_serving(tiny):
    model, root, _ = tiny
    llm = make_llm(model, root, "AB", max_loras=2)
    eng = llm.engine
    eng.add_request("a0", [3, 4, 5], greedy(6), adapters="A")
    eng.add_request("a1", [3, 4, 6], greedy(6), adapters="A")
    eng.add_request("b0", [3, 4, 7], greedy(6), adapters="B")
    for _ in range(3):
        eng.step()
    llm.lora.unregister("A")
    with pytest.raises(AdapterNotFound):
        eng.add_request("a2", [3, 4], greedy(2), adapters="A")
    # Re-registering the name while the old one drains is a new adapter; the old requests keep theirs.
    llm.lora.register("A", str(root / "C"))
    eng.add_request("a3", [3, 4, 5], greedy(6), adapters="A")
    final = drain(llm)
    assert all(final[r].error is None for r in ("a0", "a1", "b0", "a3"))
    assert final["a0"].outputs[0].token_ids == solo(model, root, "A", [3, 4, 5], 6)
    assert final["a3"].outputs[0].token_ids == solo(model, root, "C", [3, 4, 5], 6)
    assert llm.lora.num_resident() <= 2 and sum(len(v) for v in llm.lora.slots.pool.free.values()) > 0
    llm.lora.shutdown()


def test_s3_adapter_generates_like_local(tiny, s3, tmp_path, monkeypatch):  # noqa: F811
    model, root, _ = tiny
    monkeypatch.setattr("openlora.lora.manager.cache_dir", lambda: tmp_path / "cache")
    s3.create_bucket(Bucket="tier-adapters")
    files = {p.name: p.read_bytes() for p in (root / "D").iterdir()}
    upload(s3, "tier-adapters", "team/D", files)
    llm = make_llm(model, root, "D", max_loras=2)
    llm.lora.host_cache.cache_root = tmp_path / "cache" / "adapters"
    from openlora.lora.sources import files_hash

    llm.lora.register("remote", "s3://tier-adapters/team/D", expected_hash=files_hash(root / "D"))
    llm.lora.register("remote_bad", "s3://tier-adapters/team/D", expected_hash="0" * 64)
    p = [5, 9, 11, 4]
    outs = llm.generate([p, p, p], greedy(5), adapters=["remote", "D", "remote_bad"])
    assert outs[0].error is None and outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids
    assert outs[2].error and "hash" in outs[2].error
    assert (tmp_path / "cache" / "adapters" / "s3").is_dir()  # landed in the disk cache
    llm.lora.shutdown()


def test_max_lora_rank_is_enforced_at_registration(tiny):
    """An adapter above --max-lora-rank is refused with a clear error when it loads (not truncated)."""
    from openlora.errors import AdapterLoadError

    model, root, _ = tiny  # ranks 2..5
    llm = make_llm(model, root, "", max_lora_rank=3)
    llm.lora.register("B", str(root / "B"), load=True)  # rank 3: fine
    with pytest.raises(AdapterLoadError, match="rank 4, above this server's --max-lora-rank 3"):
        llm.lora.register("C", str(root / "C"), load=True)
