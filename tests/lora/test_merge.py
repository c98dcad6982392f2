"""Adapter merges (openlora.lora.merge) against PEFT's add_weighted_adapter."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from openlora.config import LORA_SITES, ModelShape
from openlora.errors import InvalidRequest
from openlora.lora.adapter import LoRAAdapter, LoRAModule, load_peft_adapter
from openlora.lora.merge import STRATEGIES, merge_adapters, merge_key

TOL = dict(atol=1e-5, rtol=1e-5)
IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))

# Equal ranks (needed by linear/ties/dare/magnitude_prune), different alphas and target sets.
EQUAL = {
    "a": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
    "b": dict(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"]),
    "c": dict(r=8, lora_alpha=4, target_modules=["q_proj", "k_proj", "up_proj"]),
}
# Different ranks (cat and the SVD family).
MIXED = {
    "d": dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"]),
    "e": dict(r=8, lora_alpha=8, target_modules=["q_proj", "gate_proj"]),
    "f": dict(r=6, lora_alpha=24, target_modules=["o_proj", "down_proj"]),
}


def _module(model, layer: int, site: str):
    blk = model.model.layers[layer]
    return getattr(blk.self_attn if site in ("q_proj", "k_proj", "v_proj", "o_proj") else blk.mlp, site)


class Bench:
    """One PeftModel holding every source adapter (merges are added to it) plus our parsed copies."""

    def __init__(self, save_peft, base, root: Path, specs: dict[str, dict], shape: ModelShape) -> None:
        from peft import PeftModel

        self.base = base
        first = True
        for i, (name, kw) in enumerate(specs.items()):
            save_peft(base, root / name, seed=10 + i, **kw)
            if first:
                self.pm = PeftModel.from_pretrained(copy.deepcopy(base), str(root / name), adapter_name=name).eval()
                first = False
            else:
                self.pm.load_adapter(str(root / name), adapter_name=name)
        self.ours = {name: load_peft_adapter(root / name, name, shape) for name in specs}

    def peft_merge(self, names: list[str], weights: list[float], strategy: str, out: str, seed: int | None = None,
                   **kw) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]]:
        """PEFT's merged (A, B, scaling) per module.

        NOTE: add_weighted_adapter first injects the new adapter, whose (discarded) init weights
        draw from the global RNG; we seed right after that injection, where the DARE masks start.
        """
        tuner = self.pm.base_model
        inject = tuner.inject_adapter

        def inject_then_seed(*args, **kwargs):
            result = inject(*args, **kwargs)
            if seed is not None:
                torch.manual_seed(seed)
            return result

        tuner.inject_adapter = inject_then_seed
        try:
            self.pm.add_weighted_adapter(names, weights, out, combination_type=strategy, **kw)
        finally:
            del tuner.inject_adapter  # back to the class method
        got = {}
        for layer in range(len(self.pm.base_model.model.model.layers)):
            for site in LORA_SITES:
                mod = _module(self.pm.base_model.model, layer, site)
                if hasattr(mod, "lora_A") and out in mod.lora_A:
                    got[(layer, site)] = (mod.lora_A[out].weight.detach(), mod.lora_B[out].weight.detach(),
                                          mod.scaling[out])
        return got

    def peft_logits(self, adapter: str) -> torch.Tensor:
        self.pm.set_adapter(adapter)
        with torch.no_grad():
            return self.pm(input_ids=IDS).logits

    def manual_logits(self, adapter: LoRAAdapter) -> torch.Tensor:
        return manual_logits(self.base, adapter)


def manual_logits(base, adapter: LoRAAdapter) -> torch.Tensor:
    """Logits of `base` with `scaling * B @ A` added to each adapted weight by hand."""
    model = copy.deepcopy(base)
    with torch.no_grad():
        for (layer, site), m in adapter.modules.items():
            _module(model, layer, site).weight += m.delta_weight()
        return model(input_ids=IDS).logits


@pytest.fixture(scope="module")
def equal(save_peft, llama_base, shape, tmp_path_factory) -> Bench:
    return Bench(save_peft, llama_base, tmp_path_factory.mktemp("equal"), EQUAL, shape)


@pytest.fixture(scope="module")
def mixed(save_peft, llama_base, shape, tmp_path_factory) -> Bench:
    return Bench(save_peft, llama_base, tmp_path_factory.mktemp("mixed"), MIXED, shape)


def _check_against_peft(bench: Bench, names: list[str], weights: list[float], strategy: str, out: str,
                        seed: int | None = None, **kw) -> LoRAAdapter:
    ours = merge_adapters([bench.ours[n] for n in names], weights, strategy, seed=seed, **kw)
    theirs = bench.peft_merge(names, weights, strategy, out, seed=seed, **kw)
    assert set(ours.modules) == set(theirs)
    for key, (a, b, scaling) in theirs.items():
        m = ours.modules[key]
        assert scaling == 1.0 and m.scaling == 1.0
        r = m.rank  # cat: PEFT zero-pads to the summed rank, we keep the real rows
        torch.testing.assert_close(m.a, a[:r], **TOL)
        torch.testing.assert_close(m.b, b[:, :r], **TOL)
        assert not a[r:].any() and not b[:, r:].any()
    torch.testing.assert_close(bench.manual_logits(ours), bench.peft_logits(out), **TOL)
    return ours


@pytest.mark.parametrize("strategy, kw", [
    ("linear", {}),
    ("ties", dict(density=0.5)),
    ("ties", dict(density=0.3, majority_sign_method="frequency")),
    ("dare_linear", dict(density=0.6)),
    ("dare_ties", dict(density=0.4)),
    ("magnitude_prune", dict(density=0.7)),
    ("cat", {}),
    ("svd", {}),
])
def test_equal_rank_strategies_match_peft(equal: Bench, strategy: str, kw: dict) -> None:
    out = f"{strategy}_{len(kw)}_{kw.get('majority_sign_method', '')}"
    _check_against_peft(equal, ["a", "b", "c"], [0.7, -0.4, 0.5], strategy, out, seed=123, **kw)


@pytest.mark.parametrize("strategy, kw", [
    ("cat", {}),
    ("svd", {}),
    ("svd", dict(svd_rank=3, svd_clamp=0.9)),
    ("ties_svd", dict(density=0.5, svd_rank=5)),
    ("dare_linear_svd", dict(density=0.5)),
    ("dare_ties_svd", dict(density=0.3, majority_sign_method="frequency")),
    ("magnitude_prune_svd", dict(density=0.6, svd_rank=12)),
])
def test_mixed_rank_strategies_match_peft(mixed: Bench, strategy: str, kw: dict) -> None:
    out = f"{strategy}_{'_'.join(f'{k}{v}' for k, v in kw.items())}".replace(".", "")
    _check_against_peft(mixed, ["d", "e", "f"], [1.0, 0.5, -0.8], strategy, out, seed=7, **kw)


def test_single_adapter_is_linear_like_peft(mixed: Bench) -> None:
    ours = _check_against_peft(mixed, ["f"], [0.6], "ties", "single_ties", density=0.2)
    for key, m in ours.modules.items():  # sqrt(w s) on each factor: the product is exact
        torch.testing.assert_close(m.delta_weight(), 0.6 * mixed.ours["f"].modules[key].delta_weight(), **TOL)


def test_cat_and_delta_svd_are_exact(mixed: Bench) -> None:
    srcs, ws = [mixed.ours[n] for n in "def"], [1.0, 0.5, -0.8]
    want = {}
    for a, w in zip(srcs, ws):
        for key, m in a.modules.items():
            want[key] = want.get(key, 0) + w * m.delta_weight()
    cat = merge_adapters(srcs, ws, "cat")
    full = merge_adapters(srcs, ws, "delta_svd", svd_rank=18)  # >= summed rank: no truncation
    for key, d in want.items():
        torch.testing.assert_close(cat.modules[key].delta_weight(), d, **TOL)
        torch.testing.assert_close(full.modules[key].delta_weight(), d, **TOL)
    # Truncated: the best rank-k approximation (Eckart-Young), each scaling applied once.
    low = merge_adapters(srcs, ws, "delta_svd", svd_rank=2)
    d = want[(0, "q_proj")].double()
    s = torch.linalg.svdvals(d)
    err = torch.linalg.matrix_norm(low.modules[(0, "q_proj")].delta_weight().double() - d)
    assert low.modules[(0, "q_proj")].rank == 2
    assert err == pytest.approx(float(s[2:].norm()), rel=1e-4)
    # PEFT's svd (fp32, full matrices) agrees with delta_svd up to singular-vector signs.
    peft_like = merge_adapters(srcs, ws, "svd", svd_rank=2)
    torch.testing.assert_close(peft_like.modules[(0, "q_proj")].delta_weight(),
                               low.modules[(0, "q_proj")].delta_weight(), atol=1e-4, rtol=1e-4)


def test_finding_svd_scaling(save_peft, tmp_path: Path, llama_base, shape: ModelShape) -> None:
    """PEFT's SVD merge folds each scaling in once; a first adapter with rslora makes it sqrt(r) too big."""
    for rslora, alpha, ratio in ((False, 32, 1.0), (True, 16, 8 ** 0.5)):
        b = Bench(save_peft, llama_base, tmp_path / str(rslora), {
            "x": dict(r=8, lora_alpha=alpha, use_rslora=rslora, target_modules=["q_proj"]),
            "y": dict(r=8, lora_alpha=alpha, use_rslora=rslora, target_modules=["q_proj"]),
        }, shape)
        theirs = b.peft_merge(["x", "y"], [1.0, 0.0], "svd", "m", svd_rank=8)
        a_, b_, scaling = theirs[(0, "q_proj")]
        src = b.ours["x"].modules[(0, "q_proj")]
        peft_delta = (b_ @ a_) * scaling
        assert scaling == pytest.approx(ratio)  # 1.0, or 8 / sqrt(8) = 2.828 with rslora
        torch.testing.assert_close(peft_delta, ratio * src.delta_weight(), atol=1e-4, rtol=1e-4)
        ours = merge_adapters([b.ours["x"], b.ours["y"]], [1.0, 0.0], "svd", svd_rank=8)
        torch.testing.assert_close(ours.modules[(0, "q_proj")].delta_weight(), src.delta_weight(),
                                   atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------- DARE


def _pair(seed: int = 0, r: int = 4, n: int = 32) -> list[LoRAAdapter]:
    g = torch.Generator().manual_seed(seed)
    return [LoRAAdapter(str(i), None, {}, None, {(0, "q_proj"): LoRAModule(
        torch.randn(r, n, generator=g), torch.randn(n, r, generator=g), 0.5 + i)}) for i in range(2)]


@pytest.mark.parametrize("strategy", ["dare_linear", "dare_ties", "dare_linear_svd"])
def test_dare_seed_reproducible(strategy: str) -> None:
    ads = _pair()
    one = merge_adapters(ads, [0.5, 0.5], strategy, density=0.5, seed=3).modules[(0, "q_proj")]
    two = merge_adapters(ads, [0.5, 0.5], strategy, density=0.5, seed=3).modules[(0, "q_proj")]
    other = merge_adapters(ads, [0.5, 0.5], strategy, density=0.5, seed=4).modules[(0, "q_proj")]
    assert torch.equal(one.a, two.a) and torch.equal(one.b, two.b)
    assert not torch.equal(one.b @ one.a, other.b @ other.a)


def test_dare_density_one_equals_linear() -> None:
    ads = _pair()
    lin = merge_adapters(ads, [0.3, 0.9], "linear").modules[(0, "q_proj")]
    dare = merge_adapters(ads, [0.3, 0.9], "dare_linear", density=1.0, seed=1).modules[(0, "q_proj")]
    assert torch.equal(lin.a, dare.a) and torch.equal(lin.b, dare.b)


def test_dare_rescales_by_inverse_density() -> None:
    """Every surviving entry is exactly (weighted value) / density; dropped ones are 0."""
    ads = _pair(r=8, n=64)
    density, w = 0.25, [0.8, 0.0]  # a zero weight isolates adapter 0's entries
    m = merge_adapters(ads, w, "dare_linear", density=density, seed=5).modules[(0, "q_proj")]
    c = (w[0] * ads[0].modules[(0, "q_proj")].scaling) ** 0.5
    src = ads[0].modules[(0, "q_proj")]
    kept = m.a != 0
    torch.testing.assert_close(m.a[kept], c * src.a[kept] / density)
    torch.testing.assert_close(m.b[m.b != 0], c * src.b[m.b != 0] / density)
    frac = kept.float().mean().item()
    assert 0.15 < frac < 0.35  # ~density of 512 entries survive


def test_ties_sign_election_by_hand() -> None:
    """3 adapters, one entry each sign pattern: TIES averages only the entries of the elected sign."""
    def ad(i: int, a: list[float]) -> LoRAAdapter:
        return LoRAAdapter(str(i), None, {}, None, {(0, "q_proj"): LoRAModule(
            torch.tensor([a]), torch.ones(1, 1), 1.0)})

    ads = [ad(0, [1.0, -2.0, 3.0]), ad(1, [2.0, 1.0, -1.0]), ad(2, [-4.0, 0.5, -1.0])]
    m = merge_adapters(ads, [1.0, 1.0, 1.0], "ties", density=1.0).modules[(0, "q_proj")]
    # col 0: total 1+2-4 = -1 -> sign -, only -4 kept -> -4; col 1: total -0.5 -> only -2 -> -2;
    # col 2: total +1 -> only 3 -> 3. (Weights are sqrt(1*1) = 1 on A.)
    torch.testing.assert_close(m.a, torch.tensor([[-4.0, -2.0, 3.0]]))
    freq = merge_adapters(ads, [1.0, 1.0, 1.0], "ties", density=1.0,
                          majority_sign_method="frequency").modules[(0, "q_proj")]
    # frequency: col 0 two + -> mean(1, 2) = 1.5; col 1 two + -> mean(1, .5) = .75; col 2 two - -> -1.
    torch.testing.assert_close(freq.a, torch.tensor([[1.5, 0.75, -1.0]]))


# ------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("kwargs, field", [
    (dict(strategy="average"), "strategy"),
    (dict(strategy="ties", density=0.0), "density"),
    (dict(strategy="ties", density=1.5), "density"),
    (dict(strategy="dare_ties"), "density"),
    (dict(strategy="linear", weights=[1.0]), "weights"),
    (dict(strategy="linear", weights=[1.0, float("nan")]), "weights"),
    (dict(strategy="svd", svd_rank=0), "svd_rank"),
    (dict(strategy="svd", svd_clamp=1.5), "svd_clamp"),
    (dict(strategy="ties", density=0.5, majority_sign_method="mean"), "majority_sign_method"),
])
def test_bad_inputs(kwargs: dict, field: str) -> None:
    kw = dict(kwargs)
    strategy, weights = kw.pop("strategy"), kw.pop("weights", [0.5, 0.5])
    with pytest.raises(InvalidRequest, match=f"^{field}:") as e:
        merge_adapters(_pair(), weights, strategy, **kw)
    assert e.value.status == 400


