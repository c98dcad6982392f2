"""Engine-level behaviour: seeded sampling across batch compositions, n samples, stop rules, bad input."""

from __future__ import annotations

import pytest

from openlora import LLM, SamplingParams
from openlora.errors import InvalidRequest, RequestTooLong


@pytest.fixture(scope="module")
def llm(tiny_model_factory):
    return LLM(str(tiny_model_factory("llama")), dtype="float32", block_size=4, num_kv_blocks=256, max_model_len=128)


def test_seeded_sampling_independent_of_batch(llm):
    p = [5, 6, 7, 8, 9, 10]
    sp = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=1234, max_tokens=24, ignore_eos=True)
    alone = llm.generate([p], sp)[0].outputs[0].token_ids
    others = [[3 + i, 40 + i, 90] for i in range(7)]
    mixed_params = [SamplingParams(temperature=1.3, seed=i, max_tokens=5 + i) for i in range(7)]
    outs = llm.generate(others[:3] + [p] + others[3:], mixed_params[:3] + [sp] + mixed_params[3:])
    assert outs[3].outputs[0].token_ids == alone
    again = llm.generate([p], sp)[0].outputs[0].token_ids
    assert again == alone
    other_seed = llm.generate([p], SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=99, max_tokens=24,
                                                  ignore_eos=True))[0].outputs[0].token_ids
    assert other_seed != alone


def test_n_samples_and_logprobs(llm):
    out = llm.generate([[5, 6, 7]], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=6, logprobs=2,
                                                   prompt_logprobs=1, ignore_eos=True))[0]
    assert len(out.outputs) == 3 and len({tuple(o.token_ids) for o in out.outputs}) > 1
    for o in out.outputs:
        assert len(o.logprobs) == 6
        for tok, pos in zip(o.token_ids, o.logprobs):
            assert tok in pos and len(pos) >= 2
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == 3


def test_stop_token_and_max_tokens(llm):
    free = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0].outputs[0]
    stop_at = free.token_ids[3]
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_at],
                                                   ignore_eos=True))[0].outputs[0]
    assert out.token_ids == free.token_ids[:free.token_ids.index(stop_at) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at
    assert free.finish_reason == "length" and len(free.token_ids) == 10


def test_bad_input_is_a_clear_error_and_engine_survives(llm):
    with pytest.raises(RequestTooLong, match=r"200 tokens.*128"):
        llm.generate([[5] * 200], SamplingParams(max_tokens=4))
    with pytest.raises(InvalidRequest, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(InvalidRequest, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(InvalidRequest, match="token ids"):
        llm.generate([[5, 10_000]], SamplingParams(max_tokens=2))
    with pytest.raises(InvalidRequest, match="empty"):
        llm.generate([[]], SamplingParams(max_tokens=2))
    assert llm.generate([[5, 6]], SamplingParams(max_tokens=3, ignore_eos=True))[0].outputs[0].token_ids
    assert not llm.engine.has_unfinished_requests()
