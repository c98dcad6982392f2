"""What a router reads from a node: /v1/state, the adapter-state header, vLLM-named gauges."""

from __future__ import annotations

import httpx
from conftest import API_KEY

H = {"Authorization": f"Bearer {API_KEY}"}


def test_state_snapshot_and_adapter_state_header(server):
    s = httpx.get(f"{server.url}/v1/state", timeout=10).json()
    assert s["object"] == "node.state" and s["model"] == "tiny"
    assert s["node"].startswith("0x") and len(s["node"]) == 42
    assert {"a1", "a2", "a3"} <= set(s["adapters"]) and s["max_loras"] == 4
    assert 0 <= s["free_slots"] <= 4 and 0.0 <= s["kv_usage"] <= 1.0 and s["max_num_seqs"] == 16
    body = {"model": "a2", "prompt": "hello", "max_tokens": 2, "temperature": 0}
    first = httpx.post(f"{server.base_url}/completions", json=body, headers=H, timeout=60)
    assert first.status_code == 200 and first.headers["x-openlora-adapter-state"] in {
        "registered", "disk", "host", "loading", "resident"}
    again = httpx.post(f"{server.base_url}/completions", json=body, headers=H, timeout=60)
    assert again.headers["x-openlora-adapter-state"] == "resident"  # loaded by the first request
    assert "a2" in httpx.get(f"{server.url}/v1/state", timeout=10).json()["resident_adapters"]
    base = httpx.post(f"{server.base_url}/completions", json={**body, "model": "tiny"}, headers=H, timeout=60)
    assert base.headers["x-openlora-adapter-state"] == "base"


def test_vllm_compatible_gauges(server):
    m = server.metrics()
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert name in m, name
    assert m["vllm:kv_cache_usage_perc"] == m["openlora_kv_cache_usage_ratio"]
