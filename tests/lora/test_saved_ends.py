"""modules_to_save on embed_tokens / lm_head, and adapters that add tokens, against PEFT adapter by adapter
in mixed batches: fp32 logits within 1e-4 (as every LoRA rung), greedy tokens equal; the other rows of a
batch are bit-identical to a batch without these adapters. Llama (tied embeddings) and Qwen2 (untied).

Added tokens: the adapter was trained on the model resized to V + 3 tokens, with its tokenizer extended
by three tokens and saved beside it. Its requests may use ids V..V+2 (prompt and output); nobody else's."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from tiny_models import VOCAB, load_hf

from openlora import LLM, SamplingParams

ATOL = 1e-4
ADDED = ["<x0>", "<x1>", "<x2>"]


def _save(base, root: Path, name: str, seed: int, grow: bool, tokenizer_from: Path | None = None, **kw) -> Path:
    """A random PEFT adapter on `base` (a copy, resized to VOCAB + 3 when `grow`), saved by PEFT itself."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    torch.manual_seed(seed)
    m = copy.deepcopy(base)
    if grow:
        m.resize_token_embeddings(VOCAB + len(ADDED), mean_resizing=False)
        with torch.no_grad():  # the added rows as training would leave them: not zero, not the mean
            m.get_input_embeddings().weight[VOCAB:].normal_(0, 0.08)
            if not m.config.tie_word_embeddings:
                m.get_output_embeddings().weight[VOCAB:].normal_(0, 0.08)
    pm = get_peft_model(m, LoraConfig(init_lora_weights=False, lora_dropout=0.0, **kw))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.05)  # the trained copy differs from the base
            elif "lora_embedding" in n:
                p.mul_(0.3)
            elif "lora_B" in n:
                p.mul_(3.0)
    out = root / name
    pm.save_pretrained(str(out))
    if grow and tokenizer_from is not None:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_from))
        tok.add_tokens(ADDED)
        tok.save_pretrained(str(out))
    return out


def _peft(model_path: Path, adapter: Path | None, ids: list[int], grow: bool) -> torch.Tensor:
    """PEFT's logits over `ids` for one adapter, on the base resized as the adapter was trained."""
    from peft import PeftModel

    m = load_hf(model_path)
    if grow:
        m.resize_token_embeddings(VOCAB + len(ADDED), mean_resizing=False)
    if adapter is not None:
        m = PeftModel.from_pretrained(m, str(adapter)).eval()
    with torch.no_grad():
        return m(torch.tensor([ids])).logits[0]


_BUILT: dict[str, tuple[Path, dict]] = {}


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request, tiny_model_factory, tmp_path_factory):
    return _build(request.param, tiny_model_factory, tmp_path_factory)


@pytest.fixture(scope="module")
def llama_setup(tiny_model_factory, tmp_path_factory):
    """Text prompts: the tiny Llama only (transformers loads the tiny Qwen2's word-level vocabulary into
    its Qwen2Tokenizer class, which does not split on spaces, so no text prompt round-trips there)."""
    return _build("llama", tiny_model_factory, tmp_path_factory)


def _build(arch: str, tiny_model_factory, tmp_path_factory) -> tuple[Path, dict]:
    if arch in _BUILT:
        return _BUILT[arch]
    path = tiny_model_factory(arch)
    root = tmp_path_factory.mktemp(f"ends_{arch}")
    base = load_hf(path)
    ads = {
        "saved_both": (_save(base, root, "saved_both", 1, False, target_modules=["q_proj"],
                             modules_to_save=["embed_tokens", "lm_head"]), False),
        "saved_head": (_save(base, root, "saved_head", 2, False, target_modules=["v_proj"],
                             modules_to_save=["lm_head"]), False),
        "grown_saved": (_save(base, root, "grown_saved", 3, True, path, target_modules=["q_proj", "v_proj"],
                              modules_to_save=["embed_tokens", "lm_head"]), True),
        "grown_lora": (_save(base, root, "grown_lora", 4, True, path,
                             target_modules=["embed_tokens", "q_proj", "lm_head"]), True),
        "plain": (_save(base, root, "plain", 5, False, target_modules=["q_proj", "v_proj"]), False),
    }
    _BUILT[arch] = path, ads
    return path, ads


