"""Fixtures for the attribution tests (helpers live in attr_helpers.py)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from attr_helpers import BASE, manifest_dict

from openlora.attribution import AttributionService, DefaultPolicy, NodeIdentity


@pytest.fixture(scope="session")
def identity() -> NodeIdentity:
    return NodeIdentity.from_key(b"\x42" * 32)


@pytest.fixture
def make_service(tmp_path, identity) -> Callable[..., AttributionService]:
    """Factory: a service over a fresh ledger with adapter 'ad1' registered."""
    made: list[AttributionService] = []

    def make(**kw) -> AttributionService:
        kw.setdefault("manifests", {"ad1": manifest_dict()})
        kw.setdefault("base_model_id", BASE)
        kw.setdefault("base_model_hash", "0xbasehash")
        kw.setdefault("default_policy", DefaultPolicy(100, 200))
        path = kw.pop("ledger_path", tmp_path / f"ledger{len(made)}.db")
        svc = AttributionService(path, identity, **kw)
        made.append(svc)
        return svc

    yield make
    for s in made:
        s.close()
