"""The FastAPI application: OpenAI routes, error bodies, the keep_alive reaper.

    registry = ModelRegistry.from_names(["smollm2"], ServeConfig(max_batch=8))
    app = create_app(registry, api_key=None, extra_routers=[web_router])

Other routers (the web app) share the app, the registry (`request.app.state.registry`) and
the OpenAI-style error bodies; they can stream through serve/completion.py without HTTP.
"""
from __future__ import annotations

import asyncio
import contextlib
from typing import Iterable

from fastapi import APIRouter, FastAPI

import homellm
from homellm.serve.errors import install_error_handlers
from homellm.serve.openai_routes import openai_router
from homellm.serve.registry import ModelRegistry


def create_app(registry: ModelRegistry, *, api_key: str | None = None,
               extra_routers: Iterable[APIRouter] = (), reap_every_s: float = 1.0) -> FastAPI:
    """The server's app. `api_key`: required as `Authorization: Bearer KEY` on /v1/* when set."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        reaper = asyncio.create_task(registry.reap_forever(reap_every_s))
        try:
            yield
        finally:
            reaper.cancel()
            await asyncio.to_thread(registry.close)

    app = FastAPI(title="homellm", version=homellm.__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.registry = registry
    app.state.api_key = api_key
    install_error_handlers(app)
    app.include_router(openai_router(api_key))
    for router in extra_routers:
        app.include_router(router)
    return app
