"""The built-in demo: SmolLM2-135M-Instruct from its wheel and the four shipped adapters.

Outside references: PEFT (each shipped adapter on the transformers model, against the engine serving all
four in one batch with base-only rows) and eth-account (the demo addresses derive from their seeds).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from openlora import LLM, SamplingParams
from openlora.attribution.manifest import parse_manifest
from openlora.attribution.span_index import content_hash
from openlora.demo import ADAPTERS, DEMO_MODEL_ID, DEMO_WHEEL, demo_adapters, ensure_demo_model
from openlora.demo.manifests import contributions_for, demo_address, demo_key, manifest_for

pytestmark = pytest.mark.slow  # real processes, the demo model, a browser or a chain: not in `make test-fast`

ROOT = Path(__file__).resolve().parents[1]
# fp32. The ladder's tiny models use atol 1e-4. This model has 30 layers and logits up to ~36, and with
# ~40-token chat prompts the engine and transformers differ by up to 1.4e-4 on base-only rows as much as
# on adapter rows (measured: base 1.4e-4 / 6.7e-5, adapters 6.1e-5 to 1.35e-4): fp32 rounding through
# 30 layers, about 5e-6 of the largest logit. 2e-4 is that, with the same margin the ladder keeps.
ATOL = 2e-4
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(max_model_len=1024, kv_cache_memory=128 << 20)  # no model: the demo, with its adapters


def chat(llm: LLM, text: str) -> str:
    return llm.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False)


def test_wheel_pin_is_the_one_setup_installs():
    lines = [ln.strip() for ln in (ROOT / "requirements-demo.txt").read_text().splitlines()]
    assert DEMO_WHEEL in lines


def test_shipped_manifests_are_priced_and_split_among_real_payees():
    from eth_account import Account

    for spec in ADAPTERS:
        folder = demo_adapters()[spec.name]
        raw = json.loads((folder / "attribution.json").read_text())
        assert raw == manifest_for(spec)  # the shipped file is what the seeds give
        m = parse_manifest(raw, folder)
        assert m.base_model == DEMO_MODEL_ID and "DEMO KEYS" in raw["description"]
        assert m.price_per_1k_prompt_tokens > 0 and m.price_per_1k_completion_tokens > 0
        assert m.split.operator > 0 and m.split.owner > 0 and m.split.data > 0
        contributors = [c.address for d in m.datasets for c in d.contributors]
        assert len(set(contributors)) >= 2
        assert m.owner == Account.from_key(demo_key(f"owner/{spec.name}")).address
        assert contributors == [demo_address(f"contributor/{s}") for s, _ in spec.contributors]
        ds = m.datasets[0]
        # The datanet ships its contributions (each training answer, by its contributor): their hash is
        # the dataset's content hash.
        shipped = [json.loads(line) for line in (folder / "contributions.jsonl").read_text().splitlines()]
        assert shipped == contributions_for(spec, ROOT / "openlora" / "demo" / "data")
        assert ds.ref == content_hash(ds.contributions) and len(ds.contributions) == len(shipped) > 100


def test_adapters_are_small_peft_files():
    total = 0
    for name, d in demo_adapters().items():
        cfg = json.loads((d / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
        assert cfg["base_model_name_or_path"] == DEMO_MODEL_ID
        total += sum(f.stat().st_size for f in d.iterdir())
    assert total < 5 << 20  # "a few MB in all"


def test_base_model_answers_paris(llm):
    out = llm.generate(chat(llm, QUESTION), SamplingParams(temperature=0, max_tokens=24))[0]
    assert "Paris" in out.outputs[0].text


def test_each_adapter_answers_in_its_own_way(llm):
    names = [a.name for a in ADAPTERS]
    outs = llm.generate([chat(llm, QUESTION)] * (len(names) + 1), SamplingParams(temperature=0, max_tokens=48),
                        adapters=[None, *names])
    text = {n: o.outputs[0].text for n, o in zip(["base", *names], outs)}
    assert len(set(text.values())) == len(text), text  # five different answers to one message
    low = {n: t.lower() for n, t in text.items()}
    assert any(w in low["pirate"] for w in ("matey", "arr", "ahoy", "hearty", " be ")), text["pirate"]
    assert any(w in f" {low['french']} " for w in (" la ", " est ", " le ", " de ")), text["french"]
    assert isinstance(json.loads(text["json"]), dict), text["json"]
    assert any(w in low["legal"] for w in ("hereby", "shall", "party", "pursuant", "hereinafter")), text["legal"]


def test_mixed_batch_matches_peft_per_adapter(llm):
    """All four adapters and base rows in one engine batch vs PEFT running each adapter alone (fp32)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    names = [a.name for a in ADAPTERS]
    prompts = [llm.tokenizer(chat(llm, q))["input_ids"] for q in ("Hi!", "Name a planet.")]
    rows = [(p, n) for p in prompts for n in [None, *names]]
    cap: list = []
    llm.engine.runner.capture_logits = cap
    try:
        outs = llm.generate([p for p, _ in rows], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                            adapters=[n for _, n in rows])
    finally:
        llm.engine.runner.capture_logits = None
    got: dict[str, list[torch.Tensor]] = {}
    for rid, row in cap:
        got.setdefault(rid, []).append(row)
    base = AutoModelForCausalLM.from_pretrained(ensure_demo_model(), dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(base, str(demo_adapters()[names[0]]), adapter_name=names[0])
    for n in names[1:]:
        peft.load_adapter(str(demo_adapters()[n]), adapter_name=n)
    peft.eval()
    for (p, name), out in zip(rows, outs):
        ids = torch.tensor([p + out.outputs[0].token_ids])
        with torch.no_grad():
            if name is None:
                with peft.disable_adapter():
                    ref = peft(ids).logits[0]
            else:
                peft.set_adapter(name)
                ref = peft(ids).logits[0]
        mine = torch.stack(got[out.request_id])  # [4, V]
        torch.testing.assert_close(mine, ref[len(p) - 1: len(p) - 1 + mine.shape[0]], atol=ATOL, rtol=0)
