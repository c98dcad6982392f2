"""Browser helpers for the Open Chat tests: Debian's Chromium, a watched page, chat actions."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
from helpers import ROOT  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
SHOTS = ROOT / "docs" / "screenshots"
WIDTHS = {"desktop": (1280, 860), "mobile": (390, 844)}
ANSWER_S = 120  # one full answer of the demo model on 2 busy cores


class Watched:
    """A page with its console errors and off-origin requests recorded."""

    def __init__(self, browser, origin: str, width: str = "desktop", bypass_csp: bool = False) -> None:
        w, h = WIDTHS[width]
        self.ctx = browser.new_context(viewport={"width": w, "height": h}, bypass_csp=bypass_csp,
                                       reduced_motion="reduce" if width == "mobile" else "no-preference")
        self.page = self.ctx.new_page()
        self.origin = origin
        self.errors: list[str] = []
        self.offsite: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        self.page.on("request", self._request)

    def _request(self, r) -> None:
        if not r.url.startswith((self.origin + "/", "data:", "blob:")):
            self.offsite.append(r.url)

    def open(self, hash_: str = "") -> None:
        self.page.goto(f"{self.origin}/{hash_}")
        self.page.get_by_label("Message").or_(self.page.get_by_role("heading", level=2).first).wait_for()

    def shot(self, name: str, width: str = "desktop") -> None:
        SHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SHOTS / f"{name}-{width}.png"), full_page=True)

    def close(self) -> None:
        self.ctx.close()
        assert not self.errors, self.errors
        assert not self.offsite, self.offsite


def send(page, text: str) -> None:
    page.get_by_label("Message").fill(text)
    page.get_by_label("Message").press("Enter")


def last_answer(page):
    return page.locator("article.msg.assistant").last


def wait_done(page, timeout_s: float = ANSWER_S) -> None:
    page.locator('article.msg.assistant[aria-busy="false"]').last.wait_for(timeout=timeout_s * 1000)
    page.get_by_role("button", name="Send").wait_for(timeout=10_000)


def open_receipt(page):
    """Open the last answer's receipt and wait until its payees show; returns the region."""
    import re

    last_answer(page).get_by_role("button", name="Receipt").click()
    region = last_answer(page).get_by_role("region", name=re.compile(r"^Receipt 0x"))
    region.get_by_text("Who was paid").wait_for()
    return region

