"""Helpers for the attribution tests: fixed addresses, a valid manifest, usage events.

(A uniquely named module, not conftest: `from conftest import` is ambiguous across test folders.)"""

from __future__ import annotations

import itertools

from eth_account import Account

from openlora.outputs import UsageEvent
from openlora.request import AdapterUse

# Fixed, valid checksummed addresses (deterministic keys so failures are reproducible).
ADDRS = [Account.from_key(bytes([i + 1]) * 32).address for i in range(8)]
OWNER, C1, C2, C3, PAYER = ADDRS[0], ADDRS[1], ADDRS[2], ADDRS[3], ADDRS[4]
BASE = "tiny-llama"


def manifest_dict(**over) -> dict:
    """A valid manifest; keyword arguments override top-level fields."""
    m = {
        "owner": OWNER,
        "version": "1.0.0",
        "base_model": BASE,
        "datasets": [
            {"id": "legal", "hash": "sha256:aa", "contributors": [
                {"address": C1, "weight": 3}, {"address": C2, "weight": 1}]},
            {"id": "med", "uri": "s3://bucket/med", "weight": 2, "contributors": [
                {"address": C3, "weight": 1}]},
        ],
        "price_per_1k_prompt_tokens": 1000,
        "price_per_1k_completion_tokens": 4000,
        "split": {"operator": 2000, "owner": 5000, "data": 3000},
        "access": "public",
    }
    m.update(over)
    return m


_ids = itertools.count()


def event(adapters=(("ad1", 1.0),), prompt=123, cached=10, completion=77, status="finished",
          request_id: str | None = None, tenant: str = PAYER) -> UsageEvent:
    """A usage event; `adapters` is a sequence of (adapter_id, weight)."""
    return UsageEvent(
        request_id=request_id or f"req-{next(_ids)}", tenant=tenant, base_model=BASE,
        base_model_hash="0xbasehash",
        adapters=tuple(AdapterUse(a, f"sha256:{a}", w) for a, w in adapters),
        prompt_tokens=prompt, cached_tokens=cached, completion_tokens=completion, status=status,
        finish_reason="stop" if status == "finished" else "abort", finish_time=1_700_000_000.5,
    )
