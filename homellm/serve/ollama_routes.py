"""Ollama's API on the server's port, for the apps and plug-ins that speak only it.

Routes (Ollama's docs/api.md): GET /api/version, /api/tags, /api/ps; POST /api/show,
/api/chat, /api/generate, /api/embed, /api/embeddings (the older one), /api/pull; DELETE
/api/delete. None of them clashes with the web app's /api routes (/api/me, /api/models,
/api/conversations, ...). They need the server's --api-key as `Authorization: Bearer KEY`
(ollama-python sends the headers it is given); the web page's cookie does not open them.

- /api/chat and /api/generate stream NDJSON (one JSON object a line, the last with
  "done": true and Ollama's counters in nanoseconds) unless "stream": false. `options` maps to
  our sampling (temperature, top_k, top_p, min_p, repeat_penalty, presence_penalty,
  frequency_penalty, seed, num_predict, stop; the rest, e.g. num_ctx, is ignored: the context
  is the server's), with Ollama's defaults (temperature 0.8, top_p 0.9, repeat_penalty 1.1).
  `format` "json" or a JSON Schema constrains the reply; `tools` (chat) go through
  serve/tools.py, calls come back as message.tool_calls with arguments as objects.
- `keep_alive` ("5m", "30s", seconds, 0: unload when done, negative: keep) sets how long the
  model stays loaded after the request; an empty prompt or message list only loads (or with
  keep_alive 0, unloads) the model.
- /api/embed returns L2-normalized mean-pooled embeddings (serve/embeddings.py); the older
  /api/embeddings the same vector unnormalized.
- /api/pull takes the names the catalog can fetch (the default model, hf:owner/repo) and adds
  the model to the ones served; /api/delete removes it from the catalog (homellm rm).
Errors are Ollama's shape, {"error": "message"}, with the HTTP status.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

import homellm
from homellm.serve.completion import GenerationSettings, start_chat, start_completion
from homellm.serve.errors import APIError

OLLAMA_VERSION = "0.9.0"   # the Ollama API this follows (clients check it for features)
OLLAMA_DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "min_p": 0.0,
                   "repeat_penalty": 1.1}
OPTION_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "presence_penalty",
                 "frequency_penalty")
_DURATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ns|us|µs|ms|s|m|h)?\s*$")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600, None: 1}


class OllamaError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.message}, status_code=self.status)


def _bad(message: str) -> OllamaError:
    return OllamaError(400, message)


def _from_api_error(e: APIError) -> OllamaError:
    return OllamaError(e.status, e.message)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def parse_keep_alive(value) -> float | None:
    """Seconds from Ollama's keep_alive (a number of seconds or a Go duration such as "5m");
    negative: forever; None: not given."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise _bad(f"keep_alive: expected a duration such as \"5m\" or a number of seconds, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    m = _DURATION.match(str(value))
    if not m:
        raise _bad(f"keep_alive: expected a duration such as \"5m\", \"30s\" or a number of "
                   f"seconds, got {value!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def settings_from_options(options, fmt) -> GenerationSettings:
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise _bad("options: expected an object")
    s = GenerationSettings(**OLLAMA_DEFAULTS)
    for name in OPTION_FIELDS:
        value = options.get(name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise _bad(f"options.{name}: expected a number, got {value!r}")
            setattr(s, name, value)
    if options.get("seed") is not None:
        if not isinstance(options["seed"], int) or isinstance(options["seed"], bool):
            raise _bad(f"options.seed: expected an integer, got {options['seed']!r}")
        s.seed = options["seed"]
    n = options.get("num_predict")
    if n is not None:
        if not isinstance(n, int) or isinstance(n, bool):
            raise _bad(f"options.num_predict: expected an integer, got {n!r}")
        s.max_tokens = n if n > 0 else None  # -1: no limit, -2: fill the context
        if n == 0:
            raise _bad("options.num_predict: 0 tokens asks for nothing; use -1 for no limit")
    stop = options.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(x, str) for x in stop):
            raise _bad("options.stop: expected a list of strings")
        s.stop = stop
    if fmt not in (None, ""):
        if fmt == "json":
            s.response_format = {"type": "json_object"}
        elif isinstance(fmt, dict):
            s.response_format = {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}
        else:
            raise _bad(f"format: expected \"json\" or a JSON Schema object, got {fmt!r}")
    if not 0 <= s.temperature <= 100 or not 0 <= s.top_p <= 1 or not 0 <= s.min_p <= 1 or s.top_k < 0:
        raise _bad("options: temperature must be >= 0, top_p and min_p in [0, 1], top_k >= 0")
    return s


def chat_messages_from(messages) -> list[dict]:
    """Ollama's messages -> OpenAI chat messages (tool calls get ids; images are refused)."""
    if not isinstance(messages, list):
        raise _bad("messages: expected a list")
    out, n = [], 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad(f"messages[{i}]: expected an object with a role")
        if m.get("images"):
            raise _bad(f"messages[{i}].images: this server's models read text only")
        content = m.get("content") or ""
        if not isinstance(content, str):
            raise _bad(f"messages[{i}].content: expected a string")
        message = {"role": m["role"], "content": content}
        if m.get("tool_calls"):
            calls = []
            for j, call in enumerate(m["tool_calls"]):
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise _bad(f"messages[{i}].tool_calls[{j}]: expected {{\"function\": {{\"name\", \"arguments\"}}}}")
                arguments = fn.get("arguments") or {}
                n += 1
                calls.append({"id": f"call_{n}", "type": "function", "function": {
                    "name": fn["name"], "arguments": arguments if isinstance(arguments, str)
                    else json.dumps(arguments, ensure_ascii=False)}})
            message["tool_calls"] = calls
        if m["role"] == "tool" and isinstance(m.get("tool_name"), str):
            message["name"] = m["tool_name"]
        out.append(message)
    return out


def _ollama_calls(calls) -> list[dict]:
    return [{"function": {"name": c.name, "arguments": c.argument_object()}} for c in calls]


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def _stats(stream, t0: float, load_s: float) -> dict:
    r = stream.result
    return {"done_reason": r.finish_reason, "total_duration": _ns(time.perf_counter() - t0),
            "load_duration": _ns(load_s), "prompt_eval_count": r.prompt_tokens,
            "prompt_eval_duration": _ns(r.ttft_s), "eval_count": r.completion_tokens,
            "eval_duration": _ns(r.decode_s)}


def ndjson(lines) -> StreamingResponse:
    return StreamingResponse(lines, media_type="application/x-ndjson",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _line(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"


async def _body(request: Request) -> dict:
    try:
        body = json.loads(await request.body() or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _bad(f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    return body


def _model_name(body: dict) -> str:
    name = body.get("model") or body.get("name")
    if not isinstance(name, str) or not name:
        raise _bad("model is required")
    return name


def _resolve(registry, name: str) -> str:
    try:
        return registry.resolve_id(name)
    except APIError:
        if name.endswith(":latest"):
            try:
                return registry.resolve_id(name.removesuffix(":latest"))
            except APIError:
                pass
        raise OllamaError(404, f"model '{name}' not found") from None


# -- what the models are ----------------------------------------------------------------------

def _summary(registry, mid: str) -> tuple[dict, int, str]:
    """(catalog summary, size in bytes, modified time ISO) of a served model."""
    from homellm.catalog import library
    source = registry.sources[mid]
    entry = library.find(str(source)) if not isinstance(source, Path) else None
    if entry is not None:
        return entry.summary, entry.size, datetime.fromtimestamp(
            entry.modified, timezone.utc).isoformat().replace("+00:00", "Z")
    cache = registry.__dict__.setdefault("_ollama_summaries", {})
    if mid not in cache:
        from homellm.catalog.manifest import summarize
        from homellm.model.formats import open_checkpoint
        from homellm.serve.registry import size_on_disk
        path = Path(source)
        summary = summarize(open_checkpoint(path, as_numpy=True), path if path.is_dir() else None)
        cache[mid] = (summary, size_on_disk(path), datetime.fromtimestamp(
            path.stat().st_mtime, timezone.utc).isoformat().replace("+00:00", "Z"))
    return cache[mid]


def _params_label(n) -> str:
    if not n:
        return ""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}".rstrip("0").rstrip(".") + unit
    return str(n)


def _details(summary: dict) -> dict:
    family = summary.get("architecture") or "llama"
    return {"parent_model": "", "format": "gguf" if summary.get("quant", "").startswith(("Q", "IQ"))
            or summary.get("quant") in ("F16", "F32", "BF16") else "safetensors",
            "family": family, "families": [family],
            "parameter_size": _params_label(summary.get("n_params")),
            "quantization_level": summary.get("quant") or ""}


def _digest(mid: str, size: int, modified: str) -> str:
    return hashlib.sha256(f"{mid}\0{size}\0{modified}".encode()).hexdigest()


def _tag(registry, mid: str) -> dict:
    summary, size, modified = _summary(registry, mid)
    return {"name": mid, "model": mid, "modified_at": modified, "size": size,
            "digest": _digest(mid, size, modified), "details": _details(summary)}


# -- the router ---------------------------------------------------------------------------------

def ollama_router(auth) -> APIRouter:
    router = APIRouter()

    def route(method: str, path: str):
        def wrap(fn):
            async def handler(request: Request):
                try:
                    return await fn(request)
                except OllamaError as e:
                    return e.response()
                except APIError as e:
                    return _from_api_error(e).response()
            handler.__name__ = fn.__name__
            router.add_api_route(path, handler, methods=[method], dependencies=auth)
            return fn
        return wrap

    @route("GET", "/api/version")
    async def version(request: Request):
        return {"version": OLLAMA_VERSION, "homellm": homellm.__version__}

    @route("GET", "/api/tags")
    async def tags(request: Request):
        registry = request.app.state.registry
        models = await asyncio.to_thread(lambda: [_tag(registry, mid) for mid in registry.ids()])
        return {"models": models}

    @route("GET", "/api/ps")
    async def ps(request: Request):
        registry = request.app.state.registry
        out = []
        for mid, m in list(registry.loaded.items()):
            tag = await asyncio.to_thread(_tag, registry, mid)
            keep = registry.keep_alive_of(mid)
            expires = (datetime.now(timezone.utc) + timedelta(seconds=max(0.0, keep - m.idle_s))
                       if keep >= 0 else datetime(9999, 1, 1, tzinfo=timezone.utc))
            out.append({**tag, "expires_at": expires.isoformat().replace("+00:00", "Z"),
                        "size_vram": 0, "context_length": m.ctx})
        return {"models": out}

    @route("POST", "/api/show")
    async def show(request: Request):
        body = await _body(request)
        registry = request.app.state.registry
        mid = _resolve(registry, _model_name(body))
        summary, size, modified = await asyncio.to_thread(_summary, registry, mid)
        arch = summary.get("architecture") or "llama"
        info = {"general.architecture": arch, "general.parameter_count": summary.get("n_params"),
                f"{arch}.context_length": summary.get("context_length"),
                f"{arch}.embedding_length": summary.get("hidden_size"),
                f"{arch}.block_count": summary.get("num_hidden_layers"),
                f"{arch}.attention.head_count": summary.get("num_attention_heads"),
                f"{arch}.attention.head_count_kv": summary.get("num_key_value_heads"),
                f"{arch}.vocab_size": summary.get("vocab_size"),
                f"{arch}.rope.freq_base": summary.get("rope_theta")}
        template = summary.get("chat_template") or ""
        return {"modelfile": f"# served by homellm\nFROM {mid}\n", "parameters": "",
                "template": template, "details": _details(summary),
                "model_info": {k: v for k, v in info.items() if v is not None},
                "capabilities": ["completion", "tools", "embedding"], "modified_at": modified,
                "license": summary.get("license") or ""}

    def apply_keep_alive(registry, mid: str, body: dict) -> float | None:
        keep = parse_keep_alive(body.get("keep_alive"))
        if keep is not None:
            registry.keep_alive[mid] = keep
        return keep

    async def load_only(request: Request, body: dict, key: str):
        """An empty prompt / message list: load the model (keep_alive 0: unload it)."""
        registry = request.app.state.registry
        mid = _resolve(registry, _model_name(body))
        keep = apply_keep_alive(registry, mid, body)
        done = {"model": mid, "created_at": now_iso(), key: {"role": "assistant", "content": ""}
                if key == "message" else "", "done": True}
        if keep == 0:
            await asyncio.to_thread(registry.unload, mid)
            return {**done, "done_reason": "unload"}
        model = await registry.acquire(mid)
        registry.release(model)
        return {**done, "done_reason": "load"}

    async def run(request: Request, body: dict, stream, key: str, t0: float, load_s: float):
        """The reply of a started stream, as Ollama's JSON or NDJSON lines."""
        mid = stream.model.id
        parse = stream.tool_format

        def piece(text: str, calls=()) -> dict:
            if key == "message":
                message = {"role": "assistant", "content": text}
                if calls:
                    message["tool_calls"] = _ollama_calls(calls)
                return {"model": mid, "created_at": now_iso(), "message": message, "done": False}
            return {"model": mid, "created_at": now_iso(), "response": text, "done": False}

        if body.get("stream", True) is False:
            from homellm.serve.openai_routes import collect_unless_disconnected, log_speed
            [(text, _)] = await collect_unless_disconnected(request, [stream])
            log_speed(request.url.path, [stream])
            calls = []
            if parse:
                from homellm.serve.tools import parse_calls
                content, calls = parse_calls(parse, text)
                text = content or ""
            out = {**piece(text, calls), "done": True, **_stats(stream, t0, load_s)}
            return JSONResponse(out)

        async def lines():
            from homellm.serve.openai_routes import log_speed
            from homellm.serve.tools import ToolCallStream
            parser = ToolCallStream(parse) if parse else None
            try:
                async for d in stream:
                    text, calls = parser.feed(d.text) if parser else (d.text, [])
                    if text or calls:
                        yield _line(piece(text, calls))
                if parser:
                    text, calls = parser.finish()
                    if text or calls:
                        yield _line(piece(text, calls))
                yield _line({**piece(""), "done": True, **_stats(stream, t0, load_s)})
            except APIError as e:
                yield _line({"error": e.message})
            finally:
                stream.cancel()
                log_speed(request.url.path, [stream])
        return ndjson(lines())

    async def loaded_in(registry, mid: str) -> float:
        """Seconds spent loading the model for this request (0 when it was loaded)."""
        if mid in registry.loaded:
            return 0.0
        t = time.perf_counter()
        model = await registry.acquire(mid)
        registry.release(model)
        return time.perf_counter() - t

    @route("POST", "/api/chat")
    async def chat(request: Request):
        t0 = time.perf_counter()
        body = await _body(request)
        registry = request.app.state.registry
        if not body.get("messages"):
            return await load_only(request, body, "message")
        mid = _resolve(registry, _model_name(body))
        settings = settings_from_options(body.get("options"), body.get("format"))
        messages = chat_messages_from(body["messages"])
        plan = None
        if body.get("tools"):
            from homellm.serve.tools import parse_tools
            try:
                plan = parse_tools(body["tools"], "auto")
            except APIError as e:
                raise _bad(e.message) from None
        apply_keep_alive(registry, mid, body)
        load_s = await loaded_in(registry, mid)
        stream = await start_chat(registry, mid, messages, settings, tools=plan)
        return await run(request, body, stream, "message", t0, load_s)

    @route("POST", "/api/generate")
    async def generate(request: Request):
        t0 = time.perf_counter()
        body = await _body(request)
        registry = request.app.state.registry
        prompt = body.get("prompt") or ""
        if not isinstance(prompt, str):
            raise _bad("prompt: expected a string")
        if body.get("images"):
            raise _bad("images: this server's models read text only")
        if body.get("suffix"):
            raise _bad("suffix: fill-in-the-middle is not supported on /api/generate; use "
                       "/v1/completions with suffix")
        if not prompt:
            return await load_only(request, body, "response")
        mid = _resolve(registry, _model_name(body))
        settings = settings_from_options(body.get("options"), body.get("format"))
        apply_keep_alive(registry, mid, body)
        load_s = await loaded_in(registry, mid)
        if body.get("raw"):
            stream = await start_completion(registry, mid, prompt, settings)
        else:
            system = body.get("system")
            messages = ([{"role": "system", "content": system}] if isinstance(system, str) and system
                        else []) + [{"role": "user", "content": prompt}]
            stream = await start_chat(registry, mid, messages, settings)
        return await run(request, body, stream, "response", t0, load_s)

    @route("POST", "/api/embed")
    async def embed(request: Request):
        from homellm.serve.embeddings import embed as embed_texts
        t0 = time.perf_counter()
        body = await _body(request)
        registry = request.app.state.registry
        mid = _resolve(registry, _model_name(body))
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs or not all(isinstance(x, str) for x in inputs):
            raise _bad("input: expected a string or a list of strings")
        truncate = body.get("truncate", True) is not False
        apply_keep_alive(registry, mid, body)
        load_s = await loaded_in(registry, mid)
        mid, vectors, n = await embed_texts(registry, mid, inputs, "input", truncate=truncate)
        dims = body.get("dimensions")
        if dims is not None and dims != len(vectors[0]):
            raise _bad(f"dimensions: this model's embeddings have {len(vectors[0])} dimensions")
        return {"model": mid, "embeddings": [v.tolist() for v in vectors],
                "total_duration": _ns(time.perf_counter() - t0), "load_duration": _ns(load_s),
                "prompt_eval_count": n}

    @route("POST", "/api/embeddings")
    async def embeddings(request: Request):
        from homellm.serve.embeddings import embed as embed_texts
        body = await _body(request)
        registry = request.app.state.registry
        mid = _resolve(registry, _model_name(body))
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise _bad("prompt: expected a non-empty string")
        apply_keep_alive(registry, mid, body)
        _, vectors, _ = await embed_texts(registry, mid, [prompt], "prompt", normalize=False)
        return {"embedding": vectors[0].tolist()}

    @route("POST", "/api/pull")
    async def pull(request: Request):
        body = await _body(request)
        registry = request.app.state.registry
        name = _model_name(body)
        from homellm import catalog
        from homellm.catalog.library import ALIASES, KNOWN
        from homellm.errors import HomellmError
        plain = name.removesuffix(":latest")
        if not (plain in KNOWN or plain in ALIASES or name.startswith("hf:")):
            raise OllamaError(404, f"pull model manifest: file does not exist: homellm pulls "
                              f"{', '.join(sorted(set(KNOWN) | set(ALIASES)))} or hf:owner/repo "
                              f"here, got '{name}' (use `homellm pull FILE` for a local file)")
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def progress(n, total):
            loop.call_soon_threadsafe(queue.put_nowait, ("progress", n, total))

        def work():
            try:
                entry = catalog.pull(plain, progress=progress)
                registry.sources.setdefault(entry.name, entry.name)
                if plain != entry.name:
                    registry.aliases.setdefault(plain, entry.name)
                loop.call_soon_threadsafe(queue.put_nowait, ("done", entry, None))
            except HomellmError as e:
                loop.call_soon_threadsafe(queue.put_nowait, ("error", str(e), None))

        task = asyncio.create_task(asyncio.to_thread(work))

        async def events():
            yield {"status": "pulling manifest"}
            while True:
                kind, a, b = await queue.get()
                if kind == "progress":
                    yield {"status": f"pulling {plain}", "digest": plain, "total": b or a,
                           "completed": a}
                elif kind == "error":
                    yield {"error": a}
                    return
                else:
                    yield {"status": "verifying sha256 digest"}
                    yield {"status": "writing manifest"}
                    yield {"status": "success"}
                    return

        if body.get("stream", True) is False:
            last = {}
            async for e in events():
                last = e
            await task
            return JSONResponse(last, status_code=500 if "error" in last else 200)

        async def lines():
            async for e in events():
                yield _line(e)
            await task
        return ndjson(lines())

    @route("DELETE", "/api/delete")
    async def delete(request: Request):
        body = await _body(request)
        registry = request.app.state.registry
        name = _model_name(body)
        from homellm import catalog
        from homellm.errors import HomellmError
        try:
            entry = await asyncio.to_thread(catalog.get, name.removesuffix(":latest")
                                            if name.endswith(":latest") else name)
        except HomellmError:
            raise OllamaError(404, f"model '{name}' not found") from None
        if entry.name in registry.loaded:
            await asyncio.to_thread(registry.unload, entry.name)
        try:
            await asyncio.to_thread(catalog.rm, entry.name)
        except HomellmError as e:
            raise OllamaError(500, str(e)) from None
        registry.sources.pop(entry.name, None)
        for alias in [a for a, t in registry.aliases.items() if t == entry.name]:
            registry.aliases.pop(alias)
        return JSONResponse({}, status_code=200)

    return router