def _llm(path: Path, ads: dict) -> LLM:
    llm = LLM(str(path), dtype="float32", block_size=4, num_kv_blocks=256, max_loras=8, max_num_batched_tokens=64,
              enable_prefix_caching=False)
    for name, (p, _) in ads.items():
        llm.register_adapter(name, str(p))
    return llm


def _prompt(i: int, grown: bool) -> list[int]:
    ids = [(13 * i + j) % 250 + 3 for j in range(3 + 3 * i)]
    if grown:  # the adapter's own tokens, consumed as input
        ids[1], ids[-1] = VOCAB + 1, VOCAB + 2
    return ids


def test_saved_and_grown_ends_match_peft_in_a_mixed_batch(setup, run_engine):
    path, ads = setup
    llm = _llm(path, ads)
    specs = [*ads, None, "grown_saved", None]
    prompts = [_prompt(i, s is not None and ads[s][1]) for i, s in enumerate(specs)]
    outs, rows = run_engine(llm, prompts, specs)
    for i, (spec, prompt, out) in enumerate(zip(specs, prompts, outs)):
        toks = out.outputs[0].token_ids
        grown = spec is not None and ads[spec][1]
        want = _peft(path, ads[spec][0] if spec else None, prompt + toks, grown)[len(prompt) - 1:-1]
        got = torch.stack(rows[i])
        assert got.shape[1] == (VOCAB + len(ADDED) if grown else VOCAB), spec
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg=lambda m: f"{spec}: {m}")
        assert toks == want.argmax(-1).tolist(), spec
    # Neighbours are untouched bit for bit: the same batch with those adapters' rows made base-only.
    plain_specs = [s if s == "plain" else None for s in specs]
    plain_prompts = [[t % VOCAB for t in p] for p in prompts]
    _, plain = run_engine(llm, plain_prompts, plain_specs)
    for i, spec in enumerate(specs):
        if spec in (None, "plain"):
            assert all(torch.equal(a, b) for a, b in zip(rows[i], plain[i])), spec


def test_added_tokens_are_produced_only_by_their_adapter(setup):
    """The grown adapter's head favours one added token: its requests sample it, a base request in
    the same batch cannot (its logits have no such column), and prompt logprobs see the wide rows."""
    path, ads = setup
    llm = _llm(path, ads)
    prompt = _prompt(2, True)
    out = llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0),
                       adapters=["grown_lora"])[0]
    want = torch.log_softmax(_peft(path, ads["grown_lora"][0], prompt, True), -1)
    for pos in range(1, len(prompt)):
        got = out.prompt_logprobs[pos][prompt[pos]].logprob
        assert abs(got - float(want[pos - 1, prompt[pos]])) < 1e-4
    # Sampling at temperature 1 many times: only the grown adapter's rows can yield ids >= VOCAB.
    params = SamplingParams(max_tokens=8, temperature=1.5, seed=7, ignore_eos=True)
    outs = llm.generate([prompt, [t % VOCAB for t in prompt]] * 4, params,
                        adapters=["grown_saved", None] * 4)
    mine = [t for o in outs[0::2] for t in o.outputs[0].token_ids]
    others = [t for o in outs[1::2] for t in o.outputs[0].token_ids]
    assert max(others) < VOCAB
    assert max(mine) < VOCAB + len(ADDED)


