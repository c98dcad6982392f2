"""Adapter types beside plain LoRA (openlora.lora.adapter_types), on files PEFT 0.21.2 writes itself:
VeRA converts exactly to LoRA; LoHa, LoKr, OFT, BOFT, IA3, AdaLoRA and LoRA trained against modified base
weights (PiSSA, OLoRA, CorDA, LoftQ) are refused with the fix named, while a PiSSA adapter converted
by PEFT loads and serves; LyCORIS / kohya files (hand-written: PEFT does not write them) are refused.

Tolerances, fp32: per-module VeRA deltas 1e-5 (as tests/lora/test_adapter.py), engine logits 1e-4 (as
tests/lora/test_engine_vs_peft.py), and the greedy tokens agree exactly."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import load_hf

from openlora import LLM
from openlora.config import LORA_SITES, ModelShape
from openlora.errors import UnsupportedAdapter
from openlora.lora.adapter import infer_shape, load_peft_adapter

TOL = dict(atol=1e-5, rtol=1e-5)
ATOL = 1e-4
PROMPT = [5, 17, 33, 2, 90, 11]
VERA_SITES = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]  # every in/out size of the model


def make_vera(base: torch.nn.Module, folder: Path, seed: int, **kw):
    """A PEFT VeRA model with random non-zero lambdas (PEFT inits lambda_b to 0), saved to `folder`."""
    from peft import VeraConfig, get_peft_model

    kw.setdefault("target_modules", VERA_SITES)
    pm = get_peft_model(copy.deepcopy(base), VeraConfig(vera_dropout=0.0, **kw)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "vera_lambda_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    pm.save_pretrained(str(folder))
    return pm


def engine_vs(model_path: Path, adapter: Path, reference: torch.nn.Module, run_engine, hf_logits) -> None:
    """The engine serving `adapter` on the original base equals `reference` (logits and greedy tokens),
    and the adapter does move the logits."""
    llm = LLM(str(model_path), dtype="float32", block_size=4, num_kv_blocks=64)
    llm.register_adapter("a", str(adapter))
    outs, rows = run_engine(llm, [PROMPT, PROMPT], ["a", None], max_tokens=5)
    toks = outs[0].outputs[0].token_ids
    want = hf_logits(reference, PROMPT + toks)[len(PROMPT) - 1: len(PROMPT) - 1 + len(toks)]
    got = torch.stack(rows[0])
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert want.argmax(-1).tolist() == toks
    assert (got[0] - rows[1][0]).abs().max() > 100 * ATOL  # not a no-op adapter


# ---------------------------------------------------------------------------------------------- VeRA


@pytest.mark.parametrize("kw", [
    dict(r=8),
    dict(r=4, target_modules=["k_proj", "up_proj", "down_proj"], layers_to_transform=[1], layers_pattern="layers"),
])
def test_vera_converts_to_exact_lora(llama_base, shape: ModelShape, tmp_path: Path, kw: dict) -> None:
    from peft.tuners.vera import VeraLayer

    pm = make_vera(llama_base, tmp_path, seed=1, **kw)
    adapter = load_peft_adapter(tmp_path, "v", shape)
    layers = {}
    for i, layer in enumerate(pm.base_model.model.model.layers):
        for site in LORA_SITES:
            mod = getattr(layer.self_attn if hasattr(layer.self_attn, site) else layer.mlp, site)
            if isinstance(mod, VeraLayer):
                layers[(i, site)] = mod
    assert set(adapter.modules) == set(layers) and layers
    g = torch.Generator().manual_seed(2)
    for key, mod in layers.items():
        m = adapter.modules[key]
        assert m.rank == kw["r"] and m.scaling == 1.0  # VeRA has no alpha: plain B'A'
        x = torch.randn(5, mod.in_features, generator=g)  # [tokens, in_features]
        with torch.no_grad():
            want = mod(x) - mod.base_layer(x)  # PEFT's VeRA forward, [tokens, out_features]
        torch.testing.assert_close(x @ m.delta_weight().T, want, **TOL)


def test_vera_in_engine_matches_peft(tiny_model_factory, tmp_path: Path, run_engine, hf_logits) -> None:
    from peft import PeftModel

    path = tiny_model_factory("llama")
    make_vera(load_hf(path), tmp_path / "vera", seed=3, r=8)
    ref = PeftModel.from_pretrained(load_hf(path), str(tmp_path / "vera")).eval()  # PEFT reads the same file
    engine_vs(path, tmp_path / "vera", ref, run_engine, hf_logits)


def test_vera_without_projections_is_refused(llama_base, shape: ModelShape, tmp_path: Path) -> None:
    with pytest.warns(UserWarning):  # PEFT itself warns that the PRNG-rebuilt projections may differ
        make_vera(llama_base, tmp_path, seed=4, r=4, save_projection=False)
    with pytest.raises(UnsupportedAdapter, match=r"VeRA.*save_projection=True"):
        load_peft_adapter(tmp_path, "v", shape)


def test_vera_infer_shape_asks_for_the_base_model(llama_base, tmp_path: Path) -> None:
    make_vera(llama_base, tmp_path, seed=5, r=4)
    with pytest.raises(UnsupportedAdapter, match="VeRA.*base model"):
        infer_shape([tmp_path])


# ---------------------------------------------------------------------------------- other PEFT types


def _other_config(kind: str):
    import peft

    t = ["q_proj", "v_proj"]
    return {
        "LOHA": lambda: peft.LoHaConfig(r=4, target_modules=t),
        "LOKR": lambda: peft.LoKrConfig(r=4, target_modules=t),
        "OFT": lambda: peft.OFTConfig(oft_block_size=4, r=0, target_modules=t),
        "BOFT": lambda: peft.BOFTConfig(boft_block_size=4, target_modules=t),
        "IA3": lambda: peft.IA3Config(target_modules=t, feedforward_modules=[]),
        "ADALORA": lambda: peft.AdaLoraConfig(r=4, total_step=10, target_modules=t),
    }[kind]()


@pytest.mark.parametrize("kind", ["LOHA", "LOKR", "OFT", "BOFT", "IA3", "ADALORA"])
def test_other_peft_types_are_refused(llama_base, shape: ModelShape, tmp_path: Path, kind: str) -> None:
    from peft import get_peft_model

    get_peft_model(copy.deepcopy(llama_base), _other_config(kind)).save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == kind
    with pytest.raises(UnsupportedAdapter, match=rf"peft_type '{kind}' is not supported.*merge_and_unload"):
        load_peft_adapter(tmp_path, "x", shape)


# ------------------------------------------------------------------------ adapters on a modified base


def _save_lora(base: torch.nn.Module, folder: Path, init, **kw):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                     init_lora_weights=init, **kw)
    if init == "corda":  # CorDA needs activation statistics before get_peft_model
        from peft.tuners.lora.config import CordaConfig
        from peft.tuners.lora.corda import preprocess_corda

        cfg.corda_config = CordaConfig(corda_method="kpm")
        base = copy.deepcopy(base)
        preprocess_corda(base, cfg, run_model=lambda: base(torch.arange(3, 19)[None]))
    pm = get_peft_model(copy.deepcopy(base), cfg).eval()
    pm.save_pretrained(str(folder))
    return pm


@pytest.mark.parametrize("init, method", [
    ("pissa", "PiSSA"), ("pissa_niter_2", "PiSSA"), ("olora", "OLoRA"), ("corda", "CorDA"),
])
def test_modified_base_inits_are_refused(llama_base, shape: ModelShape, tmp_path: Path, init: str,
                                         method: str) -> None:
    _save_lora(llama_base, tmp_path, init)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == init
    with pytest.raises(UnsupportedAdapter, match=rf"{init}.*{method}.*path_initial_model_for_weight_conversion"):
        load_peft_adapter(tmp_path, "x", shape)


@pytest.mark.parametrize("change", [
    # What PEFT writes for LoftQ (it needs bitsandbytes to run, so the config is edited in).
    dict(init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 1}),
    # PEFT empties loftq_config unless init is "loftq": a non-empty one is refused all the same.
    dict(init_lora_weights=True, loftq_config={"loftq_bits": 4, "loftq_iter": 1}),
])
def test_loftq_is_refused(llama_base, shape: ModelShape, tmp_path: Path, change: dict) -> None:
    _save_lora(llama_base, tmp_path, True)
    p = tmp_path / "adapter_config.json"
    p.write_text(json.dumps({**json.loads(p.read_text()), **change}))
    with pytest.raises(UnsupportedAdapter, match="LoftQ.*path_initial_model_for_weight_conversion"):
        load_peft_adapter(tmp_path, "x", shape)


def test_converted_pissa_loads_and_equals_the_trained_pissa_model(tiny_model_factory, shape: ModelShape,
                                                                  tmp_path: Path, run_engine, hf_logits) -> None:
    path = tiny_model_factory("llama")
    pm = _save_lora(load_hf(path), tmp_path / "init", "pissa")  # PEFT's recipe: save right after init
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():  # "training": move A and B away from their SVD init
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    pm.save_pretrained(str(tmp_path / "pissa"))
    pm.save_pretrained(str(tmp_path / "lora"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    # Unconverted: refused. Converted: PEFT marks it only by init_lora_weights=true and a doubled rank.
    with pytest.raises(UnsupportedAdapter, match="PiSSA"):
        load_peft_adapter(tmp_path / "pissa", "x", shape)
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["init_lora_weights"] is True and cfg["r"] == 8 and cfg["lora_alpha"] == 16
    assert load_peft_adapter(tmp_path / "lora", "x", shape).max_rank == 8
    # On the original base, the converted LoRA reproduces the trained PiSSA model (residual base + adapter).
    engine_vs(path, tmp_path / "lora", pm, run_engine, hf_logits)


# ------------------------------------------------------------------------------- LyCORIS / kohya files


def _write(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A folder with a plain LoRA adapter_config.json beside a hand-written weights file."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 4, "target_modules": ["q_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
    return folder


def _kohya(prefix: str, out_f: int = 64, in_f: int = 64, r: int = 4) -> dict[str, torch.Tensor]:
    return {f"{prefix}.lora_down.weight": torch.randn(r, in_f), f"{prefix}.lora_up.weight": torch.randn(out_f, r),
            f"{prefix}.alpha": torch.tensor(4.0)}


@pytest.mark.parametrize("layout", ["kohya_per_input", "kohya_per_output", "peft_names"])
def test_lycoris_dora_is_refused(shape: ModelShape, tmp_path: Path, layout: str) -> None:
    if layout == "peft_names":  # DoRA's scale next to PEFT-named lora_A / lora_B
        p = "base_model.model.model.layers.0.self_attn.q_proj"
        sd = {f"{p}.lora_A.weight": torch.randn(4, 64), f"{p}.lora_B.weight": torch.randn(64, 4),
              f"{p}.dora_scale": torch.rand(1, 64)}
        axis = "per input column"
    else:  # LyCORIS / kohya naming: one flat prefix per module
        p = "lycoris_model_layers_0_self_attn_q_proj"
        per_input = layout == "kohya_per_input"
        sd = {**_kohya(p), f"{p}.dora_scale": torch.rand(1, 64) if per_input else torch.rand(64, 1)}
        axis = "per input column" if per_input else "per output row"
    folder = _write(tmp_path / layout, sd)
    with pytest.raises(UnsupportedAdapter, match=rf"dora_scale.*LyCORIS / kohya DoRA.*{axis}.*not PEFT's use_dora"):
        load_peft_adapter(folder, "x", shape)


@pytest.mark.parametrize("suffixes, what", [
    ((".lora_down.weight", ".lora_up.weight", ".alpha"), "kohya / LyCORIS LoRA"),
    ((".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".alpha"), "LyCORIS LoHa"),
    ((".lokr_w1", ".lokr_w2", ".alpha"), "LyCORIS LoKr"),
])
def test_other_lycoris_files_are_refused(shape: ModelShape, tmp_path: Path, suffixes: tuple, what: str) -> None:
    folder = _write(tmp_path, {f"lycoris_model_layers_0_mlp_up_proj{s}": torch.ones(2, 2) for s in suffixes})
    with pytest.raises(UnsupportedAdapter, match=f"{what}.*convert it to PEFT format"):
        load_peft_adapter(folder, "x", shape)
