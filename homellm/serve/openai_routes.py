"""The OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models, /health.

Responses follow the OpenAI API reference (chat.completion, chat.completion.chunk,
text_completion); streams are server-sent events ending with `data: [DONE]`, with a usage
chunk when `stream_options.include_usage` is set. `timings` (speeds, as llama.cpp's server
reports them) is an extra field next to `usage`. A client that disconnects cancels its
request in the engine at once (streaming: Starlette cancels the response task;
non-streaming: the handler polls the connection).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from homellm.serve.completion import (CompletionStream, GenerationSettings, TokenLogprob,
                                      echo_prompt, start_chat, start_completion)
from homellm.serve.errors import APIError, invalid
from homellm.serve.guard import bearer_ok
from homellm.serve.registry import ModelRegistry
from homellm.serve.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from homellm.serve.tools import ToolCallStream, parse_calls, parse_tools

FINGERPRINT = "homellm"
MAX_PROMPTS = 64    # prompts in one /v1/completions request
log = logging.getLogger("homellm.serve")


def log_speed(path: str, streams: list[CompletionStream]):
    """One line per finished request: its model, tokens and speeds (the CLI shows it)."""
    for s in streams:
        r = s.result
        if r is None:  # cancelled (the client went away)
            log.info("%s %s: cancelled", path, s.model.id)
            continue
        log.info("%s %s: prompt %d tokens (%d cached), first token %.0f ms, reply %d tokens at "
                 "%.1f tok/s, %s", path, r.model, r.prompt_tokens, r.cached_tokens,
                 r.ttft_s * 1e3, r.completion_tokens, r.decode_tps, r.finish_reason)


def api_key_check(api_key: str | None):
    """A dependency: 401 unless `Authorization: Bearer <api_key>` (when a key is set)."""
    async def check(request: Request):
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        if not bearer_ok(header, api_key):  # the guard (guard.py) has checked already
            what = "missing" if not header else "incorrect"
            raise APIError(401, f"The API key is {what}: send the header "
                           "`Authorization: Bearer <key>` with the key the server was started with",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    return check


def settings_from(body: SamplingFields, *, max_tokens: int | None, top_logprobs: int,
                  response_format: dict | None) -> GenerationSettings:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    s = GenerationSettings(max_tokens=max_tokens, stop=stop, seed=body.seed,
                           top_logprobs=top_logprobs, response_format=response_format,
                           logit_bias=body.logit_bias or None,
                           # (API keys apart from the web app's conversation keys)
                           prompt_cache_key=f"api:{body.prompt_cache_key}" if body.prompt_cache_key else None,
                           # (chat: a bool; completions: None or how many alternatives)
                           logprobs=getattr(body, "logprobs", None) not in (None, False) or top_logprobs > 0)
    for name in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "frequency_penalty",
                 "presence_penalty"):
        value = getattr(body, name)
        if value is not None:
            setattr(s, name, value)
    return s


async def start_n(n: int, start) -> list[CompletionStream]:
    """n streams (seeds seed, seed+1, ...); if one is refused, the others are cancelled."""
    streams: list[CompletionStream] = []
    try:
        for i in range(n):
            streams.append(await start(i))
    except BaseException:
        for s in streams:
            s.cancel()
        raise
    return streams


def seeded(settings: GenerationSettings, i: int) -> GenerationSettings:
    if i == 0 or settings.seed is None:
        return settings
    from dataclasses import replace
    return replace(settings, seed=settings.seed + i)


async def merged(streams: list[CompletionStream]):
    """(index, Delta) from all streams as they come."""
    if len(streams) == 1:
        async for d in streams[0]:
            yield 0, d
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, s):
        try:
            async for d in s:
                await queue.put((i, d))
        except BaseException as e:
            await queue.put((i, e))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        open_ = len(streams)
        while open_:
            i, item = await queue.get()
            if item is None:
                open_ -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


async def collect_unless_disconnected(request: Request, streams: list[CompletionStream]):
    """Every stream's (text, tokens); cancels them all if the client goes away first."""
    task = asyncio.gather(*(s.collect() for s in streams))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():  # nobody will read the answer: stop now
                raise APIError(499, "the client closed the connection", code="client_closed")
    except BaseException:
        task.cancel()
        for s in streams:
            s.cancel()
        raise


def usage_of(streams: list[CompletionStream]) -> dict:
    results = [s.result for s in streams]
    prompt = results[0].prompt_tokens
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": results[0].cached_tokens}}


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def chat_logprobs(tokens: list[TokenLogprob]) -> dict:
    return {"content": [{"token": t.text, "logprob": t.logprob, "bytes": _bytes(t.text),
                         "top_logprobs": [{"token": s, "logprob": lp, "bytes": _bytes(s)}
                                          for _, s, lp in t.top]} for t in tokens],
            "refusal": None}


