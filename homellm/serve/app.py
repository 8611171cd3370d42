"""The FastAPI application: OpenAI routes, error bodies, the request guard, the keep_alive reaper.

    registry = ModelRegistry.from_names(["smollm2"], ServeConfig(max_batch=8))
    app = create_app(registry, api_key=None, extra_routers=[web_router],
                     host="127.0.0.1", allowed_hosts=[])

Other routers (the web app) share the app, the registry (`request.app.state.registry`) and
the OpenAI-style error bodies; they can stream through serve/completion.py without HTTP.
A router may carry `credential_check` (an async function of the request's cookies: does it
hold a web credential?) and `body_limits` ({path: bytes}); the guard (guard.py) uses them.
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
from typing import Iterable

from fastapi import APIRouter, Depends, FastAPI

import homellm
from homellm.serve.errors import install_error_handlers
from homellm.serve.guard import DEFAULT_MAX_BODY, Guard, HostRule
from homellm.serve.openai_routes import api_key_check, openai_router
from homellm.serve.registry import ModelRegistry


def create_app(registry: ModelRegistry, *, api_key: str | None = None,
               extra_routers: Iterable[APIRouter] = (), reap_every_s: float = 1.0,
               host: str = "127.0.0.1", allowed_hosts: Iterable[str] = (),
               max_body_bytes: int = DEFAULT_MAX_BODY, cors_origins: str | None = None) -> FastAPI:
    """The server's app.

    `api_key`: when set, every route but the page, its login and a bare /health needs
    `Authorization: Bearer KEY` (or, under /api, the web app's credential cookie).
    `host`: the address the server listens on, and `allowed_hosts` the other names it
    answers to (the Host check against DNS rebinding; "*" allows any). `max_body_bytes`:
    the largest request body (413 above it; routes may set their own). `cors_origins`:
    --cors-origins (cors.py; None: localhost origins, "*": any, "none": no CORS).
    """
    from homellm.serve.cors import CorsPolicy
    from homellm.serve.metrics import Metrics
    cors = CorsPolicy.parse(cors_origins)
    registry.metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        # What exists now (modules, the app, its routes: ~80k objects) lives as long as the
        # server, so Python's full collections leave it out: each one otherwise stopped every
        # request for 30-130 ms (a gen-2 collection every ~20 s under 100 volunteers).
        gc.collect()
        gc.freeze()
        reaper = asyncio.create_task(registry.reap_forever(reap_every_s))
        try:
            yield
        finally:
            reaper.cancel()
            gc.unfreeze()
            await asyncio.to_thread(registry.close)

    extra_routers = list(extra_routers)
    app = FastAPI(title="homellm", version=homellm.__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.registry = registry
    app.state.api_key = api_key
    install_error_handlers(app)
    app.include_router(openai_router(api_key))
    from homellm.serve.embeddings import embeddings_router
    from homellm.serve.ollama_routes import ollama_router
    from homellm.serve.responses import responses_router
    auth = [Depends(api_key_check(api_key))]
    app.include_router(responses_router(auth))
    app.include_router(embeddings_router(auth))
    from homellm.serve.rewards import rewards_router
    app.include_router(rewards_router(auth))  # /v1/score: reward models (homellm tune rm)
    ollama = ollama_router(auth)
    app.include_router(ollama)
    from homellm.serve.metrics import metrics_router
    app.include_router(metrics_router(auth))
    body_limits: dict[str, int] = {}
    checks = []
    for router in extra_routers:
        app.include_router(router)
        body_limits.update(getattr(router, "body_limits", {}))
        if getattr(router, "credential_check", None) is not None:
            checks.append(router.credential_check)
    app.add_middleware(Guard, api_key=api_key, hosts=HostRule(host, allowed_hosts),
                       max_body_bytes=max_body_bytes, body_limits=body_limits,
                       credential_checks=checks, cors=cors, metrics=registry.metrics,
                       key_only_paths={r.path for r in ollama.routes})
    return app
