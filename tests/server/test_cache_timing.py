"""The prefix cache leaks nothing through timing (InputSnatch, "The Early Bird Catches the Leak"): the time
to first token of a prompt another tenant has cached is indistinguishable from that of a prompt nobody
has, while the owner's own repeat is measurably faster (the test's positive control: it can see a hit).

Statistics over TTFTs measured in alternation, so drift of the machine hits all samples alike. The leak
check is scipy's two-sample Kolmogorov-Smirnov test (any difference of distribution), p >= 0.001 for
"indistinguishable" (at this level a false alarm is one run in a thousand). The positive control is the
one-sided Mann-Whitney U test that the owner's repeats are faster, p < 0.01, and a lower median (a
location shift: the test made for it)."""

from __future__ import annotations

import random
import statistics
import time

import httpx
import pytest
from conftest import API_KEY, OTHER_KEY

stats = pytest.importorskip("scipy.stats")

pytestmark = pytest.mark.slow  # real processes, the demo model, a browser or a chain: not in `make test-fast`

N = 40


def _ttft(url: str, key: str, prompt: str) -> float:
    """Seconds from sending a streamed completion to its first token."""
    body = {"model": "a3", "prompt": prompt, "max_tokens": 1, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    with httpx.stream("POST", url + "/completions", json=body, headers={"Authorization": f"Bearer {key}"},
                      timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and '"text"' in line:
                return time.perf_counter() - t0
    raise AssertionError("no token")


def _prompt(rng: random.Random) -> str:
    return " ".join(f"t{rng.randrange(5, 250)}" for _ in range(1000))


@pytest.fixture(scope="module")
def wide_server(tmp_path_factory):
    """A server over a wider tiny model (4 layers, hidden 256, 2,048 positions): a 1,000-token prefill
    then costs tens of ms, so a cache hit is plain to see (on the 2-layer, 64-wide model it saved ~6 ms
    of ~60-80 ms and the positive control failed one run in three)."""
    from helpers import ServerProcess, make_peft_adapter
    from tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("timing")
    model = make_tiny_model(root / "wide", layers=4, hidden_size=256, intermediate_size=512,
                            max_position_embeddings=2048)
    make_peft_adapter(model, root / "adapters" / "a3", seed=3, r=4)
    srv = ServerProcess(["--model", str(model), "--adapter-dir", str(root / "adapters"),
                         "--api-key", f"alice={API_KEY}", "--api-key", OTHER_KEY, "--max-model-len", "2048",
                         "--kv-cache-memory", "64MiB"], root)
    yield srv
    srv.stop()


def test_another_tenants_cached_prompt_times_like_an_uncached_one(wide_server):
    rng = random.Random(7)
    url = wide_server.base_url
    cross, fresh, own = [], [], []
    for _ in range(N):
        cached = _prompt(rng)
        _ttft(url, API_KEY, cached)  # alice caches it
        order = [("cross", OTHER_KEY, cached), ("fresh", OTHER_KEY, _prompt(rng)), ("own", API_KEY, cached)]
        rng.shuffle(order)  # alternate and shuffle: drift falls on all three alike
        for kind, key, prompt in order:
            {"cross": cross, "fresh": fresh, "own": own}[kind].append(_ttft(url, key, prompt))
    leak = stats.ks_2samp(cross, fresh)
    control = stats.mannwhitneyu(own, fresh, alternative="less")
    medians = {k: round(1e3 * statistics.median(v), 2) for k, v in (("cross", cross), ("fresh", fresh), ("own", own))}
    print(f"control p={control.pvalue:.2e}, leak p={leak.pvalue:.3f}, medians {medians}")
    assert control.pvalue < 0.01 and medians["own"] < medians["fresh"], (control, medians)  # hits are visible
    assert leak.pvalue >= 0.001, (leak, medians)  # ... but not across tenants
