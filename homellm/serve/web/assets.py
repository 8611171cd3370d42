"""The page and its assets, from the package (no build step, no CDN), with a strict CSP.

Content-Security-Policy (W3C CSP Level 3): scripts and styles only from this origin, no
inline script or eval, no plugins, no framing; so even markup that slipped into the page
could not run. The page builds every message with DOM calls and textContent (app.js).
Images in a reply load from this origin and data: URLs at once; one from elsewhere only when
the reader asks (a button), hence `https:` in img-src.

Files: app.js, app.css (the chat), views.js (the other views, loaded when one is opened),
markdown-it.min.js (the markdown parser, vendored unmodified from npm), and katex/ (KaTeX's
script, stylesheet and woff2 fonts, loaded only when a message has math). Each is served
gzipped to a client that accepts it (compressed once, kept in memory) with an ETag, so a
reload revalidates with a 304 instead of downloading again.
"""
from __future__ import annotations

import gzip
import hashlib
import re
from functools import lru_cache
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import Response

from homellm.serve.web.context import not_found

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: https:; "
       "connect-src 'self'; font-src 'self'; manifest-src 'self'; base-uri 'none'; "
       "form-action 'self'; frame-ancestors 'none'; object-src 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY",
           "Cache-Control": "no-cache"}
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".woff2": "font/woff2"}
NAME = re.compile(r"(katex/(fonts/)?)?[A-Za-z0-9][A-Za-z0-9_.-]*")


@lru_cache(maxsize=64)
def _load(name: str) -> tuple[bytes, bytes | None, str] | None:
    """(bytes, gzipped bytes or None when that saves nothing, ETag) of a static file."""
    kind = "." + name.rsplit(".", 1)[-1]
    if not NAME.fullmatch(name) or ".." in name or kind not in TYPES:
        return None
    path = resources.files("homellm.serve.web").joinpath("static", *name.split("/"))
    if not path.is_file():
        return None
    data = path.read_bytes()
    packed = gzip.compress(data, 9, mtime=0) if kind != ".woff2" else None
    return data, packed, '"' + hashlib.sha256(data).hexdigest()[:20] + '"'


def asset(name: str, request: Request | None = None) -> Response:
    found = _load(name)
    if found is None:
        raise not_found(f"/static/{name}")
    data, packed, etag = found
    headers = {**HEADERS, "ETag": etag, "Vary": "Accept-Encoding"}
    if request is not None and etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    media = TYPES["." + name.rsplit(".", 1)[-1]]
    accepts = request is not None and "gzip" in request.headers.get("accept-encoding", "")
    if packed is not None and accepts:
        return Response(packed, media_type=media, headers={**headers, "Content-Encoding": "gzip"})
    return Response(data, media_type=media, headers=headers)


def assets_router() -> APIRouter:
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    async def page(request: Request):
        return asset("index.html", request)

    @router.get("/static/{name:path}", include_in_schema=False)
    async def static(name: str, request: Request):
        return asset(name, request)

    return router
