"""AsyncEngine in-process: errors reach the caller, a failing step fails only the in-flight requests,
the queue bound answers Overloaded, drain aborts leftovers with a clean error."""

from __future__ import annotations

import asyncio

import pytest

from openlora.engine.async_engine import AsyncEngine, EngineStepError, ShuttingDown
from openlora.errors import AdapterNotFound, Overloaded, RequestTooLong
from openlora.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_model_factory):
    from openlora.engine.llm_engine import LLMEngine
    from openlora.llm import build_engine_config
    from openlora.lora.manager import LoRAManager

    cfg = build_engine_config(str(tiny_model_factory("llama")), kv_cache_memory=8 << 20, max_num_seqs=2, num_threads=1)
    lora = LoRAManager(cfg)
    yield LLMEngine(cfg, lora_manager=lora)
    lora.shutdown()


async def _collect(ae: AsyncEngine, rid: str, prompt, **kw) -> list:
    return [o async for o in ae.generate(rid, prompt, SamplingParams(temperature=0, ignore_eos=True, **kw))]


def test_outputs_errors_and_step_failure(engine):
    async def main():
        ae = AsyncEngine(engine, max_waiting=1)
        ae.start()
        outs = await _collect(ae, "r1", [5, 6, 7], max_tokens=4)
        assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 4
        with pytest.raises(RequestTooLong):
            await _collect(ae, "r2", [5] * 300, max_tokens=4)
        with pytest.raises(AdapterNotFound):
            await ae.add_request("r3", [5], SamplingParams(), adapters="nope")

        # A step that raises fails the in-flight request with a 500-class error; the engine lives on.
        real_step, calls = engine.step, []

        def failing_step():
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("boom")
            return real_step()

        engine.step = failing_step
        try:
            with pytest.raises(EngineStepError, match="boom"):
                await _collect(ae, "r4", [5, 6], max_tokens=50)
        finally:
            engine.step = real_step
        assert ae.step_errors == 1
        assert not engine.has_unfinished_requests() and engine.kv.usage == 0
        outs = await _collect(ae, "r5", [9, 8], max_tokens=3)
        assert outs[-1].finished

        # Bounded queue: 2 running (max_num_seqs), 1 waiting, the next one is Overloaded.
        long = SamplingParams(max_tokens=200, ignore_eos=True)
        qs = [await ae.add_request(f"q{i}", [5, 6], long) for i in range(2)]
        while await ae.call(lambda e: len(e.scheduler.running)) < 2:
            await asyncio.sleep(0.005)
        qs.append(await ae.add_request("q2", [5, 6], long))
        with pytest.raises(Overloaded):
            await ae.add_request("q3", [5, 6], SamplingParams(max_tokens=4))
        # Drain with no grace: the leftovers get ShuttingDown, new requests too.
        await ae.shutdown(0.0)
        for q in qs:
            items = []
            while not q.empty():
                items.append(q.get_nowait())
            assert isinstance(items[-1], ShuttingDown)
        with pytest.raises(ShuttingDown):
            await ae.add_request("late", [5], SamplingParams())
        assert not engine.has_unfinished_requests() and engine.kv.usage == 0

    asyncio.run(main())


def test_build_constructs_and_steps_on_one_thread(tiny_model_factory):
    """AsyncEngine.build runs the factory on the engine thread (the thread that later steps), and a
    factory error reaches the caller."""
    import threading

    from openlora.engine.llm_engine import LLMEngine
    from openlora.llm import build_engine_config

    cfg = build_engine_config(str(tiny_model_factory("llama")), kv_cache_memory=8 << 20, max_num_seqs=2, num_threads=1)
    built_on, stepped_on = [], []

    def factory():
        built_on.append(threading.current_thread())
        eng = LLMEngine(cfg)
        real_step = eng.step
        eng.step = lambda: (stepped_on.append(threading.current_thread()), real_step())[1]
        return eng

    async def main():
        ae = AsyncEngine.build(factory)
        ae.start()
        outs = await _collect(ae, "b1", [5, 6, 7], max_tokens=3)
        assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 3
        await ae.shutdown()

    asyncio.run(main())
    assert built_on[0] is not threading.main_thread()
    assert stepped_on and all(t is built_on[0] for t in stepped_on)

    def broken():
        raise FileNotFoundError("no such model folder")

    with pytest.raises(FileNotFoundError, match="no such model folder"):
        AsyncEngine.build(broken)
