"""The Responses API: POST /v1/responses (and GET / DELETE /v1/responses/{id}), over the chat path.

A request becomes a chat: `instructions` the system message, `input` (text, or items: messages
with text parts, `function_call` and `function_call_output`) the turns after the history of
`previous_response_id`; `tools` (flat: {"type": "function", "name", "parameters"}) and
`tool_choice` go to serve/tools.py, `text.format` to the response_format grammar. The reply
comes back as output items (a `message` with `output_text`, and a `function_call` per call).
Streams are server-sent events named by type (response.created, response.output_text.delta,
response.function_call_arguments.delta, ..., response.completed), as the official client reads
them. Responses with `store` (the default) are kept in memory, the most recent
STORED_RESPONSES of them (and at most STORED_CHARS of JSON), for `previous_response_id` and GET; instructions are
not carried over (as OpenAI does).
Reference: https://platform.openai.com/docs/api-reference/responses
"""
from __future__ import annotations

import json
import threading
import time
import uuid
from collections import OrderedDict

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from homellm.serve.completion import GenerationSettings, start_chat
from homellm.serve.errors import APIError, invalid
from homellm.serve.schemas import ResponsesRequest
from homellm.serve.tools import ToolCallStream, parse_calls, parse_tools

STORED_RESPONSES = 1000
STORED_CHARS = 64 << 20   # characters of JSON the stored responses may hold together


class ResponseStore:
    """The most recent stored responses, with the conversation each one ends (LRU, bounded in
    count and in size)."""

    def __init__(self, limit: int = STORED_RESPONSES, max_chars: int = STORED_CHARS):
        self.limit, self.max_chars = limit, max_chars
        self._items: OrderedDict[str, tuple[dict, list[dict], int]] = OrderedDict()
        self._chars = 0
        self._lock = threading.Lock()

    def put(self, response: dict, conversation: list[dict]):
        size = len(json.dumps(response, ensure_ascii=False)) + len(
            json.dumps(conversation, ensure_ascii=False))
        with self._lock:
            old = self._items.pop(response["id"], None)
            self._chars -= old[2] if old else 0
            self._items[response["id"]] = (response, conversation, size)
            self._chars += size
            while self._items and (len(self._items) > self.limit or self._chars > self.max_chars):
                self._chars -= self._items.popitem(last=False)[1][2]

    def get(self, rid: str) -> tuple[dict, list[dict]]:
        with self._lock:
            item = self._items.get(rid)
            if item is None:
                raise APIError(404, f"No response with id {rid!r} is stored on this server (it "
                               f"keeps the last {self.limit} responses made with store: true)",
                               param="previous_response_id", code="response_not_found")
            self._items.move_to_end(rid)
            return item[0], item[1]

    def delete(self, rid: str) -> bool:
        with self._lock:
            item = self._items.pop(rid, None)
            self._chars -= item[2] if item else 0
            return item is not None


def _text_of(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(where, "expected a string or a list of content parts")
    parts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text") \
                or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise invalid(f"{where}[{j}]", f"only text parts are supported, got {kind!r}",
                          "unsupported")
        parts.append(part["text"])
    return "".join(parts)


