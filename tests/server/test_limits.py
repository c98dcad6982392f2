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
