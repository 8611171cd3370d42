"""The HuggingChat-style web app: its JSON API and its page, on the server's app and port.

    from homellm.serve import create_app
    from homellm.serve.web import web_router
    app = create_app(registry, extra_routers=[web_router(store, auth=False)])

`/` is the page (static/index.html, app.js, app.css, views.js, the vendored markdown-it and
KaTeX: no build step, nothing from a CDN; also
at /arena, /leaderboard, /evals, /contribute, /contributors and /moderate, its other views),
`/api/*` its JSON API (accounts.py, conversations.py, messages.py, imports.py, replies.py:
replies that run on the server and are saved before they are shown, arena.py: blind
battles and the leaderboard, evals.py: the kept eval runs, collect.py: Open Assistant's
volunteer tasks, review, ranking and moderation). Without
`auth` every request is the store's local user; with it, accounts and session cookies
(context.py).
With the server's --api-key, /api/* also needs the key or a web credential (guard.py).
"""
from __future__ import annotations

import contextlib

from fastapi import APIRouter, Depends, Request

from homellm.serve.web.accounts import accounts_router
from homellm.serve.web.arena import arena_router
from homellm.serve.web.assets import assets_router
from homellm.serve.web.collect import collect_router
from homellm.serve.web.context import WebState
from homellm.serve.web.conversations import conversations_router
from homellm.serve.web.evals import evals_router
from homellm.serve.web.imports import imports_router
from homellm.serve.web.messages import messages_router
from homellm.serve.web.replies import replies_router

__all__ = ["WebState", "web_router"]


def web_router(store, *, auth: bool = False, setup_token: str | None = None,
               collect=None) -> APIRouter:
    """All of the web app's routes, over `store` (homellm.store.Store). `setup_token`: with
    `auth`, the first-run setup form must carry it (the CLI prints it). `collect`: the
    volunteer collection's thresholds (homellm.collect.CollectSettings; None: OA's)."""
    from homellm.serve.web.db_threads import DbThreads
    from homellm.serve.web.imports import MAX_IMPORT_BYTES
    state = WebState(store=store, auth=auth, setup_token=setup_token,
                     threads=DbThreads(store.db))

    async def attach(request: Request):  # async: no thread hop
        request.state.web = state

    @contextlib.asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:
            state.threads.close()

    router = APIRouter(dependencies=[Depends(attach)], lifespan=lifespan)
    router.web_state = state  # for tests and the CLI
    router.credential_check = state.has_credential  # for the guard (serve/guard.py)
    router.body_limits = {"/api/import": MAX_IMPORT_BYTES}
    # the collection first: its volunteers' requests are the busiest, and FastAPI tries the
    # routes in order, twice at each level of included routers (no path is in two routers)
    for part in (collect_router(store, collect, state.threads), assets_router(),
                 accounts_router(), conversations_router(), messages_router(), imports_router(),
                 replies_router(), arena_router(store), evals_router()):
        router.include_router(part)
    return router
