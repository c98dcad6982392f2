"""Per-tenant rate limit and token quota: the clock-driven unit, then a real server with two keys (one
tenant spends its rate and quota and gets 429 with Retry-After; the other is served meanwhile)."""

from __future__ import annotations

import httpx
import openai
import pytest
from conftest import API_KEY, OTHER_KEY
from helpers import ServerProcess

from openlora.server.limits import RateLimited, TenantLimits

pytestmark = pytest.mark.slow  # real processes, the demo model, a browser or a chain: not in `make test-fast`


def test_bucket_and_quota_with_a_fake_clock():
    now = [0.0]
    lim = TenantLimits(rate=2.0, burst=2, quota=100, period_s=60.0, clock=lambda: now[0])
    lim.admit("a")
    lim.admit("a")
    with pytest.raises(RateLimited) as ei:
        lim.admit("a")
    assert ei.value.status == 429 and ei.value.retry_after == pytest.approx(0.5)
    lim.admit("b")  # another tenant has its own bucket
    now[0] = 0.5  # one request refilled at 2/s
    lim.admit("a")
    lim.charge("a", 100)  # the quota is spent ...
    now[0] = 10.0
    with pytest.raises(RateLimited, match="token quota") as ei:
        lim.admit("a")
    assert ei.value.retry_after == pytest.approx(50.0)
    lim.admit("b")  # ... for a only
    now[0] = 60.0  # a new window
    lim.admit("a")
    for bad in (dict(rate=0.0), dict(quota=0), dict(period_s=-1.0)):
        with pytest.raises(ValueError):
            TenantLimits(**bad)


def test_a_tenant_over_its_limits_gets_429_while_another_is_served(assets, tmp_path):
    srv = ServerProcess(["--model", str(assets["model"]), "--adapter-dir", str(assets["adapter_dir"]),
                         "--api-key", f"alice={API_KEY}", "--api-key", OTHER_KEY,
                         "--rate-limit", "0.2", "--rate-burst", "3", "--token-quota", "30/3600"], tmp_path)
    try:
        alice = openai.OpenAI(base_url=srv.base_url, api_key=API_KEY, max_retries=0)
        bob = openai.OpenAI(base_url=srv.base_url, api_key=OTHER_KEY, max_retries=0)
        r = alice.completions.create(model="a1", prompt="t5 t6 t7", max_tokens=20, extra_body={"ignore_eos": True})
        assert r.usage.total_tokens >= 23  # ... most of a 30-token quota
        alice.completions.create(model="a1", prompt="t5", max_tokens=10, extra_body={"ignore_eos": True})
        over = httpx.post(srv.base_url + "/completions", json={"model": "a1", "prompt": "t5", "max_tokens": 2},
                          headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
        assert over.status_code == 429 and "token quota" in over.json()["error"]["message"]
        assert over.json()["error"]["type"] == "rate_limit_error"
        assert 3500 <= int(over.headers["Retry-After"]) <= 3600
        assert bob.completions.create(model="a1", prompt="t5", max_tokens=2).choices  # bob: burst 3 ...
        bob.completions.create(model="a1", prompt="t5", max_tokens=2)
        bob.completions.create(model="a1", prompt="t5", max_tokens=2)
        with pytest.raises(openai.RateLimitError) as ei:  # ... then 0.2 requests/s
            bob.completions.create(model="a1", prompt="t5", max_tokens=2)
        assert 1 <= int(ei.value.response.headers["Retry-After"]) <= 5
    finally:
        assert srv.stop() == 0


def test_a_flooding_tenant_leaves_room_for_another(assets, tmp_path):
    """Two sequence slots; alice queues 16 requests at once, then bob sends one. Admission goes round robin
    across tenants, so bob runs at the next freed slot: at most a few of alice's requests finish before
    his (plain FCFS would finish all of hers first)."""
    import threading
    import time

    srv = ServerProcess(["--model", str(assets["model"]), "--adapter-dir", str(assets["adapter_dir"]),
                         "--api-key", f"alice={API_KEY}", "--api-key", OTHER_KEY, "--max-num-seqs", "2"], tmp_path)
    done: list[float] = []

    def call(key: str, tokens: int) -> float:
        r = httpx.post(srv.base_url + "/completions", headers={"Authorization": f"Bearer {key}"}, timeout=300,
                       json={"model": "a1", "prompt": "t5 t6", "max_tokens": tokens, "ignore_eos": True})
        assert r.status_code == 200, r.text
        return time.monotonic()

    try:
        # Each of alice's requests runs for 200 decode steps, long against bob's arrival on a loaded machine.
        flood = [threading.Thread(target=lambda: done.append(call(API_KEY, 200))) for _ in range(16)]
        for t in flood:
            t.start()
        deadline = time.monotonic() + 60
        while httpx.get(srv.url + "/v1/state", timeout=10).json()["waiting"] < 10:  # alice's backlog queued
            assert time.monotonic() < deadline
            time.sleep(0.02)
        bob_done = call(OTHER_KEY, 4)
        for t in flood:
            t.join(300)
        before = sum(1 for t in done if t < bob_done)
        assert len(done) == 16 and before <= 4, (before, len(done))
    finally:
        assert srv.stop() == 0
