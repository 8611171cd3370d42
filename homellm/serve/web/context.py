"""Who is asking: the web app's shared state, the user behind a request, and CSRF.

Without --auth every request is the store's local user (one user, loopback). With --auth a
request carries the `homellm_session` cookie (HttpOnly, SameSite=Strict; the store keeps
only the token's SHA-256) and is that session's user; without one the JSON API answers 401.

CSRF (OWASP's "custom request header" and "synchronizer token" patterns): every
state-changing request (POST, PUT, PATCH, DELETE) must send `X-CSRF-Token` equal to the
session's token (with --auth) or the server's per-process token (without), as read from
GET /api/me. A cross-site form cannot set a header, and a cross-site fetch that sets one
needs a CORS preflight that this server never grants; the token itself is the second wall.
"""
from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, field

from fastapi import Request

from homellm.serve.errors import APIError

SESSION_COOKIE = "homellm_session"
CSRF_HEADER = "X-CSRF-Token"
UNSAFE_METHODS = ("POST", "PUT", "PATCH", "DELETE")


@dataclass
class WebState:
    """What the web app's routes share (one per app)."""
    store: object                              # homellm.store.Store
    auth: bool = False                         # --auth: accounts and sessions
    csrf_token: str = field(default_factory=lambda: secrets.token_urlsafe(32))  # without --auth
    running: dict[str, asyncio.Event] = field(default_factory=dict)  # reply id -> stop signal
    ctx: dict[str, int] = field(default_factory=dict)  # model id -> context (once loaded)


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
