"""The wallet in a real browser against a node on a real chain (anvil): the page creates a key,
takes test OPEN from the faucet, deposits, authorizes the node, chats (paid), and sees the receipt
settle on chain after the epoch closes; balances are read back with web3.py.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import ChainUp, ServerProcess  # noqa: E402
from pages import Watched, open_receipt, send, wait_done  # noqa: E402

from openlora.chain.client import Chain, Deployment  # noqa: E402

pytestmark = pytest.mark.slow  # real processes, the demo model, a browser or a chain: not in `make test-fast`

ADMIN = "wallet-test-admin"
CLI = [sys.executable, "-m", "openlora.cli"]


@pytest.fixture(scope="module")
def chain_node(tmp_path_factory):
    up = ChainUp(tmp_path_factory.mktemp("chain"))
    dep = up.info["deployment"]
    node = ServerProcess(["--chain", dep, "--admin-key", ADMIN, "--epoch-seconds", "3600", "--region", "JP",
                          "--location", "35.7,139.7", "--max-model-len", "1024", "--kv-cache-memory", "128MiB"],
                         tmp_path_factory.mktemp("node"), timeout=300.0)
    yield {"dep": dep, "node": node}
    node.stop()
    up.stop()


def test_the_page_pays_for_its_answers(chain_node, browser):
    node, dep = chain_node["node"], chain_node["dep"]
    w = Watched(browser, node.url)
    page = w.page
    w.open()
    # Unpaid, the node refuses before any work, and the page says what to do.
    page.get_by_label("Adapter", exact=True).select_option("pirate")
    send(page, "Hello")
    wait_done(page, 30)
    assert "open the Wallet" in page.locator("article.msg.assistant .error").inner_text()
    w.errors.clear()  # the 402 itself is logged by the browser as a failed resource

    page.get_by_role("link", name="Wallet").click()
    page.get_by_role("button", name="Create a browser key").click()
    status = page.get_by_role("status")

    def step(button: str) -> None:
        page.get_by_role("button", name=button, exact=True).click()
        page.wait_for_function("() => !document.querySelector('[role=status]').textContent.endsWith('…')",
                               timeout=60_000)
        assert status.inner_text() == f"{button}: done.", status.inner_text()

    step("Get test OPEN")
    balances = page.get_by_label("Balances")
    assert "10 OPEN" in balances.inner_text()
    page.get_by_label("Deposit (OPEN)").fill("2")
    step("Deposit")
    page.get_by_label("Spending cap (OPEN)").fill("1")
    step("Authorize this node")
    text = balances.inner_text()
    assert "2 OPEN (2 OPEN available)" in text and "active: cap 1 OPEN" in text, (text, status.inner_text())
    payer = re.search(r"0x[0-9a-fA-F]{40}", text).group(0)
    chain = Chain(Deployment.load(dep))
    assert chain.escrow(payer) == 2 * 10**18 and chain.token_balance(payer) == 8 * 10**18

    # A paid answer: its receipt names the payer, and settles on chain when the epoch closes.
    page.get_by_role("link", name="Chat", exact=True).click()
    page.get_by_role("button", name="Regenerate").click()
    wait_done(page)
    region = open_receipt(page)
    rid = region.locator("code.hash").inner_text().strip()
    assert httpx.get(f"{node.url}/v1/receipts/{rid}", timeout=10).status_code == 404  # the payer's alone
    rec = httpx.get(f"{node.url}/v1/receipts/{rid}", timeout=10, headers={"authorization": f"Bearer {ADMIN}"}).json()
    assert rec["payer"] == payer and rec["fee"] > 0
    r = httpx.post(f"{node.url}/v1/epochs/close", headers={"authorization": f"Bearer {ADMIN}"}, timeout=60)
    assert r.status_code == 200 and r.json()["settled"] >= 1, r.text
    page.get_by_role("button", name="Hide receipt").click()
    page.get_by_role("button", name="Receipt").click()
    region.get_by_text(re.compile(r"settled in epoch \d+ \(transaction 0x")).wait_for(timeout=10_000)
    assert chain.escrow(payer) == 2 * 10**18 - rec["fee"]
    page.get_by_role("link", name="Wallet").click()
    assert rec["fee"] < 10**18
    page.get_by_text(f"spent 0.{rec['fee']:018d}".rstrip("0") + " OPEN").wait_for(timeout=10_000)
    w.shot("wallet")
    # The node is on the map (the registry), with its declared place.
    page.get_by_role("link", name="Network map").click()
    assert "JP" in page.get_by_role("table", name="1 node").inner_text()
    w.close()
