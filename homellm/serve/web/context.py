"""Who is asking: the web app's shared state, the user behind a request, and CSRF.

Without --auth every request is the store's local user (one user, loopback). With --auth a
request carries the `homellm_session` cookie (HttpOnly, SameSite=Strict; the store keeps
only the token's SHA-256) and is that session's user; without one the JSON API answers 401.

With --api-key the guard (serve/guard.py) lets /api/* through only with the key or a web
credential cookie: with --auth the login session, without it the `homellm_key` cookie that
`POST /api/key-login` sets once the page's user has typed the key (a random token kept in
this process's memory: a restart asks for the key again).

CSRF (OWASP's "custom request header" and "synchronizer token" patterns): every
state-changing request (POST, PUT, PATCH, DELETE) must send `X-CSRF-Token` equal to the
session's token (with --auth) or the server's per-process token (without), as read from
GET /api/me. A cross-site form cannot set a header, and a cross-site fetch that sets one
needs a CORS preflight that this server never grants; the token itself is the second wall.
"""
from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from dataclasses import dataclass, field

from fastapi import Request

from homellm.serve.errors import APIError

SESSION_COOKIE = "homellm_session"
KEY_COOKIE = "homellm_key"
KEY_COOKIE_TTL_S = 30 * 24 * 3600
CSRF_HEADER = "X-CSRF-Token"
UNSAFE_METHODS = ("POST", "PUT", "PATCH", "DELETE")


@dataclass
class WebState:
    """What the web app's routes share (one per app)."""
    store: object                              # homellm.store.Store
    auth: bool = False                         # --auth: accounts and sessions
    setup_token: str | None = None             # --auth on a public address: setup needs it
    csrf_token: str = field(default_factory=lambda: secrets.token_urlsafe(32))  # without --auth
    running: dict[str, asyncio.Event] = field(default_factory=dict)  # reply id -> stop signal
    live: dict[str, object] = field(default_factory=dict)  # reply id -> replies.LiveReply
    loading: dict[str, float] = field(default_factory=dict)  # model id -> load start (monotonic)
    load_s: dict[str, float] = field(default_factory=dict)   # model id -> its last load's time
    ctx: dict[str, int] = field(default_factory=dict)  # model id -> context (once loaded)
    key_sessions: dict[str, float] = field(default_factory=dict)  # sha256(token) -> expiry
    key_failures: dict[str, tuple[int, float]] = field(default_factory=dict)  # address (or
    #              "password:USER_ID") -> (failures, locked until): key-login, password change
    threads: object = None                     # db_threads.DbThreads: the collection's DB work

    def stop_all(self) -> int:
        """Stop every running reply and battle (the server is shutting down): each keeps the
        text it has. How many were running."""
        for event in list(self.running.values()):
            event.set()
        return len(self.running)

    def new_key_session(self) -> str:
        token = secrets.token_urlsafe(32)
        now = time.time()
        for k in [k for k, t in self.key_sessions.items() if t <= now]:
            del self.key_sessions[k]
        self.key_sessions[_sha(token)] = now + KEY_COOKIE_TTL_S
        return token

    def key_session_ok(self, token: str | None) -> bool:
        return bool(token) and self.key_sessions.get(_sha(token), 0.0) > time.time()

    def end_key_session(self, token: str | None):
        if token:
            self.key_sessions.pop(_sha(token), None)

    async def has_credential(self, cookies: dict) -> bool:
        """Does a request with these cookies hold a web credential (for the guard)?"""
        if self.key_session_ok(cookies.get(KEY_COOKIE)):
            return True
        token = cookies.get(SESSION_COOKIE)
        if not self.auth or not token:
            return False
        return await asyncio.to_thread(self.store.session, token) is not None


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class Caller:
    user: object                               # homellm.store.User
    csrf_token: str
    session_token: str | None = None


def state_of(request: Request) -> WebState:
    return request.state.web


def not_found(what: str) -> APIError:
    return APIError(404, f"{what} not found", type="not_found", code="not_found")


def caller(request: Request) -> Caller:
    """The user behind the request (a FastAPI dependency); checks CSRF on state changes."""
    web = state_of(request)
    if getattr(request.app.state, "api_key", None) and credential_of(request) is None:
        raise key_required()  # the guard answers first; this is the second wall
    if not web.auth:
        c = Caller(web.store.local_user(), web.csrf_token)
    else:
        token = request.cookies.get(SESSION_COOKIE)
        session = web.store.session(token)
        if session is None:
            raise APIError(401, "not logged in (or the session expired): POST /api/login",
                           type="authentication_error", code="not_logged_in")
        c = Caller(session.user, session.csrf_token, token)
    check_csrf(request, c.csrf_token)
    return c


async def db_caller(request: Request) -> Caller:
    """`caller`, run on the web app's database threads (db_threads.py): for routes whose own
    work runs there too (an async FastAPI dependency: no hop through FastAPI's thread pool)."""
    web = state_of(request)
    if web.threads is None:
        return await asyncio.to_thread(caller, request)
    return await web.threads.run(caller, request)


def credential_of(request: Request) -> str | None:
    """What the guard found: "key", "cookie", "open" (no key set) or None."""
    return request.scope.get("state", {}).get("credential")


def key_required() -> APIError:
    return APIError(401, "this server needs its API key: send `Authorization: Bearer <key>` "
                    "or enter the key on the page (POST /api/key-login)",
                    type="authentication_error", code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"})


def check_csrf(request: Request, expected: str | None) -> None:
    """403 unless a state-changing request carries the right X-CSRF-Token header."""
    if request.method not in UNSAFE_METHODS:
        return
    sent = request.headers.get(CSRF_HEADER, "")
    if not expected or not secrets.compare_digest(sent.encode(), expected.encode()):
        raise APIError(403, f"missing or wrong {CSRF_HEADER} header (GET /api/me gives the token)",
                       type="permission_error", code="csrf_failed")


def client_address(request: Request) -> str | None:
    return request.client.host if request.client else None