def completion_logprobs(tokens: list[TokenLogprob], offset: int) -> dict:
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t.text)
    return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{s: lp for _, s, lp in t.top} for t in tokens],
            "text_offset": offsets}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def streaming_response(chunks) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def openai_router(api_key: str | None = None) -> APIRouter:
    router = APIRouter()
    auth = [Depends(api_key_check(api_key))]

    @router.get("/health")
    async def health(request: Request):
        """{"status": "ok"}; the models and engine statistics too for a caller with the key
        (or when the server has none)."""
        if request.scope.get("state", {}).get("credential") not in ("open", "key"):
            return {"status": "ok"}
        registry: ModelRegistry = request.app.state.registry
        return {"status": "ok", "models": registry.describe()}

    @router.get("/v1/models", dependencies=auth)
    async def models(request: Request):
        registry: ModelRegistry = request.app.state.registry
        return {"object": "list", "data": [model_card(registry, mid) for mid in registry.ids()]}

    @router.get("/v1/models/{model_id:path}", dependencies=auth)
    async def model(model_id: str, request: Request):
        registry: ModelRegistry = request.app.state.registry
        return model_card(registry, registry.resolve_id(model_id))

    @router.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        registry: ModelRegistry = request.app.state.registry
        plan = parse_tools(body.tools, body.tool_choice, body.parallel_tool_calls)
        if body.top_logprobs and not body.logprobs:
            raise invalid("top_logprobs", "needs logprobs: true")
        settings = settings_from(body, max_tokens=body.max_completion_tokens or body.max_tokens,
                                 top_logprobs=body.top_logprobs or 0,
                                 response_format=body.response_format)
        messages = [m.model_dump() for m in body.messages]
        streams = await start_n(body.n or 1, lambda i: start_chat(
            registry, body.model, messages, seeded(settings, i), tools=plan))
        rid, created, mid = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), streams[0].model.id
        want_logprobs = bool(body.logprobs)
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return streaming_response(chat_chunks(streams, rid, created, mid, want_logprobs, usage))
        outputs = await collect_unless_disconnected(request, streams)
        log_speed("chat", streams)
        choices = [{"index": i, **chat_message(s, text),
                    "logprobs": chat_logprobs(tokens) if want_logprobs else None}
                   for i, (s, (text, tokens)) in enumerate(zip(streams, outputs))]
        return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": mid,
                             "system_fingerprint": FINGERPRINT, "choices": choices,
                             "usage": usage_of(streams), "timings": streams[0].result.timings(),
                             "seed": streams[0].result.seed})

    @router.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, request: Request):
        registry: ModelRegistry = request.app.state.registry
        prompts = body.prompt
        if isinstance(prompts, str) or not prompts or isinstance(prompts[0], int):
            prompts = [prompts]
        if len(prompts) > MAX_PROMPTS:
            raise invalid("prompt", f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}")
        if body.best_of not in (None, 1):
            raise invalid("best_of", "best_of > 1 is not supported; use n", "unsupported")
        max_tokens = body.max_tokens if body.max_tokens is not None else 16  # OpenAI's default
        if max_tokens == 0 and not body.echo:
            raise invalid("max_tokens", "0 generates nothing: use it with echo: true (the "
                          "prompt's logprobs), or ask for at least 1 token")
        settings = settings_from(body, max_tokens=max_tokens or None,
                                 top_logprobs=body.logprobs or 0,
                                 response_format=body.response_format)
        n = body.n or 1
        echoes = []
        if body.echo:
            for p in prompts:
                echoes += [await echo_prompt(registry, body.model, p, body.logprobs or 0,
                                             body.suffix)] * n
        streams = []
        if max_tokens:
            try:
                for p in prompts:
                    streams += await start_n(n, lambda i, p=p: start_completion(
                        registry, body.model, p, seeded(settings, i), body.suffix))
            except BaseException:
                for st in streams:
                    st.cancel()
                raise
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        mid = streams[0].model.id if streams else registry.resolve_id(body.model)
        want_logprobs = body.logprobs is not None
        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            return streaming_response(completion_chunks(streams, rid, created, mid, want_logprobs,
                                                        include, echoes, n))
        outputs = await collect_unless_disconnected(request, streams) if streams else []
        log_speed("completion", streams)
        choices = []
        for i in range(len(prompts) * n):
            echo_text, echo_tokens, _ = echoes[i] if echoes else ("", [], 0)
            text, tokens = outputs[i] if streams else ("", [])
            choices.append({"index": i, "text": echo_text + text,
                            "logprobs": completion_logprobs(echo_tokens + tokens, 0)
                            if want_logprobs else None,
                            "finish_reason": streams[i].result.finish_reason if streams else "length"})
        out = {"id": rid, "object": "text_completion", "created": created, "model": mid,
               "system_fingerprint": FINGERPRINT, "choices": choices,
               "usage": completion_usage(streams, echoes, n)}
        if streams:
            out.update(timings=streams[0].result.timings(), seed=streams[0].result.seed)
        return JSONResponse(out)

    return router


def chat_message(stream: CompletionStream, text: str) -> dict:
    """{"message", "finish_reason"} of one finished choice; tool calls parsed out of the text
    when the request offered tools (finish_reason "tool_calls" then)."""
    message = {"role": "assistant", "content": text, "refusal": None}
    reason = stream.result.finish_reason
    if stream.tool_format is not None:
        content, calls = parse_calls(stream.tool_format, text)
        if calls:
            message["content"] = content
            message["tool_calls"] = [c.openai() for c in calls]
            reason = "tool_calls" if reason == "stop" else reason
    return {"message": message, "finish_reason": reason}


