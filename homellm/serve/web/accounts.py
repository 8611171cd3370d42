"""The HTTP side of --auth and --api-key: who am I, first-run setup, login, logout, accounts.

    GET  /api/me          {auth, user, csrf_token, needs_setup, setup_token_required,
                           key_required, key_cookie}   (never 401: the page asks it first)
    POST /api/setup       the first account, an admin: {username, password, setup_token}
    POST /api/login       {username, password} -> session cookie; 401 wrong, 429 rate limited
    POST /api/key-login   {key}: the API key typed into the page (--api-key without --auth)
                          -> the `homellm_key` cookie; 401 wrong, 429 after repeated misses
    POST /api/logout      ends the session (or forgets the key cookie)
    POST /api/users       an admin makes an account {username, password, is_admin}
    GET  /api/users       an admin lists them, with `locked_s` for those whose logins are
                          limited somewhere
    POST /api/users/{username}/unlock   an admin lifts that user's login limits
    POST /api/users/{username}/password {password}: an admin sets a new one (the user's
                          sessions end)
    DELETE /api/users/{username}        an admin removes an account with its conversations
                          (not their own)
    PATCH /api/me         {share_feedback: bool}: opt in to the admin's feedback export
    POST /api/me/password {current, password}: change my own (my other sessions end; wrong
                          `current` several times: 429 for a while)

The first user: start `homellm serve --auth` and open the page; while the database has no
account with a password it shows the setup form, and the first to fill it in is the admin
(exactly one, however many try at once: store/people.py). A server that listens beyond
loopback prints a one-time setup token on its console, and the form must carry it, so a
stranger who reaches the page first cannot take the admin account. Others get accounts
from the admin (in the app). Before login the CSRF token is the server's per-process one.
"""
from __future__ import annotations

import asyncio
import secrets
import time

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from homellm.errors import HomellmError
from homellm.serve.errors import APIError, invalid
from homellm.serve.guard import bearer_ok
from homellm.serve.web.context import (KEY_COOKIE, KEY_COOKIE_TTL_S, SESSION_COOKIE, Caller,
                                       caller, check_csrf, client_address, credential_of,
                                       state_of)

KEY_MAX_FAILURES = 5      # wrong keys from one address before it waits
KEY_LOCKOUT_S = 30        # ... this long, doubled with each further miss, up to an hour


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Credentials(_Body):
    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1024)


class SetupIn(Credentials):
    setup_token: str | None = Field(default=None, max_length=200)


class KeyIn(_Body):
    key: str = Field(min_length=1, max_length=1024)


class NewUser(Credentials):
    is_admin: bool = False


class MySettings(_Body):
    share_feedback: bool


class NewPassword(_Body):
    password: str = Field(min_length=1, max_length=1024)


class PasswordChange(NewPassword):
    current: str = Field(min_length=1, max_length=1024)


PASSWORD_MISSES = 5        # wrong current passwords before a change waits PASSWORD_WAIT_S
PASSWORD_WAIT_S = 60


def user_json(u) -> dict:
    return {"id": u.id, "username": u.username, "is_admin": u.is_admin,
            "share_feedback": u.share_feedback}


def _set_cookie(request: Request, response: Response, name: str, value: str, max_age: int):
    response.set_cookie(name, value, max_age=max_age, path="/", httponly=True,
                        samesite="strict", secure=request.url.scheme == "https")