def test_added_ids_are_refused_to_other_requests(setup):
    path, ads = setup
    llm = _llm(path, ads)
    from openlora.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match=r"\[0, 256\)"):
        llm.generate([[5, VOCAB + 1]], SamplingParams(max_tokens=1))
    bad = llm.generate([[5, VOCAB + 1]], SamplingParams(max_tokens=1), adapters=["plain"])[0]
    assert bad.error and "[0, 256)" in bad.error
    over = llm.generate([[5, VOCAB + 3]], SamplingParams(max_tokens=1), adapters=["grown_lora"])[0]
    assert over.error and "[0, 259)" in over.error
    mixed = llm.generate([[5, 6]], SamplingParams(max_tokens=1), adapters=[[("grown_lora", 1.0), ("plain", 1.0)]])[0]
    assert mixed.error and "adds tokens" in mixed.error
    merged = llm.generate([[5, 6]], SamplingParams(max_tokens=1, temperature=0),
                          merge={"adapters": ["grown_saved", "plain"], "strategy": "linear"})[0]
    assert merged.error and "carry their own" in merged.error


def test_text_prompts_use_the_adapters_own_tokenizer(llama_setup):
    """The grown adapter ships its tokenizer: its text prompts encode <x1> to id VOCAB + 1 and its
    outputs decode added ids to their text; the model's tokenizer (every other request) does neither."""
    path, ads = llama_setup
    llm = _llm(path, ads)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    mine, base = llm.generate(["t5 <x1> t7", "t5 <x1> t7"], params, adapters=["grown_lora", None])
    assert mine.prompt_token_ids == [5, VOCAB + 1, 7]
    assert VOCAB + 1 not in base.prompt_token_ids
    want = _peft(path, ads["grown_lora"][0], mine.prompt_token_ids, True)[-1].argmax().item()
    assert mine.outputs[0].token_ids[0] == want
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ads["grown_lora"][0]))
    # Sampled hot and long enough to draw added tokens: they come back as their text.
    hot = llm.generate(["t5 <x1> t7"], SamplingParams(max_tokens=100, temperature=5.0, seed=3, ignore_eos=True),
                       adapters=["grown_lora"])[0].outputs[0]
    added = [t for t in hot.token_ids if t >= VOCAB]
    assert added, "no added token drawn: the check below would test nothing"
    ids = [5, VOCAB + 1, 7]
    full, head = (tok.decode(x, skip_special_tokens=True) for x in (ids + hot.token_ids, ids))
    assert hot.text == full[len(head):]
    assert all(ADDED[t - VOCAB] in hot.text for t in added)


def test_a_tokenizer_that_renumbers_the_models_tokens_is_refused(llama_setup, tmp_path):
    import shutil

    from tokenizers import Tokenizer

    path, ads = llama_setup
    bad = tmp_path / "renumbered"
    shutil.copytree(ads["grown_lora"][0], bad)
    tj = Tokenizer.from_file(str(bad / "tokenizer.json"))
    vocab = tj.get_vocab()
    vocab["t5"], vocab["t6"] = vocab["t6"], vocab["t5"]
    from tokenizers import models

    tj.model = models.WordLevel(vocab, unk_token="<unk>")
    tj.save(str(bad / "tokenizer.json"))
    llm = _llm(path, {})
    llm.register_adapter("renumbered", str(bad))
    from openlora.errors import UnsupportedAdapter

    with pytest.raises(UnsupportedAdapter, match="renumbers"):
        llm.generate(["t5 t6"], SamplingParams(max_tokens=1), adapters=["renumbered"])


def test_missing_rows_for_added_tokens_are_refused(setup, tmp_path):
    """A grown LoRA adapter whose file lacks the resized base rows (PEFT would use rows it does not hold)."""
    from safetensors.torch import load_file, save_file

    path, ads = setup
    src = ads["grown_lora"][0]
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    sd = load_file(str(src / "adapter_model.safetensors"))
    save_file({k: v for k, v in sd.items() if "base_layer" not in k}, str(cut / "adapter_model.safetensors"))
    llm = _llm(path, {})
    from openlora.errors import UnsupportedAdapter

    with pytest.raises(UnsupportedAdapter, match="adds 3 tokens but carries no embed_tokens rows"):
        llm.register_adapter("cut", str(cut))
