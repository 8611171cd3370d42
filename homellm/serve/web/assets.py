"""The page and its assets, from the package (no build step, no CDN), with a strict CSP.

Content-Security-Policy (W3C CSP Level 3): scripts and styles only from this origin, no
inline script or eval, no plugins, no framing; so even markup that slipped into the page
could not run. The page builds every message with DOM calls and textContent (app.js).
"""
from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

from homellm.serve.web.context import not_found

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; font-src 'self'; manifest-src 'self'; base-uri 'none'; "
       "form-action 'self'; frame-ancestors 'none'; object-src 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY",
           "Cache-Control": "no-cache"}
FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
         "app.css": "text/css; charset=utf-8"}


def asset(name: str) -> Response:
    if name not in FILES:
        raise not_found(f"/static/{name}")
    data = resources.files("homellm.serve.web").joinpath("static", name).read_bytes()
    return Response(data, media_type=FILES[name], headers=HEADERS)


def assets_router() -> APIRouter:
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    async def page():
        return asset("index.html")

    @router.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        return asset(name)

    return router
