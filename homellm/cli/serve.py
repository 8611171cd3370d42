"""`homellm serve`: the OpenAI-compatible API (chat/completions with tools, completions,
responses, embeddings, models), Ollama's API (/api/chat, /api/generate, /api/tags, ...),
/metrics and the web app on FastAPI and uvicorn, with continuous batching; loopback by default.

Security (serve/guard.py, serve/connections.py): --api-key guards every data route (the web
page asks for the key, or --auth's login stands for it); a Host check against DNS rebinding
(--allowed-hosts); body and prompt size limits; read timeouts on idle connections."""
from __future__ import annotations

import argparse
import sys

HELP = "serve models over an OpenAI-compatible HTTP API (continuous batching)"


EPILOG = ("Who may use it: on loopback (the default) without --api-key, anyone on this "
          "machine. --api-key KEY: every /v1/* route needs `Authorization: Bearer KEY`, and "
          "every /api/* route (the web app's) the key or the web app's cookie, which the page "
          "gets by asking for the key once (with --auth, by logging in); the page, its login "
          "and a bare /health stay open. --auth: accounts; off loopback the first-run setup "
          "needs the one-time token printed at start. A request whose Host is not a name of "
          "this server gets 400 (DNS rebinding); see --allowed-hosts.")


def add_arguments(p: argparse.ArgumentParser):
    p.epilog = EPILOG
    p.add_argument("-m", "--model", action="extend", nargs="+", default=None, metavar="NAME",
                   help="catalog names or paths of the models to serve (-m a b, or -m a -m b; "
                        "default: every model in the catalog, and the default model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--api-key", default=None,
                   help="require this key on every route of the API and the web app: "
                        "`Authorization: Bearer KEY` on /v1/*, the key or the page's cookie on "
                        "/api/* (the page asks for the key once; with --auth, logging in is "
                        "enough); /health without it says only that the server is up "
                        "(default: no key)")
    p.add_argument("--allowed-hosts", default="", metavar="NAMES",
                   help="comma-separated host names the server also answers to, besides "
                        "loopback names, its address and (off loopback) the machine's name: a "
                        "guard against DNS rebinding; '.example.org' allows the domain and its "
                        "subdomains, '*' any name")
    p.add_argument("--cors-origins", default=None, metavar="ORIGINS",
                   help="comma-separated origins whose web pages may call the API from a browser "
                        "(CORS), e.g. https://app.example.org,http://localhost:*; '*' any, 'none' "
                        "no CORS (default: http(s)://localhost, 127.0.0.1 and [::1] on any port); "
                        "such pages send the API key as a Bearer header, never cookies")
    p.add_argument("--max-body-mb", type=float, default=8, metavar="MB",
                   help="largest request body; larger ones get 413 (default 8; imports in the "
                        "web app: 64)")
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
    p.add_argument("--kv-disk", type=float, default=4, metavar="GB",
                   help="conversations' keys and values kept on disk per model when they leave "
                        "memory or the server stops, under $HOMELLM_HOME/kvcache (the web app's "
                        "conversations, and API requests with prompt_cache_key): a conversation "
                        "reopened, even after a restart, is not prefilled again (default 4; 0: none)")
    p.add_argument("--adapter", action="append", default=None, metavar="NAME=PATH",
                   help="a LoRA adapter folder (PEFT layout, `homellm tune`) for the first model, "
                        "served as the model id BASE:NAME beside the base (repeatable; requests "
                        "for different adapters share one batch and one copy of the weights)")
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
                        "page sets up the admin account (off loopback, with the one-time setup "
                        "token printed here); without it, one local user")


SHUTDOWN_S = 3   # after Ctrl+C, open requests get this long to end before they are cut


def stopping_server(config, registry, web_state):
    """uvicorn's server, with a Ctrl+C that says what it waits for: the web app's replies stop
    at once (each keeps the text it has), other open requests get SHUTDOWN_S to end before
    they are cut; a second Ctrl+C quits at once."""
    import asyncio
    import logging
    import signal

    import uvicorn

    class CutQuietly(logging.Filter):
        """uvicorn's lines about the requests it cuts after SHUTDOWN_S (an ERROR and each one's
        CancelledError traceback): one line of ours instead, as Ctrl+C said they would be."""

        def filter(self, record):
            if str(record.msg).startswith("Cancel %s running task"):
                n = record.args[0] if record.args else "the"
                print(f"homellm serve: cut {n} open request{'' if n == 1 else 's'} after "
                      f"{SHUTDOWN_S} s", file=sys.stderr, flush=True)
                return False
            exc = record.exc_info[1] if record.exc_info else None
            return not isinstance(exc, asyncio.CancelledError)

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            logging.getLogger("uvicorn.error").addFilter(CutQuietly())
            await super().shutdown(sockets)

        def handle_exit(self, sig, frame):
            first = not self.should_exit
            super().handle_exit(sig, frame)
            if not first:
                if self.force_exit:
                    print("homellm serve: quitting now", file=sys.stderr, flush=True)
                return
            replies = len(web_state.running)
            busy = sum(m.in_use for m in list(registry.loaded.values()))
            others = max(0, busy - replies)
            what = [f"{replies} web {'reply' if replies == 1 else 'replies'} (stopped now, "
                    f"{'its' if replies == 1 else 'their'} text kept)"] if replies else []
            if others:
                what.append(f"{others} API request{'' if others == 1 else 's'} (cut after "
                            f"{SHUTDOWN_S} s)")
            print(f"homellm serve: stopping{': ' + ' and '.join(what) if what else ''}"
                  f"{'; Ctrl+C again to quit at once' if sig == signal.SIGINT else ''}",
                  file=sys.stderr, flush=True)
            try:
                asyncio.get_running_loop().call_soon_threadsafe(web_state.stop_all)
            except RuntimeError:  # no loop yet (still starting): nothing runs
                pass

    return Server(config)


