"""An adapter that adds tokens, through the real server and the official openai client: registered at run
time with its own tokenizer, its text prompts (completions and chat) are encoded with that tokenizer,
its answers and logprob tokens are decoded with it and equal the offline engine's, and another
request naming an added id is refused with a 400 while the server serves on."""

from __future__ import annotations

import copy

import httpx
import openai
import pytest
import torch
from conftest import ADMIN_KEY, API_KEY

from openlora import SamplingParams

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
VOCAB = 256
PROMPT = "t5 <x1> t7 t9"


@pytest.fixture(scope="module")
def grown(assets, offline):
    """A PEFT adapter trained on the tiny model resized to 259 tokens (modules_to_save of both ends), its
    tokenizer with three added tokens saved beside it; registered on the offline oracle too."""
    from peft import LoraConfig, get_peft_model
    from tiny_models import load_hf
    from transformers import AutoTokenizer

    torch.manual_seed(77)
    m = copy.deepcopy(load_hf(assets["model"]))
    m.resize_token_embeddings(VOCAB + 3, mean_resizing=False)
    with torch.no_grad():
        m.get_input_embeddings().weight[VOCAB:].normal_(0, 0.08)
    pm = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj"],
                                      modules_to_save=["embed_tokens", "lm_head"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.05)
    folder = assets["root"] / "grown"
    pm.save_pretrained(str(folder))
    tok = AutoTokenizer.from_pretrained(str(assets["model"]))
    tok.add_tokens(["<x0>", "<x1>", "<x2>"])
    tok.save_pretrained(str(folder))
    offline.register_adapter("grown", str(folder))
    return folder


def test_an_adapter_with_added_tokens_serves_its_own_tokens(server, offline, grown):
    r = httpx.post(f"{server.base_url}/adapters", json={"id": "grown", "source": str(grown)}, headers=ADMIN,
                   timeout=60)
    assert r.status_code == 200, r.text
    client = openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=120)
    want = offline.generate([PROMPT], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                            adapters="grown")[0]
    assert want.prompt_token_ids == [5, VOCAB + 1, 7, 9]
    out = client.completions.create(model="grown", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2,
                                    extra_body={"ignore_eos": True})
    assert out.usage.prompt_tokens == 4  # <x1> is one token of the adapter's tokenizer
    assert out.choices[0].text == want.outputs[0].text
    assert "".join(out.choices[0].logprobs.tokens) == out.choices[0].text
    # Chat: the template is rendered with the adapter's tokenizer, so <x1> in a message is its token.
    from transformers import AutoTokenizer

    msgs = [{"role": "user", "content": "t5 <x1> t7"}]
    ids = AutoTokenizer.from_pretrained(str(grown)).apply_chat_template(msgs, add_generation_prompt=True,
                                                                         tokenize=True, return_dict=False)
    assert VOCAB + 1 in ids
    chat = client.chat.completions.create(model="grown", messages=msgs, max_tokens=4, temperature=0,
                                          extra_body={"ignore_eos": True})
    want = offline.generate([ids], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), adapters="grown")[0]
    assert chat.usage.prompt_tokens == len(ids)
    assert chat.choices[0].message.content == want.outputs[0].text
    # An added id is the adapter's alone: the base model and other adapters refuse it, the server serves on.
    for model in ("tiny", "a2"):
        with pytest.raises(openai.BadRequestError, match=r"\[0, 256\)"):
            client.completions.create(model=model, prompt=[5, VOCAB + 1], max_tokens=1)
    ok = client.completions.create(model="grown", prompt=[5, VOCAB + 1], max_tokens=1, temperature=0)
    assert ok.choices[0].finish_reason == "length"
    # The session's server is shared: leave its adapter list as it was.
    assert httpx.delete(f"{server.base_url}/adapters/grown", headers=ADMIN, timeout=60).status_code == 200
