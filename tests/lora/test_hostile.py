"""Hostile adapter files fail that adapter alone, with a clear error and before any large allocation: a
100 GB header claim, offsets out of the file, overlapping or mis-sized tensors, unknown dtypes, NaN
weights, files above the size limit, folders and symlinks outside the allowed roots, kinds the server
does not allow. Hypothesis fuzzes the safetensors header, the adapter config and the manifest parser:
every input either parses or raises the parser's own error."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from openlora.errors import AdapterLoadError, InvalidRequest, OpenLoRAError
from openlora.lora.adapter import load_peft_adapter
from openlora.lora.file_checks import MAX_HEADER_BYTES, check_safetensors
from openlora.lora.sources import check_allowed, parse_source

SHAPE_ARGS = dict(num_layers=2, hidden_size=64, q_size=64, kv_size=32, intermediate_size=128, vocab_size=128)


def _shape():
    from openlora.config import ModelShape

    return ModelShape(**SHAPE_ARGS)


def _adapter(folder: Path, fill: float | None = None) -> Path:
    """A valid r=4 adapter on q_proj and v_proj (fill: every value of layer 0's q A set to it)."""
    g = torch.Generator().manual_seed(0)
    t = {}
    for layer in range(2):
        for site, fin, fout in (("q_proj", 64, 64), ("v_proj", 64, 32)):
            pre = f"base_model.model.model.layers.{layer}.self_attn.{site}"
            t[f"{pre}.lora_A.weight"] = torch.randn(4, fin, generator=g)
            t[f"{pre}.lora_B.weight"] = torch.randn(fout, 4, generator=g)
    if fill is not None:
        t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].fill_(fill)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(t, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "bias": "none"}))
    return folder


def _raw(path: Path, header: dict | bytes, data: bytes = b"", length: int | None = None) -> Path:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h) if length is None else length) + h + data)
    return path


def _load(folder: Path, **kw):
    return load_peft_adapter(folder, "x", _shape(), **kw)


def test_a_valid_adapter_loads(tmp_path):
    assert _load(_adapter(tmp_path / "ok")).max_rank == 4


