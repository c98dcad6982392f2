"""Manifest validation (errors name the field), loading from an adapter folder, node identity."""

from __future__ import annotations

import json
import os
import stat

import pytest
from attr_helpers import C1, C2, OWNER, PAYER, manifest_dict

from openlora.attribution.identity import NodeIdentity
from openlora.attribution.manifest import AccessPolicy, load_manifest, parse_manifest
from openlora.errors import InvalidRequest


def _with(path: list, value):
    """A valid manifest with the value at `path` (list of keys/indexes) replaced or deleted."""
    m = manifest_dict()
    obj = m
    for k in path[:-1]:
        obj = obj[k]
    if value is _DELETE:
        del obj[path[-1]]
    else:
        obj[path[-1]] = value
    return m


_DELETE = object()
BAD_CHECKSUM = OWNER[:2] + OWNER[2:].swapcase()  # mixed case, wrong EIP-55 checksum

CASES = [
    (["owner"], "not-an-address", "owner"),
    (["owner"], BAD_CHECKSUM, "owner"),
    (["owner"], _DELETE, "owner"),
    (["version"], "", "version"),
    (["base_model"], _DELETE, "base_model"),
    (["price_per_1k_prompt_tokens"], -1, "price_per_1k_prompt_tokens"),
    (["price_per_1k_prompt_tokens"], 1.5, "price_per_1k_prompt_tokens"),
    (["price_per_1k_completion_tokens"], True, "price_per_1k_completion_tokens"),
    (["split"], {"operator": 5000, "owner": 5000, "data": 1}, "split"),
    (["split", "owner"], "5000", "split.owner"),
    (["split", "operator"], -1, "split.operator"),
    (["access"], "private", "access"),
    (["access"], {"allow": [""]}, "access.allow[0]"),
    (["datasets"], "x", "datasets"),
    (["datasets", 0, "id"], "", "datasets[0].id"),
    (["datasets", 1, "uri"], _DELETE, "datasets[1].hash"),
    (["datasets", 0, "contributors"], [], "datasets[0].contributors"),
    (["datasets", 0, "contributors", 1, "weight"], 0, "datasets[0].contributors[1].weight"),
    (["datasets", 0, "contributors", 1, "address"], "0x123", "datasets[0].contributors[1].address"),
    (["datasets", 0, "contributors", 1, "address"], C1, "datasets[0].contributors[1].address"),
    (["datasets", 1, "weight"], 0, "datasets[1].weight"),
    (["datasets", 1, "id"], "legal", "datasets[1].id"),
    (["surprise"], 1, "surprise"),
]


@pytest.mark.parametrize("path,value,field", CASES, ids=[c[2] + "-" + str(i) for i, c in enumerate(CASES)])
def test_validation_error_names_field(path, value, field):
    with pytest.raises(InvalidRequest) as e:
        parse_manifest(_with(path, value))
    assert str(e.value).startswith(field + ":"), str(e.value)


def test_data_share_requires_datasets():
    with pytest.raises(InvalidRequest, match=r"^split\.data:"):
        parse_manifest(manifest_dict(datasets=[]))


def test_valid_manifest_normalizes_addresses():
    m = parse_manifest(manifest_dict(owner=OWNER.lower(), version=3))
    assert m.owner == OWNER and m.version == "3"
    assert m.datasets[0].contributors[0].address == C1
    assert m.datasets[1].ref == "s3://bucket/med" and m.datasets[1].weight == 2


def test_load_manifest_from_adapter_folder(tmp_path):
    assert load_manifest(tmp_path) is None
    (tmp_path / "attribution.json").write_text(json.dumps(manifest_dict()))
    assert load_manifest(tmp_path).owner == OWNER
    (tmp_path / "attribution.json").write_text("{nope")
    with pytest.raises(InvalidRequest, match="not valid JSON"):
        load_manifest(tmp_path)


def test_access_policy():
    assert AccessPolicy().permits(None, None)
    m = parse_manifest(manifest_dict(access={"allow": [PAYER, "key-7"]}))
    assert m.access.permits(PAYER.lower(), None)  # addresses compare case-insensitively
    assert m.access.permits("someone", "key-7")
    assert not m.access.permits(C2, "key-8")
    assert not m.access.permits(None, None)


def test_identity_keystore_created_0600_and_reloaded(tmp_path):
    path = tmp_path / "keys" / "node.json"
    a = NodeIdentity.load_or_create(path, password="pw", kdf="pbkdf2", iterations=1000)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert json.loads(path.read_text())["address"].lower() == a.address[2:].lower()
    b = NodeIdentity.load_or_create(path, password="pw")
    assert b.address == a.address
    with pytest.raises(InvalidRequest, match="cannot decrypt"):
        NodeIdentity.load_or_create(path, password="wrong")


def test_identity_password_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENLORA_NODE_KEY_PASSWORD", "from-env")
    path = tmp_path / "node.json"
    a = NodeIdentity.load_or_create(path, kdf="pbkdf2", iterations=1000)
    assert NodeIdentity.load_or_create(path, password="from-env").address == a.address
    monkeypatch.delenv("OPENLORA_NODE_KEY_PASSWORD")
    with pytest.raises(InvalidRequest, match="password missing"):
        NodeIdentity.load_or_create(path)
