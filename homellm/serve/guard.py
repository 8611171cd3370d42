"""What every request passes before any route runs: the Host check, the credential gate and
the body cap, as one ASGI middleware (outermost but for Starlette's error handler).

    app.add_middleware(Guard, api_key="KEY", hosts=HostRule("127.0.0.1", []),
                       max_body_bytes=8 << 20, body_limits={"/api/import": 64 << 20},
                       credential_checks=[web_state.has_credential])

In order, reading only the request line and headers:

1. Host (DNS rebinding): a browser sends the name it looked up as `Host`; a page on
   attacker.example whose name is made to resolve to 127.0.0.1 reaches a local server with
   `Host: attacker.example`. Allowed: loopback names and addresses, the address the server
   listens on (any IP address when it listens on all of them), the machine's own host name
   when it listens beyond loopback, and `--allowed-hosts` (`*`: anything; `.example.org`:
   the domain and its subdomains). Anything else is a 400 before any route.
2. Credential (with `--api-key`): every path but the public ones needs
   `Authorization: Bearer KEY`; `/api/*` may instead carry the web app's credential cookie
   (a login session with --auth, or the cookie `POST /api/key-login` sets after checking the
   key). Public: the page (at `/` and its views' addresses, PAGES: static HTML, no data) and
   its static files, `/health` (bare without the key),
   `GET /api/me`, `POST /api/login`, `/api/setup` and `/api/key-login`. A 401 comes before
   the body is read, so an unauthenticated client cannot make the server parse anything.
   The outcome is left in `scope["state"]["credential"]`: "key", "cookie", "open" (no key
   set) or None.
3. Body size: a `Content-Length` over the path's limit is a 413 at once; a body without one
   is counted as it arrives and refused once it passes the limit (413, OpenAI-shaped).

Between 1 and 2, CORS (cors.py), on the API's paths only (/v1/*, Ollama's, /health,
/metrics; never the web app's own /api/*, whose page is same-origin and whose data a page on
another origin must not read): a preflight from an allowed origin is answered here (204, no
key needed: browsers send none on a preflight), from another origin refused (403); every
answer to an allowed origin, this guard's own errors included, carries
Access-Control-Allow-Origin. Paths in `key_only_paths` (Ollama's API) take only the key, not
the web app's cookie. Every answer's status is counted in `metrics` (metrics.py) when given.
"""
from __future__ import annotations

import ipaddress
import json
import secrets
import socket
from typing import Awaitable, Callable, Iterable

PAGES = ("/", "/arena", "/leaderboard", "/evals", "/contribute", "/contributors",
         "/moderate")  # the web page, at each of its views' addresses
PUBLIC_EXACT = {("GET", "/health"), ("HEAD", "/health"), ("GET", "/api/me"),
                ("POST", "/api/login"), ("POST", "/api/setup"), ("POST", "/api/key-login")} | \
    {(method, page) for page in PAGES for method in ("GET", "HEAD")}
PUBLIC_PREFIXES = ("/static/",)
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
DEFAULT_MAX_BODY = 8 << 20


def bearer_ok(authorization: str | None, api_key: str) -> bool:
    """`Authorization: Bearer <api_key>` (scheme case-insensitive; constant-time compare)."""
    scheme, _, given = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(given.strip().encode(),
                                                                 api_key.encode())


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    ip = _ip(host)
    return ip is not None and ip.is_loopback


def _ip(text: str):
    try:
        return ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return None


def host_name(header: str) -> str:
    """The name in a Host header, without the port, lower case: '[::1]:8080' -> '::1'."""
    h = header.strip().lower()
    if h.startswith("["):
        h = h[1:h.find("]")] if "]" in h else h[1:]
    elif h.count(":") == 1:
        h = h.split(":", 1)[0]
    return h.rstrip(".")


class HostRule:
    """Which Host headers a server bound to `bind_host` answers (see the module docstring)."""

    def __init__(self, bind_host: str = "127.0.0.1", allowed: Iterable[str] = ()):
        allowed = [a.strip().lower().rstrip(".") for a in allowed if a.strip()]
        self.any = "*" in allowed
        self.suffixes = tuple(a for a in allowed if a.startswith("."))
        self.names = {host_name(a) for a in allowed if not a.startswith(".")}
        bind = bind_host.strip("[]").lower()
        self.wildcard = bind in ("", "0.0.0.0", "::")
        self.bound_ip = _ip(bind)
        if self.bound_ip is None and bind:
            self.names.add(bind)  # bound by name: that name
        if not is_loopback(bind):  # reachable from other machines: by the machine's own names
            for name in {socket.gethostname(), socket.getfqdn()}:
                if name:
                    self.names |= {name.lower(), name.lower().split(".")[0] + ".local"}

    def allows(self, header: str | None) -> bool:
        if self.any or header is None:  # HTTP/1.0 without Host: no browser sends that
            return True
        name = host_name(header)
        if name == "localhost" or name.endswith(".localhost"):
            return True
        ip = _ip(name)
        if ip is not None:  # an address is never a rebinding: the page's origin is that address
            return ip.is_loopback or self.wildcard or ip == self.bound_ip
        return name in self.names or any(name.endswith(s) or name == s[1:] for s in self.suffixes)


class BodyTooLarge(Exception):
    """Raised from `receive` once a request body passes its limit."""


def _error(status: int, message: str, code: str, headers: dict | None = None):
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error"
                                 if status < 500 else "server_error", "param": None,
                                 "code": code}}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return ({"type": "http.response.start", "status": status, "headers": raw},
            {"type": "http.response.body", "body": body})


