"""Open Chat in a real browser: Debian's Chromium driven by Playwright, against the real demo server
(SmolLM2-135M-Instruct + the demo adapters) and a gateway over it, all on 127.0.0.1.

Every page is watched for console errors and for requests to any other origin. Screenshots of the
chat, the receipt, the explorer and the map, at desktop and mobile widths, go to docs/screenshots.
Chromium missing is a failure, not a skip (`.ci/run` installs it).
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import ROOT, Gateway, ServerProcess  # noqa: E402
from pages import Watched, last_answer, open_receipt, send, wait_done  # noqa: E402

from openlora.web import CSP  # noqa: E402

pytestmark = pytest.mark.slow  # real processes, the demo model, a browser or a chain: not in `make test-fast`

ADMIN = "web-test-admin"


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    node = ServerProcess(["--max-model-len", "2048", "--kv-cache-memory", "256MiB", "--admin-key", ADMIN,
                          "--region", "DE", "--location", "52.52,13.40"], root, timeout=300.0)
    gw = Gateway([node.url], root / "gateway.log")
    yield {"node": node, "gw": gw}
    gw.stop()
    node.stop()


def test_page_headers_and_static_files(servers):
    for url in (servers["node"].url, servers["gw"].url):
        r = httpx.get(url + "/", timeout=10)
        assert r.status_code == 200 and r.headers["content-security-policy"] == CSP
        assert "script-src 'self'" in CSP and "connect-src 'self'" in CSP and "unsafe" not in CSP
        js = httpx.get(url + "/static/app.mjs", timeout=10)
        assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
        assert httpx.get(url + "/static/../pyproject.toml", timeout=10).status_code == 404


def test_chat_streams_stops_regenerates_and_shows_the_receipt(servers, browser):
    node = servers["node"]
    w = Watched(browser, node.url)
    page = w.page
    w.open()
    page.get_by_label("Adapter", exact=True).select_option("pirate")
    # Shift+Enter adds a line, Enter sends.
    box = page.get_by_label("Message")
    box.fill("Tell me about")
    box.press("Shift+Enter")
    box.type("the sea, in a few sentences.")
    assert "\n" in box.input_value() and page.locator("article.msg").count() == 0
    box.press("Enter")
    # The answer grows while it streams.
    answer = last_answer(page)
    page.locator('article.msg.assistant[aria-busy="true"] .md p').first.wait_for(timeout=60_000)
    first = len(answer.locator(".md").inner_text())
    page.wait_for_timeout(1500)
    busy = answer.get_attribute("aria-busy") == "true"
    assert not busy or len(answer.locator(".md").inner_text()) > first, "the answer did not grow while streaming"
    wait_done(page)
    meta = answer.locator(".meta").inner_text()
    assert "TTFT" in meta and "tok/s" in meta and "node 0x" in meta and "fee" in meta, meta
    log = page.get_by_role("log", name="Conversation")
    assert log.get_attribute("aria-busy") == "false"

    w.shot("chat")
    # The receipt: fee, inputs, payees, signature checked in the browser, settlement state.
    region = open_receipt(page)
    text = region.inner_text()
    rid = region.locator("code.hash").inner_text().strip()
    rec = httpx.get(f"{node.url}/v1/receipts/{rid}", timeout=10).json()
    assert f"({rec['fee']} base units)" in text and rec["fee"] > 0
    for role in ("Node operator", "Adapter owner", "Data contributor"):
        assert role in text, text
    assert "verifies: signed by node" in text and "equals the fee" in text, text
    assert "pending" in text  # no epoch closed yet
    if rec.get("span_method"):  # the pirate datanet's index was built in time: its credits are shown
        assert "Answer tokens credited to each contributor's text" in text, text
        assert all(c["dataset_id"] in text for c in rec["credits"]), text
    region.scroll_into_view_if_needed()
    w.shot("receipt")

    # Stop one mid-stream: the Send button comes back and the node stops generating.
    send(page, "Write a long story about a ship and its crew.")
    page.locator('article.msg.assistant[aria-busy="true"] .md p').first.wait_for(timeout=60_000)
    page.get_by_role("button", name="Stop").click()
    wait_done(page, 20)
    assert "stopped" in last_answer(page).locator(".meta").inner_text()
    t0 = time.monotonic()
    while httpx.get(f"{node.url}/v1/state", timeout=10).json()["running"]:
        assert time.monotonic() - t0 < 10, "the stopped request still runs on the node"
        time.sleep(0.2)

    # Regenerate replaces the last answer.
    n_answers = page.locator("article.msg.assistant").count()
    page.get_by_role("button", name="Regenerate").click()
    page.locator('article.msg.assistant[aria-busy="true"]').wait_for(timeout=10_000)
    wait_done(page)
    assert page.locator("article.msg.assistant").count() == n_answers
    assert "stopped" not in last_answer(page).locator(".meta").inner_text()

    # The explorer: this browser's receipts, payees, the closed epoch and a Merkle proof checked here.
    r = httpx.post(f"{node.url}/v1/epochs/close", headers={"authorization": f"Bearer {ADMIN}"}, timeout=30)
    assert r.status_code == 200 and r.json()["epoch"] >= 1, r.text
    page.get_by_role("link", name="Explorer").click()
    page.get_by_role("heading", name="Your receipts", exact=True).wait_for()
    rows = page.locator("section[aria-labelledby=mine-h] tbody tr")
    rows.first.wait_for()
    assert rows.count() >= 2 and "in epoch" in rows.first.inner_text()
    rows.first.get_by_role("button").click()
    page.get_by_text("The proof verifies against the epoch root").wait_for()
    assert "Data contributor" in page.get_by_role("region", name=re.compile(r"^Receipt 0x")).inner_text()
    assert page.locator("section[aria-labelledby=ep-h] tbody tr").count() >= 1
    w.shot("explorer")
    w.close()


def test_gateway_page_routes_chat_and_draws_the_map(servers, browser):
    gw, node = servers["gw"], servers["node"]
    w = Watched(browser, gw.url)
    page = w.page
    w.open()
    page.get_by_label("Adapter", exact=True).select_option("french")
    send(page, "Bonjour !")
    wait_done(page)
    region = open_receipt(page)
    assert "verifies: signed by node" in region.inner_text()
    page.get_by_role("link", name="Network map").click()
    table = page.get_by_role("table", name="1 node")
    table.wait_for()
    row = table.locator("tbody tr").first.inner_text()
    addr = httpx.get(node.url + "/v1/state", timeout=10).json()["node"]
    assert "DE" in row and "healthy" in row and "french" in row and addr[:8] in row, row
    assert page.locator("svg .node.healthy circle").count() == 1
    page.locator("svg path.land").wait_for()
    w.shot("map")
    w.close()


def test_mixing_two_adapters(servers, browser):
    """The mix panel composes adapters with weights (`adapters`) or merges them (`merge`, a PEFT
    strategy); the receipt names both adapters either way."""
    w = Watched(browser, servers["node"].url)
    page = w.page
    w.open()
    page.get_by_role("button", name="Mix adapters…").click()
    page.get_by_label("Adapter 1", exact=True).select_option("pirate")
    page.get_by_label("Adapter 2", exact=True).select_option("french")
    page.get_by_label("Weight").nth(0).fill("0.7")
    page.get_by_label("Weight").nth(1).fill("0.3")
    for strategy in ("compose", "linear"):
        page.get_by_label("Merge strategy").select_option(strategy)
        send(page, "Hello there")
        wait_done(page)
        assert last_answer(page).locator(".error").count() == 0, last_answer(page).inner_text()
        assert "pirate×0.7 + french×0.3" in last_answer(page).locator(".who").inner_text()
        region = open_receipt(page)
        text = region.inner_text()
        assert "pirate (70%, v1)" in text and "french (30%, v1)" in text, text
        assert ("merge linear" in text) == (strategy == "linear"), text
    w.close()


def test_hostile_markdown_is_neutralized(servers, browser):
    """Answers are untrusted: a stored conversation full of attacks renders inert."""
    w = Watched(browser, servers["node"].url)
    page = w.page
    w.open()
    hostile = ("<img src=x onerror=\"window.__pwned=1\"> <script>window.__pwned=2</script>\n\n"
               "![t](http://203.0.113.9/track.png) [click](javascript:window.__pwned=3) "
               "<a href=\"https://example.org\" onclick=\"window.__pwned=4\">ok link</a> "
               "<iframe src=\"http://203.0.113.9/\"></iframe><svg><script>window.__pwned=5</script></svg>"
               "<form action=\"http://203.0.113.9/\"><input name=a></form> **bold**")
    conv = [{"id": "c1", "title": "attack", "model": "pirate", "mix": None, "created": 1,
             "messages": [{"role": "user", "content": "hi"},
                          {"role": "assistant", "content": hostile, "meta": {"streaming": False}}]}]
    page.evaluate("c => localStorage.setItem('openlora.chat.v1', c)", json.dumps(conv))
    w.open()
    page.get_by_text("bold").wait_for()
    md = page.locator("article.msg.assistant .md")
    assert page.evaluate("window.__pwned") is None
    html = md.inner_html()
    for bad in ("<script", "onerror", "onclick", "javascript:", "<iframe", "<form", "203.0.113.9/track"):
        assert bad not in html, (bad, html)
    assert md.locator("a[href='https://example.org'][rel~=noopener]").count() == 1
    page.get_by_role("button", name="Delete all chats").click()
    w.close()


@pytest.mark.parametrize("view", ["", "#/explorer", "#/map"])
def test_accessibility_scan_and_keyboard(servers, browser, view):
    """axe-core (vendored for tests) finds no serious or critical violation; the controls have the
    names the issue asks for. The scan context bypasses CSP only to inject axe."""
    w = Watched(browser, servers["gw"].url, bypass_csp=True)
    page = w.page
    w.open(view)
    if not view:
        for name in ("Message", "Adapter"):
            assert page.get_by_label(name, exact=True).count() == 1
        assert page.get_by_role("button", name="Send").count() == 1
        assert page.get_by_role("log").count() == 1
        page.get_by_label("Message").focus()
        assert page.evaluate("document.activeElement.id") == "message"
        send(page, "Hi")  # scan with an answer and its receipt open
        wait_done(page)
        open_receipt(page)
    page.add_script_tag(path=str(ROOT / "tests" / "web" / "vendor" / "axe.min.js"))
    for theme in ("light", "dark"):
        page.evaluate("t => document.documentElement.dataset.theme = t", theme)
        res = page.evaluate("() => axe.run(document, {resultTypes: ['violations']})")
        bad = [(v["id"], v["impact"], [n["target"] for n in v["nodes"]][:3]) for v in res["violations"]
               if v["impact"] in ("serious", "critical")]
        assert not bad, (theme, bad)
    w.close()


def test_mobile_width(servers, browser):
    """Chat, receipt, explorer and map at a phone's width: nothing wider than the screen."""
    w = Watched(browser, servers["gw"].url, width="mobile")
    page = w.page

    def fits(name: str) -> None:
        overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
        wide = page.evaluate(
            """() => [...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right
            > document.documentElement.clientWidth + 1).slice(0, 5).map(e => e.tagName + '.' + e.className)""")
        assert overflow <= 0, (name, overflow, wide)
        w.shot(name, "mobile")

    w.open()
    page.get_by_label("Adapter", exact=True).select_option("legal")
    send(page, "Hello")
    wait_done(page)
    fits("chat")
    open_receipt(page)
    fits("receipt")
    for view, name in (("#/explorer", "explorer"), ("#/map", "map")):
        w.open(view)
        if name == "map":
            page.get_by_role("table", name="1 node").wait_for()
        else:
            page.locator("section[aria-labelledby=mine-h] tbody tr").first.wait_for()
        fits(name)
    w.close()
