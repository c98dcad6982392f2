"""DoRA (PEFT's use_dora) in mixed batches: DoRA adapters (with and without rsLoRA, some layers only),
plain LoRA adapters and base-only rows in one engine batch, each row against PEFT running its adapter
alone. fp32; tolerance 1e-4 on logits (as the LoRA rung), greedy tokens equal. Also: the row scale
computed from the served weights equals PEFT's, request weights equal PEFT with B scaled, compositions
and merges of DoRA adapters are refused,
and a batch's base rows are bit-identical with and without DoRA neighbours."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft_refs import make_adapters, peft_logits
from tiny_models import load_hf

from openlora import LLM

ATOL = 1e-4

ADAPTERS = [  # (name, LoraConfig kwargs)
    ("dora_r4_qv", dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"])),
    ("dora_r8_rslora_all", dict(r=8, lora_alpha=4, use_dora=True, use_rslora=True, target_modules="all-linear")),
    ("dora_r2_layer1", dict(r=2, lora_alpha=4, use_dora=True, target_modules=["o_proj", "down_proj", "k_proj"],
                            layers_to_transform=[1])),
    ("lora_r8_attn", dict(r=8, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])),
]


@pytest.fixture(scope="module", params=["llama", "qwen2"])  # qwen2: q/k/v have a bias (DoRA's shift)
def setup(request, tiny_model_factory, tmp_path_factory):
    path = tiny_model_factory(request.param)
    return path, make_adapters(path, tmp_path_factory.mktemp(f"dora_{request.param}"), ADAPTERS, 300)


def _llm(path: Path, adapters: dict[str, Path], **kw) -> LLM:
    llm = LLM(str(path), dtype="float32", block_size=4, num_kv_blocks=256, max_loras=8,
              max_num_batched_tokens=64, enable_prefix_caching=False, **kw)
    for name, p in adapters.items():
        llm.register_adapter(name, str(p))
    return llm


@pytest.mark.parametrize("lora_backend", ["cpp", "torch"])
def test_mixed_dora_lora_and_base_rows_match_peft(setup, run_engine, lora_backend):
    path, adapters = setup
    llm = _llm(path, adapters, kernels=f"lora={lora_backend}")
    names = list(adapters)
    specs = names + [None, names[0], None]  # two rows share a DoRA adapter; base rows between them
    prompts = [[(11 * i + j) % 250 + 3 for j in range(4 + 5 * i)] for i in range(len(specs))]
    outs, rows = run_engine(llm, prompts, specs)
    for i, (spec, prompt, out) in enumerate(zip(specs, prompts, outs)):
        toks = out.outputs[0].token_ids
        ref = peft_logits(path, adapters[spec] if spec else None, prompt + toks)
        want = ref[len(prompt) - 1: len(prompt) - 1 + len(toks)]
        got = torch.stack(rows[i])
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg=lambda m: f"{spec}: {m}")
        assert toks == want.argmax(-1).tolist(), spec  # greedy tokens equal PEFT's
        lp_got, lp_want = torch.log_softmax(got, -1), torch.log_softmax(want, -1)
        assert (lp_got - lp_want).abs().max() < 1e-3, spec
    # The base rows are bit-identical to a batch without any adapter: DoRA's epilogue touches its own rows.
    _, plain = run_engine(llm, prompts, [None] * len(specs))
    for i, spec in enumerate(specs):
        if spec is None:
            assert all(torch.equal(a, b) for a, b in zip(rows[i], plain[i]))


def test_row_scale_equals_peft_weight_norm(setup):
    """g = m / ||W + s B A|| from the served projections (norm identity, no dense update) against PEFT's
    own weight norm, per module."""
    from peft import PeftModel

    from openlora.lora.adapter import load_peft_adapter
    from openlora.lora.dora import row_scale

    path, adapters = setup
    llm = _llm(path, {})
    runner = llm.engine.runner
    base = runner.lora.slots.pool.base
    pm = PeftModel.from_pretrained(load_hf(path), str(adapters["dora_r8_rslora_all"])).eval()
    ad = load_peft_adapter(adapters["dora_r8_rslora_all"], "x", llm.engine.config.model.shape)
    checked = 0
    for (layer, site), m in ad.modules.items():
        parent = "self_attn" if site in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        mod = getattr(getattr(pm.base_model.model.model.layers[layer], parent), site)
        w = mod.base_layer.weight.float()
        ba = mod.lora_B["default"].weight @ mod.lora_A["default"].weight
        norm = torch.linalg.norm(w + mod.scaling["default"] * ba, dim=1)
        want = mod.lora_magnitude_vector["default"].weight / norm
        g, shift = row_scale(base, layer, site, m.a, (m.b * m.scaling).t().contiguous(), m.magnitude)
        torch.testing.assert_close(g, want.float(), atol=1e-5, rtol=1e-5)
        if mod.base_layer.bias is not None:
            torch.testing.assert_close(shift, (1 - want.float()) * mod.base_layer.bias.float(), atol=1e-5, rtol=1e-5)
        else:
            assert shift is None
        checked += 1
    assert checked == len(ad.modules) > 0


def test_dora_in_a_composition_or_merge_is_refused(setup):
    from openlora import SamplingParams

    path, adapters = setup
    llm = _llm(path, adapters)
    sp = SamplingParams(max_tokens=2, temperature=0)
    for spec in ([("dora_r4_qv", 1.0), ("lora_r8_attn", 1.0)], [("dora_r4_qv", 0.5), ("dora_r2_layer1", 0.5)]):
        out = llm.generate([[5, 6, 7]], sp, adapters=[spec])[0]
        assert out.error and "DoRA" in out.error, spec
    merged = llm.generate([[5, 6, 7]], sp, merge={"adapters": ["dora_r4_qv", "lora_r8_attn"], "strategy": "svd"})[0]
    assert merged.error and "cannot merge DoRA" in merged.error
    # ... and the adapters themselves still serve alone afterwards.
    assert llm.generate([[5, 6, 7]], sp, adapters=["dora_r4_qv"])[0].outputs[0].token_ids


def _scaled_b(src: Path, dst: Path, w: float) -> Path:
    """The adapter with every lora_B multiplied by w: what PEFT serves at scale w (its DoRA norm included)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    sd = load_file(str(src / "adapter_model.safetensors"))
    save_file({k: v * w if ".lora_B." in k else v for k, v in sd.items()}, str(dst / "adapter_model.safetensors"))
    return dst


