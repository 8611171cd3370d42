"""The HTTP side of --auth: who am I, first-run setup, login, logout, accounts, opt-in.

    GET  /api/me          {auth, user, csrf_token, needs_setup}  (never 401: the page asks it first)
    POST /api/setup       the first account, an admin; only while no account has a password
    POST /api/login       {username, password} -> session cookie; 401 wrong, 429 rate limited
    POST /api/logout
    POST /api/users       an admin makes an account {username, password, is_admin}
    GET  /api/users       an admin lists them
    PATCH /api/me         {share_feedback: bool}: opt in to the admin's feedback export

The first user: start `homellm serve --auth` and open the page; while the database has no
account with a password it shows the setup form, and whoever fills it in first is the admin.
Do that before exposing the server. Others get accounts from the admin (in the app).
Before login the CSRF token is the server's per-process one (from GET /api/me).
"""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from homellm.errors import HomellmError
from homellm.serve.errors import APIError, invalid
from homellm.serve.web.context import (SESSION_COOKIE, Caller, caller, check_csrf,
                                       client_address, state_of)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Credentials(_Body):
    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1024)


class NewUser(Credentials):
    is_admin: bool = False


class MySettings(_Body):
    share_feedback: bool


def user_json(u) -> dict:
    return {"id": u.id, "username": u.username, "is_admin": u.is_admin,
            "share_feedback": u.share_feedback}


def _needs_setup(store) -> bool:
    return not any(u.has_password for u in store.list_users())


def _set_cookie(request: Request, response: Response, session, max_age: int):
    response.set_cookie(SESSION_COOKIE, session.token, max_age=max_age, path="/", httponly=True,
                        samesite="strict", secure=request.url.scheme == "https")


def accounts_router() -> APIRouter:
    router = APIRouter(prefix="/api")

    @router.get("/me")
    async def me(request: Request):
        web = state_of(request)
        if not web.auth:
            return {"auth": False, "user": user_json(web.store.local_user()),
                    "csrf_token": web.csrf_token, "needs_setup": False}
        session = web.store.session(request.cookies.get(SESSION_COOKIE))
        if session is None:
            return {"auth": True, "user": None, "csrf_token": web.csrf_token,
                    "needs_setup": _needs_setup(web.store)}
        return {"auth": True, "user": user_json(session.user), "csrf_token": session.csrf_token,
                "needs_setup": False}

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
    async def setup(body: Credentials, request: Request, response: Response):
        web = _need_auth(request)
        check_csrf(request, web.csrf_token)
        if not _needs_setup(web.store):
            raise APIError(409, "setup is done: an account already exists; log in",
                           code="setup_done")
        try:
            user = await asyncio.to_thread(web.store.create_user, body.username, body.password,
                                           is_admin=True)
        except HomellmError as e:
            raise invalid("username" if "username" in str(e) else "password", str(e)) from None
        session = web.store.create_session(user)
        _set_cookie(request, response, session, web.store.auth.session_ttl_s)
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
        _set_cookie(request, response, session, web.store.auth.session_ttl_s)
        return {"user": user_json(session.user), "csrf_token": session.csrf_token}

    @router.post("/logout")
    async def logout(request: Request, response: Response, who: Caller = Depends(caller)):
        web = _need_auth(request)
        web.store.logout(who.session_token)
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
        return {"users": [user_json(u) for u in state_of(request).store.list_users()
                          if u.has_password]}

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

    return router
