"""Streaming an assistant reply into a conversation, and stopping it.

    POST /api/conversations/{id}/generate  {parent_id}  -> text/event-stream
    POST /api/replies/{id}/stop                          -> the reply ends, keeping its text

`parent_id` is the user message to answer (default: the current leaf); answering one that
already has a reply is "regenerate": a new sibling, nothing overwritten. The model, system
prompt and sampling come from the conversation. Refusals (unknown model, prompt longer than
the context, a full queue) come back as a JSON error before any reply is stored.

Events (Server-Sent Events, one JSON object each):
    event: start   {"message": the new reply (empty, incomplete), "turns": ...}
    event: delta   {"text": "..."}
    event: done    {"message": the saved reply, "context": {"used", "ctx", "model"}}
    event: error   {"error": {...}}    (generation failed after it started)

A reply is saved as it streams (store/streaming.py). Stopped (the stop route, or the client
going away) it keeps what was streamed, with finish_reason "stopped" and `incomplete` set,
so training exports leave it out.
"""
from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict

from homellm.serve.errors import APIError, invalid
from homellm.serve.web.context import Caller, caller, not_found, state_of
from homellm.serve.web.conversations import context_use, default_model, message_json


class GenerateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    parent_id: str | None = None


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def generation_settings(sampling: dict | None):
    from homellm.serve.completion import GenerationSettings
    s = dict(sampling or {})
    return GenerationSettings(**{k: v for k, v in s.items()
                                 if k in GenerationSettings.__dataclass_fields__})


def replies_router() -> APIRouter:
    router = APIRouter(prefix="/api")

    @router.post("/conversations/{cid}/generate")
    async def generate(cid: str, request: Request, body: GenerateIn | None = None,
                       who: Caller = Depends(caller)):
        from homellm.serve.completion import start_chat
        web = state_of(request)
        store, registry = web.store, request.app.state.registry
        conv = store.get_conversation(who.user, cid)
        if conv is None:
            raise not_found(f"conversation {cid}")
        parent_id = body.parent_id if body is not None and body.parent_id else \
            conv.current_leaf_id
        parent = store.get_message(who.user, parent_id) if parent_id else None
        if parent is None or parent.conversation_id != cid:
            raise invalid("parent_id", f"no message {parent_id} in conversation {cid}"
                          if parent_id else "the conversation has no message to answer")
        if parent.role != "user":
            raise invalid("parent_id", "a reply answers a user message; to regenerate, give "
                          "the parent of the reply")
        messages = ([{"role": "system", "content": conv.system_prompt}]
                    if conv.system_prompt else [])
        messages += [{"role": m.role, "content": m.content}
                     for m in store.path(who.user, parent.id)]
        model_name = conv.model or default_model(request)
        settings = generation_settings(conv.sampling)
        settings.prompt_cache_key = f"conversation:{cid}"  # its keys and values outlive memory
        stream = await start_chat(registry, model_name, messages, settings)  # APIError: JSON
        web.ctx[stream.model.id] = stream.model.ctx
        sampling = {k: v for k, v in (conv.sampling or {}).items() if k != "seed"}
        writer = store.start_reply(who.user, cid, parent.id, model=stream.model.id,
                                   sampling=sampling, seed=stream.seed)
        if writer is None:  # deleted meanwhile
            stream.cancel()
            raise not_found(f"conversation {cid}")
        stop = asyncio.Event()
        web.running[writer.id] = stop

        async def events():
            stopped, tokens = False, 0
            stop_wait = asyncio.ensure_future(stop.wait())
            try:
                start = writer.message
                yield _sse("start", {"message": message_json(start),
                                     "sibling_ids": [m.id for m in
                                                     store.siblings(who.user, start.id)]})
                while True:
                    nxt = asyncio.ensure_future(stream.__anext__())
                    done, _ = await asyncio.wait({nxt, stop_wait},
                                                 return_when=asyncio.FIRST_COMPLETED)
                    if nxt not in done:
                        nxt.cancel()
                        stream.cancel()
                        stopped = True
                        break
                    try:
                        delta = nxt.result()
                    except StopAsyncIteration:
                        break
                    tokens += len(delta.tokens)
                    if delta.text:
                        writer.append(delta.text)
                        yield _sse("delta", {"text": delta.text})
                r = stream.result
                if stopped or r is None:
                    final = writer.finish(finish_reason="stopped", incomplete=True,
                                          prompt_tokens=stream.prompt_tokens,
                                          completion_tokens=tokens)
                else:
                    final = writer.finish(finish_reason=r.finish_reason,
                                          prompt_tokens=r.prompt_tokens,
                                          completion_tokens=r.completion_tokens,
                                          timings=r.timings())
                conv_now = store.get_conversation(who.user, cid) or conv
                yield _sse("done", {"message": message_json(final),
                                    "context": context_use(request, conv_now,
                                                           store.branch(who.user, cid))})
            except APIError as e:
                writer.finish(finish_reason="error", incomplete=True,
                              prompt_tokens=stream.prompt_tokens, completion_tokens=tokens)
                yield _sse("error", e.body())
            finally:
                stop_wait.cancel()
                web.running.pop(writer.id, None)
                if not writer.finished:  # the client went away: keep the text, mark it
                    stream.cancel()
                    writer.finish(finish_reason="stopped", incomplete=True,
                                  prompt_tokens=stream.prompt_tokens, completion_tokens=tokens)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @router.post("/replies/{mid}/stop")
    async def stop(mid: str, request: Request, who: Caller = Depends(caller)):
        web = state_of(request)
        m = web.store.get_message(who.user, mid)
        if m is None:
            raise not_found(f"message {mid}")
        event = web.running.get(mid)
        if event is None:
            return {"stopped": False, "message": message_json(m)}
        event.set()
        return {"stopped": True, "message_id": mid}

    return router
