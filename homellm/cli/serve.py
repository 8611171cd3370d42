"""`homellm serve`: the OpenAI-compatible API (chat/completions, completions, models) on
FastAPI and uvicorn, with continuous batching; loopback by default."""
from __future__ import annotations

import argparse
import sys

HELP = "serve models over an OpenAI-compatible HTTP API (continuous batching)"


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("-m", "--model", action="extend", nargs="+", default=None, metavar="NAME",
                   help="catalog names or paths of the models to serve (-m a b, or -m a -m b; "
                        "default: every model in the catalog, and the default model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY` on /v1/* (default: no key)")
    p.add_argument("--max-batch", type=int, default=8,
                   help="sequences decoded together per model (default 8)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a slot; more get 503 (default 64)")
    p.add_argument("--ctx", type=int, default=None,
                   help="context per sequence in tokens (default: min(4096, the model's))")
    p.add_argument("--keep-alive", type=float, default=300.0, metavar="SECONDS",
                   help="unload a model this long after its last request; -1: never (default 300)")
    p.add_argument("--memory-budget", type=float, default=None, metavar="GB",
                   help="memory for loaded models (default: 3/4 of the machine's)")
    p.add_argument("--prefix-cache", type=float, default=256, metavar="MB",
                   help="keys/values kept per model for prefix reuse (default 256)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for the matmuls (default: $HOMELLM_THREADS, else one per core)")
    p.add_argument("--quiet", action="store_true",
                   help="no line per request (model, tokens, time to first token, tok/s)")
    p.add_argument("--preload", action="store_true",
                   help="load the first model now instead of on its first request")
    p.add_argument("--db", default=None, metavar="URL",
                   help="the web app's database: a SQLite path or postgresql://... URL "
                        "(default $HOMELLM_HOME/homellm.db)")
    p.add_argument("--auth", action="store_true",
                   help="accounts for the web app (a shared server): the first visitor of the "
                        "page sets up the admin account; without it, one local user")


def main(args: argparse.Namespace) -> int:
    from homellm.errors import HomellmError
    for flag, value, low in (("--port", args.port, 0), ("--max-batch", args.max_batch, 1),
                             ("--max-queue", args.max_queue, 0), ("--prefix-cache", args.prefix_cache, 0)):
        if value < low:
            raise HomellmError(f"{flag} {value}: expected at least {low}")
    if args.port > 65535:
        raise HomellmError(f"--port {args.port}: expected at most 65535")
    if args.threads is not None and args.threads < 1:
        raise HomellmError(f"--threads {args.threads}: expected at least 1")
    if args.ctx is not None and args.ctx < 2:
        raise HomellmError(f"--ctx {args.ctx}: the context must hold at least 2 tokens")
    if args.memory_budget is not None and args.memory_budget <= 0:
        raise HomellmError(f"--memory-budget {args.memory_budget}: expected more than 0 GB")

    import logging

    import uvicorn
    if not args.quiet:  # one line per request with its speeds (serve/openai_routes.py)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger = logging.getLogger("homellm.serve")
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)

    from homellm.serve import ModelRegistry, ServeConfig, create_app
    config = ServeConfig(ctx=args.ctx, max_batch=args.max_batch, max_queue=args.max_queue,
                         keep_alive_s=args.keep_alive,
                         memory_budget_bytes=int(args.memory_budget * (1 << 30)) if args.memory_budget else None,
                         prefix_cache_bytes=int(args.prefix_cache * (1 << 20)), threads=args.threads)
    registry = ModelRegistry.from_names(args.model, config)
    models = ", ".join(f"{m} (ctx {registry.context_of(m)})" for m in registry.ids())
    if args.preload:
        import asyncio
        import time
        t0 = time.perf_counter()
        first = registry.ids()[0]
        model = asyncio.run(registry.acquire(first))
        registry.release(model)
        print(f"loaded {first} in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"homellm serve: http://{host}:{args.port}/v1  models: {models}  "
          f"batch {args.max_batch}, keep-alive {args.keep_alive:g} s"
          f"{', API key required' if args.api_key else ''}", file=sys.stderr, flush=True)
    from homellm.serve.web import web_router
    from homellm.store import open_store
    store = open_store(args.db)
    import re
    shown = re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", str(store.url))  # no password on screen
    print(f"web app: http://{host}:{args.port}/  database: {shown}"
          f"{'  accounts (--auth)' if args.auth else ''}", file=sys.stderr, flush=True)
    if not args.auth and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: the web app has no login and listens on {args.host}: anyone who can "
              "reach it sees every conversation (use --auth)", file=sys.stderr, flush=True)
    app = create_app(registry, api_key=args.api_key,
                     extra_routers=[web_router(store, auth=args.auth)])
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    except OSError as e:
        raise HomellmError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    return 0
