"""Under stress: bounded queue -> 429, SIGTERM drains in-flight requests and exits 0."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import httpx
import openai
from helpers import ServerProcess


def test_flood_gets_429_and_server_survives(assets):
    srv = ServerProcess(["--model", str(assets["model"]), "--max-waiting", "1", "--max-num-seqs", "1",
                         "--kv-cache-memory", "16MiB", "--no-attribution"], assets["root"])
    try:
        async def one(c: openai.AsyncOpenAI) -> str:
            try:
                await c.completions.create(model="tiny", prompt="t5 t6", max_tokens=64, extra_body={"ignore_eos": True})
                return "ok"
            except openai.RateLimitError as e:
                assert e.body["type"] == "rate_limit_error"
                return "429"

        async def main():
            async with openai.AsyncOpenAI(base_url=srv.base_url, api_key="x", max_retries=0, timeout=60) as c:
                return await asyncio.gather(*(one(c) for _ in range(12)))

        got = asyncio.run(main())
        # One runs; whether a second one finds the single waiting place free depends on timing, so
        # only "some succeed, the rest bounce with 429" is asserted.
        assert got.count("429") >= 1 and got.count("ok") >= 1 and len(got) == 12, got
        assert httpx.get(srv.url + "/health").status_code == 200
        m = srv.metrics()
        assert m['openlora_requests_total{route="/v1/completions",status="429"}'] == got.count("429")
    finally:
        assert srv.stop() == 0, srv.log()[-2000:]


def test_sigterm_drains_then_exits_zero(assets):
    """Four long streams on one sequence slot; SIGTERM after the first tokens. Every stream ends
    cleanly (finished, or an in-band 503 error once the 1.5 s grace period is over), none is cut off,
    new connections are refused, and the process exits 0 within the grace period (plus start-up slack)."""
    grace = 1.5
    srv = ServerProcess(["--model", str(assets["model"]), "--max-num-seqs", "1", "--kv-cache-memory", "16MiB",
                         "--grace-period", str(grace), "--no-attribution"], assets["root"])
    results: list[str] = []
    first = threading.Event()

    def stream() -> None:
        c = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0, timeout=60)
        try:
            finish = None
            for chunk in c.completions.create(model="tiny", prompt="t5 t6", max_tokens=250, stream=True,
                                              extra_body={"ignore_eos": True}):
                first.set()
                finish = chunk.choices[0].finish_reason if chunk.choices else finish
            results.append(f"finished:{finish}")
        except openai.APIError as e:  # an SSE error event: a clean, reported abort
            results.append(f"error:{getattr(e, 'body', None) and e.body.get('type')}")
        except Exception as e:  # connection cut mid-stream: what the test forbids
            results.append(f"broken:{type(e).__name__}:{e}")

    threads = [threading.Thread(target=stream) for _ in range(4)]
    for t in threads:
        t.start()
    assert first.wait(60)
    # SIGTERM only once all four requests reached the server (one running, three waiting): a client
    # thread that had not connected yet would be refused, which is correct but not what this tests.
    deadline = time.monotonic() + 30
    while True:
        m = srv.metrics()
        if m.get("openlora_num_running", 0) + m.get("openlora_num_waiting", 0) >= 4:
            break
        assert time.monotonic() < deadline, m
        time.sleep(0.02)
    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    rc = srv.proc.wait(timeout=grace + 20)
    elapsed = time.monotonic() - t0
    for t in threads:
        t.join(30)
    log = srv.log()
    srv.stop()
    assert rc == 0, log[-3000:]
    assert elapsed < grace + 10, elapsed
    assert len(results) == 4 and not [r for r in results if r.startswith("broken")], (results, log[-3000:])
    assert all(r in ("finished:length", "error:service_unavailable") for r in results), results
    try:
        httpx.get(srv.url + "/health", timeout=2)
        raise AssertionError("server still accepting connections")
    except httpx.ConnectError:
        pass