def test_unequal_ranks_rejected_where_needed() -> None:
    ads = [_pair(r=4)[0], _pair(r=2)[1]]
    for strategy in ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"):
        with pytest.raises(InvalidRequest, match="^adapters: .*equal rank"):
            merge_adapters(ads, [0.5, 0.5], strategy, density=0.5)
    for strategy in ("cat", "svd", "ties_svd", "delta_svd"):
        assert merge_adapters(ads, [0.5, 0.5], strategy, density=0.5).modules
    with pytest.raises(InvalidRequest, match="^adapters:"):
        merge_adapters([], [], "cat")


def test_merge_key() -> None:
    ads = _pair()
    base = merge_key(ads, [0.5, 0.5], "ties", {"density": 0.5})
    assert base == merge_key(ads, [0.5, 0.5], "ties", {"density": 0.5})
    renamed = [LoRAAdapter("renamed", None, {}, None, a.modules) for a in ads]
    assert base == merge_key(renamed, [0.5, 0.5], "ties", {"density": 0.5})
    assert base != merge_key(ads, [0.5, 0.6], "ties", {"density": 0.5})
    assert base != merge_key(ads, [0.5, 0.5], "dare_ties", {"density": 0.5})
    assert base != merge_key(ads, [0.5, 0.5], "ties", {"density": 0.6})
    assert base != merge_key(ads[::-1], [0.5, 0.5], "ties", {"density": 0.5})
    merged = merge_adapters(ads, [0.5, 0.5], "cat")
    assert merged.adapter_id.startswith("merge-") and merged.config["openlora_merge"]["strategy"] == "cat"
    assert set(STRATEGIES) >= {"cat", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune", "svd",
                               "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd", "delta_svd"}