@pytest.mark.parametrize("lora_backend", ["cpp", "torch"])
def test_dora_at_request_weights_matches_peft_with_scaled_b(setup, run_engine, tmp_path, lora_backend):
    """A DoRA adapter alone at weights 0, 0.5, 1 and 2 in one batch (with a plain LoRA row at 0.5): g
    follows the weight, g = m / ||W + w s B A||, so each row equals PEFT with B scaled by w."""
    path, adapters = setup
    llm = _llm(path, adapters, kernels=f"lora={lora_backend}")
    specs = [[("dora_r8_rslora_all", w)] for w in (0.0, 0.5, 1.0, 2.0)] + [[("lora_r8_attn", 0.5)],
                                                                          [("dora_r4_qv", 0.5)]]
    prompts = [[(7 * i + j) % 250 + 3 for j in range(5 + 3 * i)] for i in range(len(specs))]
    outs, rows = run_engine(llm, prompts, specs)
    for i, (spec, prompt, out) in enumerate(zip(specs, prompts, outs)):
        (name, w), = spec
        ref_adapter = _scaled_b(adapters[name], tmp_path / f"{name}_{i}", w)
        toks = out.outputs[0].token_ids
        want = peft_logits(path, ref_adapter, prompt + toks)[len(prompt) - 1:-1]
        torch.testing.assert_close(torch.stack(rows[i]), want, atol=ATOL, rtol=0, msg=lambda m: f"{spec}: {m}")
        assert toks == want.argmax(-1).tolist(), spec