def _mb(n: int) -> str:
    return f"{n / (1 << 20):g} MB"


class Guard:
    def __init__(self, app, *, api_key: str | None = None, hosts: HostRule | None = None,
                 max_body_bytes: int = DEFAULT_MAX_BODY, body_limits: dict[str, int] | None = None,
                 credential_checks: list[Callable[[dict], Awaitable[bool]]] | None = None,
                 cors=None, key_only_paths: Iterable[str] = (), metrics=None):
        self.app, self.api_key = app, api_key
        self.hosts = hosts or HostRule()
        self.max_body_bytes = max_body_bytes
        self.body_limits = dict(body_limits or {})
        self.credential_checks = list(credential_checks or [])
        self.cors = cors                      # cors.CorsPolicy, or None: no CORS headers at all
        self.key_only_paths = frozenset(key_only_paths)
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers: dict[str, str] = {}
        for k, v in scope.get("headers", []):
            headers.setdefault(k.decode("latin-1").lower(), v.decode("latin-1"))
        method, path = scope.get("method", "GET"), scope.get("path", "/")
        state = scope.setdefault("state", {})
        send = self._decorated(send, path,
                               headers.get("origin") if self._cors_path(path) else None)

        if not self.hosts.allows(headers.get("host")):
            name = host_name(headers["host"])
            return await self._send(send, *_error(
                400, f"Host {name!r} is not a name this server answers to (a guard against DNS "
                f"rebinding); if it is yours, start the server with --allowed-hosts {name}",
                "host_not_allowed"))

        origin = headers.get("origin")
        if method == "OPTIONS" and origin and "access-control-request-method" in headers:
            if not self._cors_path(path):
                return await self._send(send, *_error(
                    403, f"{path} is the web app's own and takes no requests from other origins "
                    "(the API's /v1/* and Ollama's routes do)", "origin_not_allowed"))
            if self.cors is None or not self.cors.allows(origin):
                return await self._send(send, *_error(
                    403, f"Origin {origin!r} may not call this server from a browser; if it is "
                    f"yours, start the server with --cors-origins {origin}", "origin_not_allowed"))
            return await self._send(send, {"type": "http.response.start", "status": 204,
                                           "headers": self.cors.preflight_headers(
                                               origin, headers.get("access-control-request-headers"))},
                                    {"type": "http.response.body", "body": b""})

        state["credential"] = await self._credential(headers, path)
        if state["credential"] is None and not self._public(method, path):
            what = "missing" if not headers.get("authorization") else "incorrect"
            extra = "" if path.startswith("/v1/") or path in self.key_only_paths \
                else " (or log in on the web page)"
            return await self._send(send, *_error(
                401, f"The API key is {what}: send the header `Authorization: Bearer <key>` with "
                f"the key the server was started with{extra}", "invalid_api_key",
                {"WWW-Authenticate": "Bearer"}))

        limit = self._limit(path)
        try:
            declared = int(headers.get("content-length", ""))
        except ValueError:
            declared = None
        too_large = _error(413, f"the request body is larger than {_mb(limit)}, the most this "
                           f"server takes for {path}", "request_too_large")
        if declared is not None and declared > limit:
            return await self._send(send, *too_large)
        await self._limited(scope, receive, send, limit, too_large)

    async def _credential(self, headers: dict, path: str) -> str | None:
        if self.api_key is None:
            return "open"
        if bearer_ok(headers.get("authorization"), self.api_key):
            return "key"
        if path.startswith("/api/") and path not in self.key_only_paths and "cookie" in headers:
            cookies = _cookies(headers["cookie"])
            for check in self.credential_checks:
                if await check(cookies):
                    return "cookie"
        return None

    def _cors_path(self, path: str) -> bool:
        return (path.startswith("/v1/") or path in self.key_only_paths
                or path in ("/health", "/metrics"))

    def _decorated(self, send, path: str, origin: str | None):
        """`send` that adds the CORS headers for an allowed origin and counts the status."""
        cors = self.cors is not None and self.cors.allows(origin)
        if not cors and self.metrics is None:
            return send

        async def decorated(message):
            if message["type"] == "http.response.start":
                if cors:
                    message = {**message, "headers": [
                        *[(k, v) for k, v in message.get("headers", [])
                          if k.lower() not in (b"access-control-allow-origin", b"vary")],
                        *self.cors.response_headers(origin)]}
                if self.metrics is not None:
                    self.metrics.count_request(path, message["status"])
            await send(message)
        return decorated

    @staticmethod
    def _public(method: str, path: str) -> bool:
        return (method, path) in PUBLIC_EXACT or path.startswith(PUBLIC_PREFIXES)

    def _limit(self, path: str) -> int:
        return self.body_limits.get(path, self.max_body_bytes)

    @staticmethod
    async def _send(send, start, body):
        await send(start)
        await send(body)

    async def _limited(self, scope, receive, send, limit: int, too_large):
        seen, tripped, started = 0, False, False

        async def receive_limited():
            nonlocal seen, tripped
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    tripped = True
                    raise BodyTooLarge()
            return message

        async def send_unless_tripped(message):
            nonlocal started
            if tripped:  # what the app answers to BodyTooLarge (e.g. a 400) is dropped
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive_limited, send_unless_tripped)
        except Exception:  # BodyTooLarge, or what a route made of it
            if not tripped:
                raise
        if tripped and not started:
            await self._send(send, *too_large)


def _cookies(header: str) -> dict[str, str]:
    out = {}
    for part in header.split(";"):
        name, _, value = part.strip().partition("=")
        if name:
            out.setdefault(name, value)
    return out