# -------------------------------------------------------------------------------------------- CLI


def _cli(argv: list[str]) -> int:
    import argparse

    from openlora.lora.merge_cli import add_adapter_commands

    parser = argparse.ArgumentParser(prog="openlora")
    add_adapter_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.mark.parametrize("with_base", [False, True])
def test_cli_merge_written_folder_loads_in_peft(save_peft, tmp_path: Path, llama_base, shape: ModelShape,
                                                capsys, with_base: bool) -> None:
    import json

    from peft import PeftModel

    src = {n: tmp_path / n for n in "ab"}
    for i, n in enumerate("ab"):
        save_peft(llama_base, src[n], seed=30 + i, **EQUAL[n])
    argv = ["adapters", "merge", "--strategy", "ties", "--density", "0.5", f"{src['a']}:0.7", f"{src['b']}:0.3",
            "-o", str(tmp_path / "out"), "--seed", "1"]
    if with_base:
        llama_base.save_pretrained(str(tmp_path / "base"))
        argv += ["--base-model", str(tmp_path / "base")]
    assert _cli(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["strategy"] == "ties" and len(summary["sources"]) == 2

    ours = merge_adapters([load_peft_adapter(src[n], n, shape) for n in "ab"], [0.7, 0.3], "ties",
                          density=0.5, seed=1)
    assert summary["content_hash"] == ours.content_hash
    written = load_peft_adapter(tmp_path / "out", "w", shape)
    assert written.content_hash == ours.content_hash
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == (str(tmp_path / "base") if with_base else None)

    peft_model = PeftModel.from_pretrained(copy.deepcopy(llama_base), str(tmp_path / "out")).eval()
    with torch.no_grad():
        got = peft_model(input_ids=IDS).logits
    torch.testing.assert_close(got, manual_logits(llama_base, ours), **TOL)


def test_cli_errors(save_peft, tmp_path: Path, llama_base, capsys) -> None:
    from openlora.lora.merge_cli import parse_source

    assert parse_source("/x/y:0.25") == ("/x/y", 0.25)
    assert parse_source("/x/y") == ("/x/y", 1.0)
    assert parse_source("C:dir") == ("C:dir", 1.0)
    assert _cli(["adapters", "merge", str(tmp_path / "missing"), "-o", str(tmp_path / "o")]) == 2
    assert "not a local adapter folder" in capsys.readouterr().err
    save_peft(llama_base, tmp_path / "a", seed=1, r=4, lora_alpha=8)
    save_peft(llama_base, tmp_path / "b", seed=2, r=2, lora_alpha=8)
    rc = _cli(["adapters", "merge", "--strategy", "linear", f"{tmp_path / 'a'}:1", f"{tmp_path / 'b'}:1",
               "-o", str(tmp_path / "o")])
    assert rc == 2 and "equal rank" in capsys.readouterr().err
    # A base model whose shape does not fit the adapters is a load error (exit 1).
    import json

    (tmp_path / "base").mkdir()
    cfg = dict(architectures=["LlamaForCausalLM"], hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    (tmp_path / "base" / "config.json").write_text(json.dumps(cfg))
    rc = _cli(["adapters", "merge", str(tmp_path / "a"), "-o", str(tmp_path / "o"), "--base-model",
               str(tmp_path / "base")])
    assert rc == 1 and "expected" in capsys.readouterr().err