def tool_call_deltas(calls, first_index: int) -> list[dict]:
    """OpenAI's streamed tool_calls: per call its id, type and name with empty arguments, then
    the arguments."""
    out = []
    for k, c in enumerate(calls):
        index = first_index + k
        out.append({"tool_calls": [{"index": index, "id": c.id, "type": "function",
                                    "function": {"name": c.name, "arguments": ""}}]})
        out.append({"tool_calls": [{"index": index, "function": {"arguments": c.arguments}}]})
    return out


def model_card(registry: ModelRegistry, mid: str) -> dict:
    loaded = registry.loaded.get(mid)
    card = {"id": mid, "object": "model", "created": loaded.created if loaded else 0,
            "owned_by": "homellm"}
    if loaded is not None:
        card["context_length"] = loaded.ctx
    return card


async def chat_chunks(streams, rid, created, mid, want_logprobs: bool, include_usage: bool):
    def chunk(choices, usage=None):
        out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": mid,
               "system_fingerprint": FINGERPRINT, "choices": choices}
        if include_usage:
            out["usage"] = usage
        return sse(out)

    parsers = [ToolCallStream(s.tool_format) if s.tool_format else None for s in streams]
    n_calls = [0] * len(streams)

    def pieces(i, text, calls, tokens):
        lp = chat_logprobs(tokens) if want_logprobs else None
        if text or not calls:
            yield chunk([{"index": i, "delta": {"content": text} if text else {},
                          "logprobs": lp, "finish_reason": None}])
            lp = None
        for delta in tool_call_deltas(calls, n_calls[i]):
            yield chunk([{"index": i, "delta": delta, "logprobs": lp, "finish_reason": None}])
            lp = None
        n_calls[i] += len(calls)

    try:
        for i in range(len(streams)):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                          "logprobs": None, "finish_reason": None}])
        async for i, d in merged(streams):
            text, calls = parsers[i].feed(d.text) if parsers[i] else (d.text, [])
            if text or calls or d.tokens or not parsers[i]:
                for piece in pieces(i, text, calls, d.tokens):
                    yield piece
        for i, s in enumerate(streams):
            reason = s.result.finish_reason
            if parsers[i]:
                text, calls = parsers[i].finish()
                if text or calls:
                    for piece in pieces(i, text, calls, []):
                        yield piece
                if n_calls[i] and reason == "stop":
                    reason = "tool_calls"
            yield chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": reason}])
        if include_usage:
            out = json.loads(chunk([], usage_of(streams))[len("data: "):])
            out["timings"] = streams[0].result.timings()
            yield sse(out)
        yield sse("[DONE]")
    except APIError as e:
        yield sse(e.body())
    finally:
        for s in streams:
            s.cancel()
        log_speed("chat", streams)


def completion_usage(streams: list[CompletionStream], echoes: list, n: int) -> dict:
    """Usage over every prompt (each counted once, not per choice) and every choice."""
    if streams:
        prompt = sum(s.result.prompt_tokens if s.result else s.prompt_tokens for s in streams[::n])
        cached = sum(s.result.cached_tokens for s in streams[::n] if s.result)
    else:
        prompt, cached = sum(e[2] for e in echoes[::n]), 0
    completion = sum(s.result.completion_tokens for s in streams if s.result)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion, "prompt_tokens_details": {"cached_tokens": cached}}


async def completion_chunks(streams, rid, created, mid, want_logprobs: bool, include_usage: bool,
                            echoes: list | None = None, n: int = 1):
    echoes = echoes or []
    count = max(len(streams), len(echoes))
    offsets = [0] * count

    def chunk(choices, usage=None):
        out = {"id": rid, "object": "text_completion", "created": created, "model": mid,
               "system_fingerprint": FINGERPRINT, "choices": choices}
        if include_usage:
            out["usage"] = usage
        return sse(out)

    try:
        for i, (text, tokens, _) in enumerate(echoes):
            lp = completion_logprobs(tokens, 0) if want_logprobs else None
            offsets[i] = len(text)
            yield chunk([{"index": i, "text": text, "logprobs": lp, "finish_reason": None}])
        if streams:
            async for i, d in merged(streams):
                lp = completion_logprobs(d.tokens, offsets[i]) if want_logprobs else None
                offsets[i] += len(d.text)
                yield chunk([{"index": i, "text": d.text, "logprobs": lp, "finish_reason": None}])
        for i in range(count):
            yield chunk([{"index": i, "text": "", "logprobs": None,
                          "finish_reason": streams[i].result.finish_reason if streams else "length"}])
        if include_usage:
            yield chunk([], completion_usage(streams, echoes, n))
        yield sse("[DONE]")
    except APIError as e:
        yield sse(e.body())
    finally:
        for s in streams:
            s.cancel()
        log_speed("completion", streams)

