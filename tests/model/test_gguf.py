"""GGUF files as a model source, against transformers' own GGUF loading of the same file.

One small Llama GGUF per listed tensor type (written here with the `gguf` package) and the real
SmolLM2-135M-Instruct Q4_1 file: the engine's logits (fp32) must match transformers' model loaded with
`from_pretrained(..., gguf_file=...)` within the ladder's fp32 tolerance, greedy tokens equal.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from gguf_files import VOCAB, write_tiny_llama_gguf
from test_llama_vs_hf import check_against_hf, engine_run

from openlora.errors import ModelLoadError
from openlora.model import gguf as gguf_mod

TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K")
PROMPTS = [[5, 9, 33, 2, 71, 8, 100, 42, 17], [3, 4], list(range(10, 47))]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """GGUF conversions go to a per-test cache (the kernels' cache stays the shared one)."""
    root = tmp_path / "cache"
    monkeypatch.setattr(gguf_mod, "cache_dir", lambda: root)
    return root


def hf_from_gguf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


@pytest.mark.parametrize("kind", TYPES)
def test_tiny_gguf_matches_transformers(tmp_path, cache, kind):
    path = write_tiny_llama_gguf(tmp_path / f"tiny-{kind}.gguf", kind, seed=len(kind))
    _, outs, logits = engine_run(path, PROMPTS, 8, block_size=4, num_kv_blocks=64)  # LLM("...gguf")
    check_against_hf(hf_from_gguf(path), PROMPTS, outs, logits)
    (folder,) = [p for p in (cache / "gguf").iterdir() if p.is_dir()]
    meta = json.loads((folder / "openlora_gguf.json").read_text())
    assert meta["tensor_types"] == sorted({"F32", kind})


def test_tokenizer_and_chat_template_come_from_the_file(tmp_path, cache):
    from transformers import AutoTokenizer

    from openlora.engine.tokenizer import load_tokenizer

    path = write_tiny_llama_gguf(tmp_path / "tok.gguf", "F32")
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    ours = load_tokenizer(gguf_mod.converted_dir(path))
    text = "Hello the world, the end."
    assert ours(text)["input_ids"] == ref(text)["input_ids"]
    assert len(ours) == VOCAB
    msgs = [{"role": "user", "content": "hi"}]
    assert (ours.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            == ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert ours.eos_token == "<|im_end|>"


def test_second_load_reuses_the_conversion(tmp_path, cache, monkeypatch):
    path = write_tiny_llama_gguf(tmp_path / "again.gguf", "Q8_0")
    first = gguf_mod.converted_dir(path)
    monkeypatch.setattr(gguf_mod, "_convert", lambda *a: pytest.fail("converted twice"))
    assert gguf_mod.converted_dir(path) == first
    # Same bytes under another name: same content hash, same folder.
    other = tmp_path / "renamed.gguf"
    other.write_bytes(path.read_bytes())
    assert gguf_mod.converted_dir(other) == first


def test_corrupt_gguf_is_a_clear_error(tmp_path, cache):
    good = write_tiny_llama_gguf(tmp_path / "good.gguf", "Q4_0")
    data = good.read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) // 3])
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"NOPE" + data[4:])
    for bad in (truncated, garbage):
        with pytest.raises(ModelLoadError, match=f"{bad.name}.*not a readable GGUF file"):
            gguf_mod.converted_dir(bad)
    with pytest.raises(ModelLoadError, match="does not exist"):
        gguf_mod.converted_dir(tmp_path / "missing.gguf")
    assert not (cache / "gguf").exists() or not any(p.is_dir() for p in (cache / "gguf").iterdir())


def test_unsupported_tensor_type_names_file_tensor_and_type(tmp_path, cache):
    import numpy as np
    from gguf import GGMLQuantizationType as T
    from gguf import GGUFWriter

    path = tmp_path / "iq.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 144), dtype=np.uint8), raw_dtype=T.IQ4_NL)  # 4 x 256
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match=r"iq\.gguf: tensor 'token_embd\.weight' has type IQ4_NL"):
        gguf_mod.converted_dir(path)


def test_unsupported_architecture(tmp_path, cache):
    path = write_tiny_llama_gguf(tmp_path / "falcon.gguf", "F32", arch="falcon")
    with pytest.raises(ModelLoadError, match="architecture 'falcon' is not supported"):
        gguf_mod.converted_dir(path)


def test_real_smollm2_matches_transformers():
    """The demo model's own file (Q4_1 + Q8_0 + F32 tensors), 30 layers, through the shared cache."""
    from openlora.demo import demo_gguf

    path = demo_gguf()
    hf = hf_from_gguf(path)
    prompts = [[1, 9690, 198, 2683, 359, 253, 5356, 5646], [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47]]
    _, outs, logits = engine_run(path, prompts, 6, block_size=16, num_kv_blocks=32, max_model_len=512)
    check_against_hf(hf, prompts, outs, logits)


@pytest.mark.parametrize("kind", ("Q8_0", "Q4_0", "Q4_1"))
def test_gguf_codes_served_as_they_are(tmp_path, cache, kind):
    """`quantization="gguf"`: the file's own Q8_0 / Q4_0 / Q4_1 blocks feed the quantized kernels (no
    dequantize and re-quantize round trip), and the logits still match transformers' dequantized model."""
    path = write_tiny_llama_gguf(tmp_path / f"tiny-{kind}.gguf", kind, seed=len(kind))
    llm, outs, logits = engine_run(path, PROMPTS, 8, block_size=4, num_kv_blocks=64, quantization="gguf")
    layer = llm.engine.runner.model.layers[0]
    want = "quant-w8a16" if kind == "Q8_0" else "quant-w4a16"
    assert {lin.backend for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)} == {want}
    check_against_hf(hf_from_gguf(path), PROMPTS, outs, logits)


def test_gguf_quantization_needs_a_gguf_file(tmp_path, tiny_model_factory):
    from openlora import LLM

    with pytest.raises(ValueError, match="must be a .gguf file"):
        LLM(str(tiny_model_factory("llama")), quantization="gguf")


def test_real_smollm2_served_from_its_own_q4_1_codes():
    """The demo file's Q4_1 projections served by the W4A16 kernel, against transformers' dequantized model."""
    from openlora.demo import demo_gguf

    path = demo_gguf()
    prompts = [[1, 9690, 198, 2683, 359, 253, 5356, 5646], [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47]]
    llm, outs, logits = engine_run(path, prompts, 6, block_size=16, num_kv_blocks=32, max_model_len=512,
                                   quantization="gguf")
    assert llm.engine.runner.model.layers[0].gate_up.backend == "quant-w4a16"
    check_against_hf(hf_from_gguf(path), prompts, outs, logits)
