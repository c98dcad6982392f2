"""Adapter updates and receipts: a request that ran on a replaced version is priced and attributed by
that version's manifest (pinned to its content hash), one on the new version by the new manifest."""

from __future__ import annotations

import dataclasses

import pytest
from attr_helpers import C3, event, manifest_dict

from openlora.errors import InvalidRequest
from openlora.request import AdapterUse


def _on(ev, content_hash: str):
    """`ev` as if it ran on the version with `content_hash`."""
    uses = tuple(AdapterUse(a.adapter_id, content_hash, a.weight) for a in ev.adapters)
    return dataclasses.replace(ev, adapters=uses)


def test_receipts_name_the_manifest_of_the_version_that_served(make_service):
    svc = make_service()  # ad1: version 1.0.0, 1000 / 4000 per 1k
    new = svc.check_manifest("ad1", manifest_dict(version="2.0.0", price_per_1k_prompt_tokens=2000,
                                                  datasets=[{"id": "new", "hash": "sha256:bb",
                                                             "contributors": [{"address": C3, "weight": 1}]}]))
    assert svc.manifest("ad1").version == "1.0.0"  # checked, not used yet
    svc.pin_version("ad1", "sha256:old")
    svc.set_manifest("ad1", new)
    old_r = svc.record(_on(event(), "sha256:old"))
    new_r = svc.record(_on(event(), "sha256:new"))
    assert (old_r.adapters[0].content_hash, old_r.adapters[0].version) == ("sha256:old", "1.0.0")
    assert (new_r.adapters[0].content_hash, new_r.adapters[0].version) == ("sha256:new", "2.0.0")
    assert old_r.fee == 431 and new_r.fee == (123 * 2000 + 77 * 4000) // 1000
    assert {d.dataset_id for d in old_r.datasets} == {"legal", "med"}
    assert {d.dataset_id for d in new_r.datasets} == {"new"}


def test_a_bad_new_manifest_changes_nothing(make_service):
    svc = make_service()
    with pytest.raises(InvalidRequest, match="^split:"):
        svc.check_manifest("ad1", manifest_dict(split={"operator": 1, "owner": 1, "data": 1}))
    assert svc.record(event()).adapters[0].version == "1.0.0"
