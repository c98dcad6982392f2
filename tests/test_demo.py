"""Tests for the built-in demo model and adapters (a tiny-step build into a temp dir, < 60 s)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from openlora import demo

# A handful of steps: enough to exercise every code path; quality is checked by hand (see module doc).
TINY = demo.BuildParams(steps=3, batch_size=4, seq_len=64, adapter_steps=2, adapter_batch_size=4)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("demo")
    model_dir = demo.ensure_demo_model(root, TINY)
    return model_dir, demo.ensure_demo_adapters(model_dir)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def test_model_folder_layout(built: tuple[Path, dict[str, Path]]) -> None:
    model_dir, _ = built
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (model_dir / f).is_file(), f
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["tie_word_embeddings"] is True
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_key_value_heads"]) == (256, 4, 2)
    assert cfg["eos_token_id"] == 1 and cfg["bos_token_id"] == 0
    assert 1500 <= cfg["vocab_size"] <= 2048
    # the openlora parser accepts it too
    from openlora.config import ModelConfig

    mc = ModelConfig.from_pretrained(model_dir)
    assert mc.eos_token_ids == (1,) and mc.tie_word_embeddings


def test_cached_and_idempotent(built: tuple[Path, dict[str, Path]]) -> None:
    model_dir, adapters = built
    before = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert demo.ensure_demo_model(model_dir.parent.parent, TINY) == model_dir
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == before
    assert demo.ensure_demo_adapters(model_dir) == adapters
    leftovers = [p.name for p in model_dir.parent.rglob(".*-*") if p.is_dir()]
    assert leftovers == []  # no temp build dirs left behind


def test_transformers_loads_offline_and_generates(built: tuple[Path, dict[str, Path]]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, _ = built
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    ids = tok(demo.demo_prompts()[0], return_tensors="pt").input_ids
    assert ids[0, 0].item() == tok.bos_token_id
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=5, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids.shape[1]


@pytest.mark.parametrize("text", [
    "Question: What should I do this evening?\nAnswer: Relax.",
    "Héllo wörld — naïve café, 日本語, Ελληνικά, emoji 🙂🏴‍☠️",
    "  leading spaces,\ttabs and\n\nnewlines  ",
])
def test_tokenizer_round_trip(built: tuple[Path, dict[str, Path]], text: str) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(built[0], local_files_only=True)
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text


def test_chat_template_renders(built: tuple[Path, dict[str, Path]]) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(built[0], local_files_only=True)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Who are you?"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == ("<s>System: Be brief.\nUser: Hi\nAssistant: Hello!</s>\nUser: Who are you?\n"
                    "Assistant:")
    # the training data for chats was rendered by the same template
    assert demo._render_chat("User: Hi\nAssistant: Hello!") == "<s>User: Hi\nAssistant: Hello!</s>"
    ids = tok.apply_chat_template(msgs[1:2], add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


def test_adapter_files(built: tuple[Path, dict[str, Path]]) -> None:
    from safetensors import safe_open

    model_dir, adapters = built
    assert set(adapters) == set(demo.DOMAINS)
    cfg = json.loads((model_dir / "config.json").read_text())
    h, kv = cfg["hidden_size"], cfg["num_key_value_heads"] * cfg["hidden_size"] // cfg["num_attention_heads"]
    owners = set()
    for name, path in adapters.items():
        ac = json.loads((path / "adapter_config.json").read_text())
        assert ac["peft_type"] == "LORA" and ac["task_type"] == "CAUSAL_LM"
        assert (ac["r"], ac["lora_alpha"]) == (8, 16)
        assert {"q_proj", "k_proj", "v_proj", "o_proj"} <= set(ac["target_modules"])
        with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
            keys = set(f.keys())
            a = f.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
            b = f.get_tensor("base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight")
        assert a.shape == (8, h) and b.shape == (kv, 8)
        assert len(keys) == 2 * 7 * cfg["num_hidden_layers"]
        att = json.loads((path / "attribution.json").read_text())
        assert att["datasets"][0]["id"] == f"demo-{name}"
        assert (Path(demo.__file__).parent.parent / att["datasets"][0]["uri"]).is_file()
        assert sum(att["split"].values()) == 10000
        assert att["owner"].startswith("0x") and len(att["owner"]) == 42
        owners.add(att["owner"])
    assert len(owners) == len(adapters)


def test_peft_loads_each_adapter_and_changes_logits(built: tuple[Path, dict[str, Path]]) -> None:
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, adapters = built
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    ids = tok(demo.demo_prompts()[1], return_tensors="pt").input_ids
    base = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    with torch.no_grad():
        ref = base(input_ids=ids).logits
    seen = []
    for name, path in adapters.items():
        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
        model = peft.PeftModel.from_pretrained(model, path).eval()
        with torch.no_grad():
            got = model(input_ids=ids).logits
        assert not torch.allclose(got, ref, atol=1e-4), name
        # our own merge (the no-peft fallback) matches PEFT's unmerged forward
        merged = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
        demo._merge_adapter(merged, path)
        with torch.no_grad():
            torch.testing.assert_close(merged(input_ids=ids).logits, got, rtol=1e-4, atol=1e-4)
        seen.append(got)
    assert not torch.allclose(seen[0], seen[1], atol=1e-4)


def test_demo_prompts_and_fingerprint() -> None:
    prompts = demo.demo_prompts()
    assert len(prompts) >= 3 and all(isinstance(p, str) and p for p in prompts)
    assert demo._fingerprint(TINY) != demo._fingerprint(demo.BuildParams())
    assert demo._fingerprint(TINY) == demo._fingerprint(TINY)


def test_corpora_are_small_and_deterministic() -> None:
    total = sum(p.stat().st_size for p in demo.DATA_DIR.iterdir())
    assert total < 300_000
    assert demo.base_training_docs() == demo.base_training_docs()
    for d in demo.DOMAINS:
        assert demo.domain_training_docs(d) == demo.domain_training_docs(d)


def test_cache_dir_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # ensure_demo_model(None) resolves under OPENLORA_CACHE_DIR; do not build, just check the path
    monkeypatch.setenv("OPENLORA_CACHE_DIR", str(tmp_path))
    home = tmp_path / "demo" / f"v{demo.VERSION}-{demo._fingerprint(TINY)}" / "model"
    home.mkdir(parents=True)
    (home / "config.json").write_text("{}")
    assert demo.ensure_demo_model(None, TINY) == home
    assert os.path.commonpath([home, tmp_path]) == str(tmp_path)


def test_concurrent_callers_build_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import threading
    import time

    calls: list[int] = []

    def fake_build(out: Path, p: demo.BuildParams) -> None:
        calls.append(1)
        time.sleep(0.3)  # long enough for the other callers to queue on the lock
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(demo, "_build_model", fake_build)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(demo.ensure_demo_model(tmp_path, TINY)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1 and len(results) == 4


def test_failed_build_leaves_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def broken_build(out: Path, p: demo.BuildParams) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("boom")

    monkeypatch.setattr(demo, "_build_model", broken_build)
    with pytest.raises(RuntimeError):
        demo.ensure_demo_model(tmp_path, TINY)
    home = next(tmp_path.iterdir())
    assert sorted(p.name for p in home.iterdir()) == [".lock"]