@pytest.mark.parametrize("case,header,data,length,word", [
    ("100 GB header claim", {}, b"", 100 << 30, "header length"),
    ("header longer than the file", {}, b"", 4096, "header length"),
    ("not JSON", b"{nope", b"", None, "not valid JSON"),
    ("offsets past the end", {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, b"\0" * 8, None,
     "outside the file"),
    ("size differs from shape", {"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 16]}}, b"\0" * 16,
     None, "needs 64"),
    ("overlap", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                 "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, None, "overlap"),
    ("integer dtype", {"w": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8, None, "dtype"),
    ("negative dim", {"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, b"", None, "invalid shape"),
])
def test_malformed_safetensors_headers_are_refused_before_loading(tmp_path, case, header, data, length, word):
    folder = _adapter(tmp_path / "a")
    _raw(folder / "adapter_model.safetensors", header, data, length)
    with pytest.raises(AdapterLoadError, match=word):
        _load(folder)


def test_nan_weights_size_limit_and_non_files(tmp_path):
    with pytest.raises(AdapterLoadError, match="NaN or infinite"):
        _load(_adapter(tmp_path / "nan", fill=float("nan")))
    with pytest.raises(AdapterLoadError, match="NaN or infinite"):
        _load(_adapter(tmp_path / "inf", fill=float("inf")))
    big = _adapter(tmp_path / "big")
    size = (big / "adapter_model.safetensors").stat().st_size
    with pytest.raises(AdapterLoadError, match="above the limit"):
        _load(big, max_bytes=size - 1)
    assert _load(big, max_bytes=size).max_rank == 4
    odd = _adapter(tmp_path / "dir")
    (odd / "adapter_model.safetensors").unlink()
    (odd / "adapter_model.safetensors").mkdir()  # a folder where the weights should be
    with pytest.raises(AdapterLoadError):
        _load(odd)


def test_local_sources_stay_inside_the_roots(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    ok = _adapter(root / "ok")
    _adapter(outside / "evil")
    check_allowed(parse_source(str(ok)), ("local",), [root])
    with pytest.raises(InvalidRequest, match="outside the allowed adapter roots"):
        check_allowed(parse_source(str(outside / "evil")), ("local",), [root])
    escape = root / "escape"  # a folder inside the root whose weights are a symlink leading out of it
    escape.mkdir()
    (escape / "adapter_config.json").write_text((ok / "adapter_config.json").read_text())
    (escape / "adapter_model.safetensors").symlink_to(outside / "evil" / "adapter_model.safetensors")
    with pytest.raises(InvalidRequest, match="links outside"):
        check_allowed(parse_source(str(escape)), ("local",), [root])
    linked_root = root / "link"  # a symlinked folder pointing out of the root
    linked_root.symlink_to(outside / "evil")
    with pytest.raises(InvalidRequest, match="outside"):
        check_allowed(parse_source(str(linked_root)), ("local",), [root])
    with pytest.raises(InvalidRequest, match="kind 'hub' are not allowed"):
        check_allowed(parse_source("hf://org/name"), ("local", "s3"), None)
    check_allowed(parse_source(str(outside / "evil")), ("local",), None)  # the operator's own command line


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(st.binary(max_size=300), st.one_of(st.none(), st.integers(0, 1 << 40)))
def test_fuzz_safetensors_header_bytes(tmp_path, blob, length):
    p = tmp_path / "fuzz.safetensors"
    p.write_bytes((struct.pack("<Q", length) if length is not None else b"") + blob)
    try:
        check_safetensors(p, 1 << 20)
    except AdapterLoadError:
        pass


_json = st.recursive(st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False)
                     | st.text(max_size=12), lambda kids: st.lists(kids, max_size=4)
                     | st.dictionaries(st.text(max_size=10), kids, max_size=4), max_leaves=12)
_entry = st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "F16", "BF16", "I8", "F64", 3]),
                                "shape": st.lists(st.integers(-2, 6), max_size=3) | _json,
                                "data_offsets": st.lists(st.integers(-4, 80), max_size=3) | _json})


@FUZZ
@given(st.dictionaries(st.text(max_size=8), _entry | _json, max_size=4), st.binary(max_size=80))
def test_fuzz_safetensors_header_structure(tmp_path, header, data):
    p = _raw(tmp_path / "fuzz.safetensors", header, data)
    try:
        out = check_safetensors(p, 1 << 20)
    except AdapterLoadError:
        return
    from safetensors.torch import load_file

    loaded = load_file(str(p))  # what the check admits, the real reader reads
    assert {k: tuple(v.shape) for k, v in loaded.items()} == {k: s for k, (_, s) in out.items()}


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_json | st.dictionaries(st.sampled_from(["r", "lora_alpha", "target_modules", "rank_pattern", "use_dora",
                                                "bias", "layers_to_transform", "modules_to_save", "use_rslora",
                                                "alpha_pattern", "layers_pattern", "peft_type"]), _json, max_size=6))
def test_fuzz_adapter_config(tmp_path, cfg):
    folder = _adapter(tmp_path / "cfg")
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    try:
        _load(folder)
    except OpenLoRAError:
        pass


@FUZZ
@given(_json | st.dictionaries(st.sampled_from(["owner", "version", "base_model", "datasets", "prices", "split",
                                                "access", "adapter"]), _json, max_size=8))
def test_fuzz_manifest_parser(raw):
    from openlora.attribution.manifest import parse_manifest

    try:
        parse_manifest(raw)
    except OpenLoRAError:
        pass


def test_max_header_is_generous_for_real_adapters():
    assert MAX_HEADER_BYTES >= 1 << 20