def input_messages(items, param: str = "input") -> list[dict]:
    """`input` (a string or items) as OpenAI chat messages."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict] = []
    for i, item in enumerate(items):
        where = f"{param}[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise invalid(f"{where}.role", f"expected user, system, developer or assistant, "
                              f"got {role!r}")
            out.append({"role": role, "content": _text_of(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            name, arguments = item.get("name"), item.get("arguments", "{}")
            if not isinstance(name, str) or not isinstance(arguments, str):
                raise invalid(where, "a function_call item needs 'name' and 'arguments' (a string)")
            call = {"id": str(item.get("call_id") or item.get("id") or ""), "type": "function",
                    "function": {"name": name, "arguments": arguments}}
            if out and out[-1]["role"] == "assistant" and "tool_calls" in out[-1]:
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(output, str):
                output = json.dumps(output, ensure_ascii=False)
            out.append({"role": "tool", "tool_call_id": str(item.get("call_id") or ""),
                        "content": output})
        elif kind == "reasoning":
            continue
        else:
            raise invalid(f"{where}.type", f"expected message, function_call or "
                          f"function_call_output, got {kind!r}", "unsupported")
    return out


def response_format_of(text) -> dict | None:
    """`text.format` -> a chat response_format."""
    if text is None:
        return None
    if not isinstance(text, dict):
        raise invalid("text", "expected an object such as {\"format\": {\"type\": \"text\"}}")
    fmt = text.get("format")
    if fmt is None or not isinstance(fmt, dict):
        return None
    kind = fmt.get("type")
    if kind in ("text", "json_object"):
        return {"type": kind}
    if kind == "json_schema":
        return {"type": "json_schema", "json_schema": {
            k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}}
    raise invalid("text.format.type", f"expected text, json_object or json_schema, got {kind!r}")


def _usage(result) -> dict:
    return {"input_tokens": result.prompt_tokens, "output_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
            "input_tokens_details": {"cached_tokens": result.cached_tokens},
            "output_tokens_details": {"reasoning_tokens": 0}}


def _message_item(text: str, status: str = "completed") -> dict:
    return {"type": "message", "id": f"msg_{uuid.uuid4().hex}", "status": status,
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def _call_item(call, status: str = "completed") -> dict:
    return {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call.id,
            "name": call.name, "arguments": call.arguments, "status": status}


def responses_router(auth) -> APIRouter:
    router = APIRouter()

    def store_of(request: Request) -> ResponseStore:
        state = request.app.state
        if getattr(state, "responses", None) is None:
            state.responses = ResponseStore()
        return state.responses

    @router.post("/v1/responses", dependencies=auth)
    async def create(body: ResponsesRequest, request: Request):
        registry = request.app.state.registry
        store = store_of(request)
        plan = parse_tools(body.tools, body.tool_choice, body.parallel_tool_calls, flat=True)
        history = store.get(body.previous_response_id)[1] if body.previous_response_id else []
        turns = history + input_messages(body.input)
        messages = ([{"role": "system", "content": body.instructions}] if body.instructions else []) + turns
        if not messages:
            raise invalid("input", "nothing to respond to: the input is empty")
        settings = GenerationSettings(max_tokens=body.max_output_tokens, seed=body.seed,
                                      response_format=response_format_of(body.text))
        if body.temperature is not None:
            settings.temperature = body.temperature
        if body.top_p is not None:
            settings.top_p = body.top_p
        stream = await start_chat(registry, body.model, messages, settings, tools=plan)
        base = {"id": f"resp_{uuid.uuid4().hex}", "object": "response",
                "created_at": int(time.time()), "status": "in_progress", "error": None,
                "incomplete_details": None, "instructions": body.instructions,
                "max_output_tokens": body.max_output_tokens, "model": stream.model.id,
                "output": [], "parallel_tool_calls": plan.parallel is not False if plan else True,
                "previous_response_id": body.previous_response_id,
                "reasoning": {"effort": None, "summary": None}, "store": body.store is not False,
                "temperature": settings.temperature, "text": body.text or {"format": {"type": "text"}},
                "tool_choice": body.tool_choice or "auto",
                "tools": body.tools or [], "top_p": settings.top_p, "truncation": "disabled",
                "usage": None, "user": body.user, "metadata": body.metadata or {}}

        def finish(output: list[dict]) -> dict:
            result = stream.result
            response = {**base, "output": output, "usage": _usage(result)}
            if result.finish_reason == "length":
                response["status"] = "incomplete"
                response["incomplete_details"] = {"reason": "max_output_tokens"}
            else:
                response["status"] = "completed"
            if body.store is not False:
                store.put(response, turns + _as_messages(output))
            return response

        if body.stream:
            return StreamingResponse(_events(stream, base, finish), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        from homellm.serve.openai_routes import collect_unless_disconnected, log_speed
        [(text, _)] = await collect_unless_disconnected(request, [stream])
        log_speed("responses", [stream])
        content, calls = (parse_calls(stream.tool_format, text) if stream.tool_format
                          else (text, []))
        output = ([_message_item(content)] if content else []) + [_call_item(c) for c in calls]
        return JSONResponse(finish(output))

    @router.get("/v1/responses/{rid}", dependencies=auth)
    async def retrieve(rid: str, request: Request):
        return store_of(request).get(rid)[0]

    @router.delete("/v1/responses/{rid}", dependencies=auth)
    async def delete(rid: str, request: Request):
        if not store_of(request).delete(rid):
            raise APIError(404, f"No response with id {rid!r} is stored on this server",
                           param="response_id", code="response_not_found")
        return {"id": rid, "object": "response.deleted", "deleted": True}

    return router


def _as_messages(output: list[dict]) -> list[dict]:
    """Output items as the chat messages that continue the conversation."""
    return input_messages(output, param="output")


async def _events(stream, base: dict, finish):
    seq = 0

    def event(kind: str, **data) -> str:
        nonlocal seq
        payload = {"type": kind, "sequence_number": seq, **data}
        seq += 1
        return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"

    parser = ToolCallStream(stream.tool_format) if stream.tool_format else None
    output: list[dict] = []
    message: dict | None = None
    texts: list[str] = []

    def open_message():
        nonlocal message
        message = _message_item("", "in_progress")
        output.append(message)
        yield event("response.output_item.added", output_index=len(output) - 1,
                    item={**message, "content": []})
        yield event("response.content_part.added", item_id=message["id"],
                    output_index=len(output) - 1, content_index=0,
                    part={"type": "output_text", "text": "", "annotations": []})

    def close_message():
        nonlocal message
        if message is None:
            return
        index = output.index(message)
        text = "".join(texts)
        message["content"][0]["text"], message["status"] = text, "completed"
        yield event("response.output_text.done", item_id=message["id"], output_index=index,
                    content_index=0, text=text)
        yield event("response.content_part.done", item_id=message["id"], output_index=index,
                    content_index=0, part=message["content"][0])
        yield event("response.output_item.done", output_index=index, item=message)
        message = None

    def emit(text: str, calls):
        if text:
            if message is None:
                yield from open_message()
            texts.append(text)
            yield event("response.output_text.delta", item_id=message["id"],
                        output_index=output.index(message), content_index=0, delta=text)
        for call in calls:
            yield from close_message()
            item = _call_item(call)
            output.append(item)
            index = len(output) - 1
            yield event("response.output_item.added", output_index=index,
                        item={**item, "arguments": "", "status": "in_progress"})
            yield event("response.function_call_arguments.delta", item_id=item["id"],
                        output_index=index, delta=call.arguments)
            yield event("response.function_call_arguments.done", item_id=item["id"],
                        output_index=index, arguments=call.arguments)
            yield event("response.output_item.done", output_index=index, item=item)

    try:
        yield event("response.created", response=base)
        yield event("response.in_progress", response=base)
        async for delta in stream:
            text, calls = parser.feed(delta.text) if parser else (delta.text, [])
            for e in emit(text, calls):
                yield e
        if parser:
            text, calls = parser.finish()
            for e in emit(text, calls):
                yield e
        for e in close_message():
            yield e
        yield event("response.completed", response=finish(output))
    except APIError as e:
        yield event("error", code=e.code, message=e.message, param=e.param)
    finally:
        stream.cancel()
        from homellm.serve.openai_routes import log_speed
        log_speed("responses", [stream])
