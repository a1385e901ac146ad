"""/console: the web console (key management, live stats, a similarity playground).

The page is static and holds no data; everything it shows comes from the admin and embedding APIs,
called with the admin key the user types into it. So the page itself is served without a key, and
every action needs one (when keys are on)."""

from __future__ import annotations

from functools import lru_cache
from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter(tags=["console"])

# The page's own inline script and style, images dropped as data: URIs, calls to this origin only.
CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@lru_cache(maxsize=1)
def _page() -> str:
    return files("tkr_embed.api").joinpath("console/index.html").read_text(encoding="utf-8")


@router.get("/console", include_in_schema=False)
async def console() -> HTMLResponse:
    return HTMLResponse(_page(), headers={"Content-Security-Policy": CSP, "X-Frame-Options": "DENY",
                                          "Cache-Control": "no-store"})
