"""Per-request adapter weight: a request for adapter x at weight w (`adapters=[("x", w)]`) equals PEFT
with every lora_B of x multiplied by w, fp32, at prefill and through decode; weight 0 equals the base model.
Tolerance 1e-4 on logits (as tests/lora/test_engine_vs_peft.py), and the greedy tokens agree exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import load_hf

from openlora import LLM

ATOL = 1e-4
WEIGHTS = (0.0, 0.5, 1.0, 2.0)
PROMPT = [5, 17, 33, 2, 90, 11, 41]
MAX_TOKENS = 5


@pytest.fixture(scope="module")
def setup(tiny_model_factory, save_peft, tmp_path_factory) -> tuple[Path, Path]:
    path = tiny_model_factory("llama")
    folder = tmp_path_factory.mktemp("scale") / "x"
    # lora_alpha / r = 6: large enough that the adapter clearly moves the logits at every weight.
    save_peft(load_hf(path), folder, seed=3, r=8, lora_alpha=48, target_modules="all-linear")
    return path, folder


def peft_scaled(model_path: Path, adapter: Path, weight: float) -> torch.nn.Module:
    """PEFT's model for `adapter` with each lora_B multiplied by `weight` (the reference for weight w)."""
    from peft import PeftModel

    m = PeftModel.from_pretrained(load_hf(model_path), str(adapter)).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.mul_(weight)
    return m


def test_request_weight_equals_peft_with_scaled_lora_b(setup, run_engine, hf_logits):
    path, folder = setup
    llm = LLM(str(path), dtype="float32", block_size=4, num_kv_blocks=128)
    llm.register_adapter("x", str(folder))
    # One batch: x at every weight, plus a base-only row with the same prompt.
    specs = [[("x", w)] for w in WEIGHTS] + [None]
    outs, rows = run_engine(llm, [PROMPT] * len(specs), specs, max_tokens=MAX_TOKENS)
    start = len(PROMPT) - 1  # logits at position p predict token p + 1
    got: dict[float, torch.Tensor] = {}
    for i, w in enumerate(WEIGHTS):
        toks = outs[i].outputs[0].token_ids
        assert len(toks) == MAX_TOKENS
        ref = hf_logits(peft_scaled(path, folder, w), PROMPT + toks)[start: start + len(toks)]
        got[w] = torch.stack(rows[i])
        torch.testing.assert_close(got[w], ref, atol=ATOL, rtol=0, msg=lambda m, w=w: f"weight {w}: {m}")
        assert ref.argmax(-1).tolist() == toks, f"weight {w}: greedy tokens differ from PEFT's"

    # Weight 0 is the base model: same tokens and logits as the base-only row and as the plain HF model.
    base_toks = outs[len(WEIGHTS)].outputs[0].token_ids
    assert outs[0].outputs[0].token_ids == base_toks
    base_ref = hf_logits(load_hf(path), PROMPT + base_toks)[start: start + len(base_toks)]
    torch.testing.assert_close(got[0.0], base_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.stack(rows[len(WEIGHTS)]), base_ref, atol=ATOL, rtol=0)
    # The weights matter: each nonzero weight moves the logits well beyond the tolerance.
    for a, b in ((0.0, 0.5), (0.5, 1.0), (1.0, 2.0)):
        assert (got[a][0] - got[b][0]).abs().max() > 100 * ATOL, f"weights {a} and {b} give the same logits"
