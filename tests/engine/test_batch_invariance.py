"""Batch invariance: a request's tokens and logprobs are bit-identical whether it runs alone or in a batch
with other tenants' requests (other adapters, other lengths), with the default kernel plan. Measured on
this CPU: oneDNN's packed linear and the row-wise paged attention are invariant; F.linear (MKL) and the
SDPA prompt path are not (see README, Isolation between tenants)."""

from __future__ import annotations

import pytest
import torch

from openlora import LLM, SamplingParams

TARGET = [5, 9, 33, 2, 71, 8, 100, 42, 17, 3, 88]


def _save_adapter(model_path, folder, seed: int, **kw) -> str:
    from peft import LoraConfig, get_peft_model
    from tiny_models import load_hf

    torch.manual_seed(seed)
    pm = get_peft_model(load_hf(model_path), LoraConfig(init_lora_weights=False, lora_dropout=0.0, **kw))
    pm.save_pretrained(str(folder))
    return str(folder)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_alone_and_co_batched_are_bit_identical(tiny_model_factory, tmp_path, dtype):
    path = tiny_model_factory("qwen2")
    llm = LLM(str(path), dtype=dtype, block_size=4, num_kv_blocks=512, max_loras=4)
    llm.register_adapter("mine", _save_adapter(path, tmp_path / "mine", 1, r=8, target_modules="all-linear"))
    llm.register_adapter("theirs", _save_adapter(path, tmp_path / "theirs", 2, r=4, target_modules=["q_proj"]))
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=5, prompt_logprobs=3)
    for adapter in ("mine", None):
        alone = llm.generate([TARGET], params, adapters=adapter)[0]
        others = [list(range(10 + i, 13 + 7 * i)) for i in range(6)]
        batch = [*others[:2], TARGET, *others[2:]]
        ads = ["theirs", None, adapter, "theirs", [("mine", 0.5), ("theirs", 0.5)], None, "theirs"]
        co = llm.generate(batch, params, adapters=ads)[2]
        a, b = alone.outputs[0], co.outputs[0]
        assert a.token_ids == b.token_ids
        assert a.logprobs == b.logprobs, "logprobs differ between alone and co-batched"
        assert alone.prompt_logprobs == co.prompt_logprobs
