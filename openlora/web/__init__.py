"""Open Chat: the web page served at `/` by every node and gateway (same origin as the API).

No build step: plain ES modules under static/, small libraries vendored in static/vendor/ (versions
and sha256 sums in its MANIFEST.json; `scripts/vendor_web.py` refreshes them). Every page response
carries a strict Content-Security-Policy: scripts, styles, images and connections from this origin only.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent / "static"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "font-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {"content-security-policy": CSP, "x-content-type-options": "nosniff",
                    "referrer-policy": "no-referrer", "cross-origin-opener-policy": "same-origin"}

mimetypes.add_type("text/javascript", ".mjs")  # some systems map .mjs to nothing: modules must be JS


class _SecureStatic(StaticFiles):
    """StaticFiles whose responses carry the page's security headers."""

    async def get_response(self, path, scope):
        res = await super().get_response(path, scope)
        res.headers.update(SECURITY_HEADERS)
        return res


def mount_web(app: FastAPI, network_map: bool, wallet: bool = False) -> None:
    """Serve the page at `/` and its files under `/static/`. `network_map`: this server answers
    GET /v1/nodes (a gateway, or a node on a chain); `wallet`: it answers /v1/chain (a node on a
    chain). The page learns both from meta tags, so it never probes a route that is not there."""
    page = (STATIC / "index.html").read_text(encoding="utf-8")
    for name, on in (("openlora-map", network_map), ("openlora-wallet", wallet)):
        page = page.replace(f'<meta name="{name}" content="no">',
                            f'<meta name="{name}" content="{"yes" if on else "no"}">')

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers=SECURITY_HEADERS)

    app.mount("/static", _SecureStatic(directory=STATIC), name="static")