def accounts_router() -> APIRouter:
    router = APIRouter(prefix="/api")

    @router.get("/me")
    async def me(request: Request):
        web = state_of(request)
        if not web.auth:
            credential = credential_of(request)
            if credential is None:  # --api-key, and neither the key nor the key cookie
                return {"auth": False, "user": None, "csrf_token": web.csrf_token,
                        "needs_setup": False, "setup_token_required": False,
                        "key_required": True, "key_cookie": False}
            return {"auth": False, "user": user_json(web.store.local_user()),
                    "csrf_token": web.csrf_token, "needs_setup": False,
                    "setup_token_required": False, "key_required": False,
                    "key_cookie": credential == "cookie"}
        from homellm.store.people import MIN_PASSWORD
        session = await asyncio.to_thread(web.store.session, request.cookies.get(SESSION_COOKIE))
        if session is None:
            needs = await asyncio.to_thread(web.store.needs_setup)
            return {"auth": True, "user": None, "csrf_token": web.csrf_token,
                    "needs_setup": needs, "setup_token_required": needs and bool(web.setup_token),
                    "key_required": False, "password_min": MIN_PASSWORD}
        return {"auth": True, "user": user_json(session.user), "csrf_token": session.csrf_token,
                "needs_setup": False, "setup_token_required": False, "key_required": False,
                "password_min": MIN_PASSWORD}

    @router.patch("/me")
    async def update_me(body: MySettings, request: Request, who: Caller = Depends(caller)):
        store = state_of(request).store
        store.set_share_feedback(who.user, body.share_feedback)
        return {"user": user_json(store.get_user(who.user.id))}

    def _need_auth(request: Request):
        web = state_of(request)
        if not web.auth:
            raise APIError(404, "accounts are off: start the server with --auth",
                           type="not_found", code="auth_disabled")
        return web

    @router.post("/setup")
    async def setup(body: SetupIn, request: Request, response: Response):
        from homellm.store.people import SetupDone
        web = _need_auth(request)
        check_csrf(request, web.csrf_token)
        if web.setup_token and not secrets.compare_digest(
                (body.setup_token or "").strip().encode(), web.setup_token.encode()):
            raise APIError(403, "setup_token: missing or wrong: give the one-time setup token "
                           "that `homellm serve` printed on its console", param="setup_token",
                           type="permission_error", code="bad_setup_token")
        try:
            user = await asyncio.to_thread(web.store.create_first_admin, body.username,
                                           body.password)
        except SetupDone as e:
            raise APIError(409, str(e), code="setup_done") from None
        except HomellmError as e:
            raise invalid("username" if "username" in str(e) else "password", str(e)) from None
        web.setup_token = None  # spent
        session = await asyncio.to_thread(web.store.create_session, user)
        _set_cookie(request, response, SESSION_COOKIE, session.token, web.store.auth.session_ttl_s)
        return {"user": user_json(user), "csrf_token": session.csrf_token}

    @router.post("/login")
    async def login(body: Credentials, request: Request, response: Response):
        from homellm.store import LoginLocked
        web = _need_auth(request)
        check_csrf(request, web.csrf_token)
        try:
            session = await asyncio.to_thread(  # argon2 takes ~0.1 s: off the event loop
                web.store.login, body.username, body.password, client=client_address(request))
        except LoginLocked as e:
            raise APIError(429, str(e), type="rate_limit_error", code="login_locked",
                           headers={"Retry-After": str(int(e.retry_after_s) + 1)}) from None
        if session is None:
            raise APIError(401, "wrong username or password", type="authentication_error",
                           code="bad_credentials")
        _set_cookie(request, response, SESSION_COOKIE, session.token, web.store.auth.session_ttl_s)
        return {"user": user_json(session.user), "csrf_token": session.csrf_token}

    @router.post("/key-login")
    async def key_login(body: KeyIn, request: Request, response: Response):
        web = state_of(request)
        check_csrf(request, web.csrf_token)
        api_key = request.app.state.api_key
        if not api_key:
            raise APIError(404, "this server has no API key: nothing to log in with",
                           type="not_found", code="no_api_key")
        address = client_address(request) or "-"
        failures, until = web.key_failures.get(address, (0, 0.0))
        if until > time.time():
            wait = until - time.time()
            raise APIError(429, f"too many wrong keys; try again in {int(wait) + 1} s",
                           type="rate_limit_error", code="key_locked",
                           headers={"Retry-After": str(int(wait) + 1)})
        if not bearer_ok(f"Bearer {body.key}", api_key):
            failures += 1
            hold = 0.0
            if failures >= KEY_MAX_FAILURES:
                hold = min(KEY_LOCKOUT_S * 2 ** min(failures - KEY_MAX_FAILURES, 7), 3600)
            web.key_failures[address] = (failures, time.time() + hold)
            raise APIError(401, "wrong API key", type="authentication_error",
                           code="invalid_api_key")
        web.key_failures.pop(address, None)
        _set_cookie(request, response, KEY_COOKIE, web.new_key_session(), KEY_COOKIE_TTL_S)
        return {"ok": True, "csrf_token": web.csrf_token}

    @router.post("/logout")
    async def logout(request: Request, response: Response, who: Caller = Depends(caller)):
        web = state_of(request)
        web.end_key_session(request.cookies.get(KEY_COOKIE))
        response.delete_cookie(KEY_COOKIE, path="/", httponly=True, samesite="strict")
        if web.auth and who.session_token:
            await asyncio.to_thread(web.store.logout, who.session_token)
            response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
        return {"ok": True, "csrf_token": web.csrf_token}

    def _admin(request: Request, who: Caller):
        _need_auth(request)
        if not who.user.is_admin:
            raise APIError(403, "only an admin can do this", type="permission_error",
                           code="not_admin")

    @router.get("/users")
    async def users(request: Request, who: Caller = Depends(caller)):
        _admin(request, who)
        store = state_of(request).store
        locks = store.login_locks()
        return {"users": [{**user_json(u), "locked_s": round(locks.get(u.username, 0.0))}
                          for u in store.list_users() if u.has_password]}

    @router.post("/users", status_code=201)
    async def create_user(body: NewUser, request: Request, who: Caller = Depends(caller)):
        _admin(request, who)
        try:
            user = await asyncio.to_thread(state_of(request).store.create_user, body.username,
                                           body.password, is_admin=body.is_admin)
        except HomellmError as e:
            status = 409 if "taken" in str(e) else 400
            raise APIError(status, str(e), param="username" if "username" in str(e) else
                           "password", code="user_exists" if status == 409 else "invalid_value")
        return {"user": user_json(user)}

    def _user(request: Request, username: str):
        u = state_of(request).store.user_by_name(username)
        if u is None or not u.has_password:
            raise APIError(404, f"no user {username!r}", type="not_found", code="not_found")
        return u

    @router.post("/users/{username}/password")
    async def reset_password(username: str, body: NewPassword, request: Request,
                             who: Caller = Depends(caller)):
        _admin(request, who)
        store, u = state_of(request).store, _user(request, username)
        try:
            await asyncio.to_thread(store.set_password, u, body.password)
        except HomellmError as e:
            raise invalid("password", str(e)) from None
        store.end_sessions(u, keep_token=who.session_token if u.id == who.user.id else None)
        store.unlock_logins(username)
        return {"username": username}

    @router.delete("/users/{username}")
    async def remove_user(username: str, request: Request, who: Caller = Depends(caller)):
        _admin(request, who)
        store, u = state_of(request).store, _user(request, username)
        if u.id == who.user.id:
            raise APIError(409, "you cannot remove your own account (another admin can)",
                           code="own_account")
        await asyncio.to_thread(store.delete_user, u)
        return {"removed": username}

    @router.post("/me/password")
    async def change_password(body: PasswordChange, request: Request,
                              who: Caller = Depends(caller)):
        web = _need_auth(request)
        misses, until = web.key_failures.get(f"password:{who.user.id}", (0, 0.0))
        if until > time.time():
            wait = int(until - time.time()) + 1
            raise APIError(429, f"too many wrong passwords; try again in {wait} s",
                           type="rate_limit_error", code="password_locked",
                           headers={"Retry-After": str(wait)})
        if not await asyncio.to_thread(web.store.check_password, who.user, body.current):
            misses += 1
            web.key_failures[f"password:{who.user.id}"] = (
                0 if misses >= PASSWORD_MISSES else misses,
                time.time() + PASSWORD_WAIT_S if misses >= PASSWORD_MISSES else 0.0)
            raise invalid("current", "the current password is wrong")
        try:
            await asyncio.to_thread(web.store.set_password, who.user, body.password)
        except HomellmError as e:
            raise invalid("password", str(e)) from None
        web.key_failures.pop(f"password:{who.user.id}", None)
        web.store.end_sessions(who.user, keep_token=who.session_token)
        return {"ok": True}

    @router.post("/users/{username}/unlock")
    async def unlock(username: str, request: Request, who: Caller = Depends(caller)):
        _admin(request, who)
        store = state_of(request).store
        if store.user_by_name(username) is None:
            raise APIError(404, f"no user {username!r}", type="not_found", code="not_found")
        return {"username": username, "cleared": store.unlock_logins(username)}

    return router
