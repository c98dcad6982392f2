"""openlora.scale without a cluster: the error naming the extra, and the ingress's multiplexed model id."""

from __future__ import annotations

import json
import sys

import pytest

from openlora.scale import RAY_EXTRA, RayMissing, require_ray


def test_missing_ray_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError, as on a base install
    with pytest.raises(RayMissing, match=r"pip install 'openlora\[ray\]'"):
        require_ray()
    assert "openlora[ray]" in RAY_EXTRA


def test_serve_without_ray_exits_with_the_extra_named(monkeypatch, caplog):
    from openlora.cli import build_parser

    monkeypatch.setitem(sys.modules, "ray", None)
    args = build_parser().parse_args(["serve", "--model", "m", "--ray-replicas", "2"])
    assert args.func(args) == 2
    assert "openlora[ray]" in caplog.text


def test_adapter_id_is_the_multiplexed_model_id():
    pytest.importorskip("starlette")
    from openlora.scale.ingress import adapter_of

    def body(**d) -> bytes:
        return json.dumps(d).encode()

    assert adapter_of("/v1/completions", body(model="a1", prompt="x"), "base") == "a1"
    assert adapter_of("/v1/chat/completions", body(model="base", adapters=[{"id": "a2", "weight": 1}]), "base") == "a2"
    assert adapter_of("/v1/completions", body(model="base"), "base") == ""  # base model: any replica
    assert adapter_of("/v1/completions", b"{not json", "base") == ""  # the replica answers 400
    assert adapter_of("/v1/models", b"", "base") == ""