def parse_adapters(values: list[str] | None) -> dict[str, str]:
    """--adapter NAME=PATH ... -> {NAME: PATH}, or HomellmError naming the bad one."""
    from pathlib import Path

    from homellm.errors import HomellmError
    from homellm.serve.registry import ADAPTER_NAME
    out: dict[str, str] = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        if not sep or not ADAPTER_NAME.fullmatch(name) or not path:
            raise HomellmError(f"--adapter {value}: expected NAME=PATH (NAME of letters, digits, "
                               "'.', '_' or '-')")
        if name in out:
            raise HomellmError(f"--adapter {value}: the name {name} is given twice")
        if not Path(path).expanduser().is_dir():
            raise HomellmError(f"--adapter {value}: {path} is not a folder (a LoRA adapter: "
                               "adapter_config.json and adapter_model.safetensors)")
        out[name] = str(Path(path).expanduser())
    return out


def main(args: argparse.Namespace) -> int:
    from homellm.errors import HomellmError
    for flag, value, low in (("--port", args.port, 0), ("--max-batch", args.max_batch, 1),
                             ("--max-queue", args.max_queue, 0), ("--prefix-cache", args.prefix_cache, 0),
                             ("--kv-disk", args.kv_disk, 0)):
        if value < low:
            raise HomellmError(f"{flag} {value}: expected at least {low}")
    if args.port > 65535:
        raise HomellmError(f"--port {args.port}: expected at most 65535")
    if args.threads is not None and args.threads < 1:
        raise HomellmError(f"--threads {args.threads}: expected at least 1")
    if args.threads is None:  # a bad $HOMELLM_THREADS is an error now, not at the first request
        from homellm.api import default_threads
        default_threads()
    if args.ctx is not None and args.ctx < 2:
        raise HomellmError(f"--ctx {args.ctx}: the context must hold at least 2 tokens")
    if args.memory_budget is not None and args.memory_budget <= 0:
        raise HomellmError(f"--memory-budget {args.memory_budget}: expected more than 0 GB")
    if not args.max_body_mb > 0:
        raise HomellmError(f"--max-body-mb {args.max_body_mb}: expected more than 0")
    if args.api_key is not None and not args.api_key.strip():
        raise HomellmError("--api-key: the key is empty")
    from homellm.serve.cors import CorsPolicy
    CorsPolicy.parse(args.cors_origins)  # a malformed origin is an error now
    adapters = parse_adapters(args.adapter)
    if args.auth:  # accounts hash passwords with argon2: find out now, not at the first setup
        try:
            import argon2  # noqa: F401
        except ImportError:
            raise HomellmError("--auth needs argon2-cffi (password hashing), which is not "
                               "installed: pip install argon2-cffi (homellm installs it by "
                               "default; reinstall homellm to get it)") from None

    import logging

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
                         prefix_cache_bytes=int(args.prefix_cache * (1 << 20)), threads=args.threads,
                         adapters=adapters, kv_disk_bytes=int(args.kv_disk * (1 << 30)))
    registry = ModelRegistry.from_names(args.model, config)
    registry.check_adapters()  # a bad adapter is an error now, not at its first request
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
    from homellm.serve.guard import is_loopback
    setup_token = None
    if not is_loopback(args.host):
        if not args.auth and not args.api_key:
            print(f"warning: the server listens on {args.host} with no key and no login: anyone "
                  "who can reach it can use the models and see every conversation (use "
                  "--api-key and/or --auth)", file=sys.stderr, flush=True)
        if args.auth and store.needs_setup():
            import secrets
            setup_token = secrets.token_urlsafe(12)
            print(f"setup token: {setup_token}  (the page's first-run setup asks for it; it "
                  "makes the admin account once)", file=sys.stderr, flush=True)
    from homellm.serve.connections import server_config
    allowed = [h.strip() for h in args.allowed_hosts.split(",") if h.strip()]
    web = web_router(store, auth=args.auth, setup_token=setup_token)
    app = create_app(registry, api_key=args.api_key, host=args.host, allowed_hosts=allowed,
                     max_body_bytes=int(args.max_body_mb * (1 << 20)), cors_origins=args.cors_origins,
                     extra_routers=[web])
    config = server_config(app, args.host, args.port)
    config.timeout_graceful_shutdown = SHUTDOWN_S
    try:
        stopping_server(config, registry, web.web_state).run()
    except OSError as e:
        raise HomellmError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    return 0
