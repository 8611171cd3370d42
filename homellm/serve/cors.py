"""CORS: which other origins (a web page served from elsewhere) may call the API from a browser.

    policy = CorsPolicy.parse("http://localhost:*,https://app.example.org")
    policy.allows("http://localhost:5173")   # True

The default, like Ollama's, is the local origins: http(s)://localhost, 127.0.0.1 and [::1]
on any port. `*` allows every origin; `none` (or an empty list) none. An entry may end in
`:*` for any port. Only the API's paths take part (/v1/*, Ollama's routes, /health,
/metrics): the web app's own /api/* stays same-origin. The guard (guard.py) answers a preflight (OPTIONS with
Access-Control-Request-Method) from an allowed origin itself, before the API key is checked
(browsers send no credentials on a preflight), and adds Access-Control-Allow-Origin to every
answer to an allowed origin. Credentials (cookies) are never allowed cross-origin: a page on
another origin must send the API key as `Authorization: Bearer`, which the preflight allows.
"""
from __future__ import annotations

from homellm.errors import HomellmError

DEFAULT_ORIGINS = ("http://localhost:*", "https://localhost:*", "http://127.0.0.1:*",
                   "https://127.0.0.1:*", "http://[::1]:*", "https://[::1]:*")
ALLOW_METHODS = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
EXPOSE_HEADERS = "Retry-After, WWW-Authenticate, Content-Type"
MAX_AGE_S = 600


def _split(origin: str) -> tuple[str, str, str | None]:
    """'http://localhost:8080' -> ('http', 'localhost', '8080'); no port: None."""
    scheme, sep, rest = origin.partition("://")
    if not sep:
        return "", "", None
    rest = rest.rstrip("/").lower()
    if rest.startswith("["):
        host, _, port = rest.partition("]")
        return scheme.lower(), host + "]", port.removeprefix(":") or None
    host, _, port = rest.partition(":")
    return scheme.lower(), host, port or None


class CorsPolicy:
    def __init__(self, origins=DEFAULT_ORIGINS):
        self.any = "*" in origins
        self.exact: set[str] = set()
        self.any_port: set[tuple[str, str]] = set()
        for o in origins:
            if o == "*":
                continue
            scheme, host, port = _split(o)
            if not scheme or not host:
                raise HomellmError(f"--cors-origins: {o!r} is not an origin (expected "
                                   "scheme://host[:port], e.g. http://localhost:3000, "
                                   "http://localhost:* for any port, or *)")
            if port == "*":
                self.any_port.add((scheme, host))
            else:
                self.exact.add(f"{scheme}://{host}" + (f":{port}" if port else ""))

    @classmethod
    def parse(cls, text: str | None) -> "CorsPolicy":
        """From --cors-origins: comma-separated origins; None: the local default."""
        if text is None:
            return cls()
        items = [x.strip() for x in text.split(",") if x.strip()]
        if items in ([], ["none"]):
            return cls(())
        return cls(items)

    def allows(self, origin: str | None) -> bool:
        if not origin or origin == "null":
            return self.any and origin is not None
        if self.any:
            return True
        scheme, host, port = _split(origin)
        return (f"{scheme}://{host}" + (f":{port}" if port else "")) in self.exact \
            or (scheme, host) in self.any_port

    @staticmethod
    def preflight_headers(origin: str, requested: str | None) -> list[tuple[bytes, bytes]]:
        headers = [("access-control-allow-origin", origin), ("vary", "Origin"),
                   ("access-control-allow-methods", ALLOW_METHODS),
                   ("access-control-max-age", str(MAX_AGE_S))]
        if requested:
            headers.append(("access-control-allow-headers", requested))
        return [(k.encode(), v.encode("latin-1")) for k, v in headers]

    @staticmethod
    def response_headers(origin: str) -> list[tuple[bytes, bytes]]:
        return [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin"),
                (b"access-control-expose-headers", EXPOSE_HEADERS.encode())]
