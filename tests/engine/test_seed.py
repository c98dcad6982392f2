"""EngineConfig.seed: requests without a seed of their own are reproducible run to run."""

from __future__ import annotations

from openlora import LLM, SamplingParams


def _sample(model, seed: int) -> list[list[int]]:
    llm = LLM(str(model), seed=seed, max_num_seqs=4, num_kv_blocks=64, max_model_len=64)
    params = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate([[1, 2, 3], [4, 5, 6, 7]], params)]


def test_the_engine_seed_makes_unseeded_sampling_reproducible(tiny_model_factory):
    model = tiny_model_factory("llama")
    first = _sample(model, 7)
    assert _sample(model, 7) == first
    assert _sample(model, 8) != first
