"""Streaming an assistant reply into a conversation, watching it, and stopping it.

    POST /api/conversations/{id}/generate  {parent_id} -> text/event-stream
                                           {continue_id}: more of a reply cut by max tokens
    GET  /api/replies/{id}/events          a reply still running (after a reload, from another
                                           chat, another tab): its text so far, then the rest
    POST /api/replies/{id}/stop            -> the reply ends, keeping its text

`parent_id` is the user message to answer (default: the current leaf); answering one that
already has a reply is "regenerate": a new sibling, nothing overwritten. The model, system
prompt and sampling come from the conversation (sampler defaults: `homellm chat`'s,
SamplingParams). Refusals (unknown model, a last message longer than the context, a full
queue) come back as a JSON error before any reply is stored.

Events (Server-Sent Events, one JSON object each):
    event: start   {"message": the reply (empty, incomplete; or its text so far), "sibling_ids",
                    "context": {"first_sent", "left_out"} when older turns were left out}
    event: delta   {"text": "..."}
    event: done    {"message": the saved reply, "context": {"used", "ctx", "model"}}
    event: error   {"error": {...}}    (generation failed after it started)

The reply runs on the server, not in the request: a client that goes away leaves it running
to its end, and GET /api/replies/{id}/events shows it again. Every piece of text is saved in
the store before any client is sent it (pieces arriving within FLUSH_S go out together), so a
server killed mid-reply has stored every word a page showed. Stopped (the stop route, or the
server shutting down: WebState.stop_all) it keeps what was streamed, with finish_reason
"stopped" and `incomplete` set, so training exports leave it out.

A conversation longer than the model's context (less the room kept for the reply: its
max_tokens, at most a quarter of the context, else RESERVE) is sent without its oldest turns;
the reply's meta says so ({"context": {"first_sent": message id, "left_out": n}}) and the page
marks where the model's view began. Only a last message that alone cannot fit is refused.
"""
from __future__ import annotations

import asyncio
import json
import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict

from homellm.serve.errors import APIError, invalid
from homellm.serve.web.context import Caller, caller, not_found, state_of
from homellm.serve.web.conversations import context_use, default_model, message_json

FLUSH_S = 0.05      # text gathered this long is saved once, then sent
RESERVE = 512       # tokens kept free for a reply without max_tokens (at most ctx / 4)


class GenerateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    parent_id: str | None = None
    continue_id: str | None = None


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def sampler_defaults() -> dict:
    """What an unset sampling field means in the web app: `homellm chat`'s defaults."""
    from homellm.engine.sampling import SamplingParams
    d = SamplingParams()
    return {"temperature": d.temperature, "top_p": d.top_p, "top_k": d.top_k,
            "min_p": d.min_p, "repeat_penalty": d.repeat_penalty}


def generation_settings(sampling: dict | None):
    from homellm.serve.completion import GenerationSettings
    s = {**sampler_defaults(), **(sampling or {})}
    return GenerationSettings(**{k: v for k, v in s.items()
                                 if k in GenerationSettings.__dataclass_fields__})


class LiveReply:
    """A running reply: the text sent so far (all of it saved) and its watchers' queues."""

    def __init__(self, message, sibling_ids: list[str], context: dict | None):
        self.message, self.sibling_ids, self.context = message, sibling_ids, context
        self.parts: list[str] = [message.content] if message.content else []
        self.queues: set[asyncio.Queue] = set()

    def start_event(self) -> str:
        m = {**message_json(self.message), "content": "".join(self.parts)}
        out = {"message": m, "sibling_ids": self.sibling_ids}
        if self.context:
            out["context"] = self.context
        return _sse("start", out)

    def watch(self) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue()
        self.queues.add(q)
        return q

    def publish(self, event: str, data: dict):
        if event == "delta":
            self.parts.append(data["text"])
        for q in self.queues:
            q.put_nowait((event, data))


async def _watch(live: LiveReply, queue: asyncio.Queue):
    """One client's view of a live reply (it going away leaves the reply running)."""
    try:
        yield live.start_event()
        while True:
            event, data = await queue.get()
            yield _sse(event, data)
            if event in ("done", "error"):
                return
    finally:
        live.queues.discard(queue)


def _stream(live: LiveReply, queue: asyncio.Queue) -> StreamingResponse:
    return StreamingResponse(_watch(live, queue), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _fit(model, system: list[dict], turns: list[dict], max_tokens: int | None
         ) -> tuple[int, int] | None:
    """(index of the first turn to send, prompt tokens) so that the prompt leaves room for the
    reply; None when even the last turn alone leaves none (then everything goes, and the
    engine's overflow error says how much too long it is). In a worker thread."""
    tk = model.tokenizer
    room = model.ctx - min(max_tokens or RESERVE, RESERVE, model.ctx // 4)

    def size(k: int) -> int:
        text = tk.render_chat(system + turns[k:], add_generation_prompt=True)
        return len(tk.encode(text, add_special_tokens=False))

    try:
        full = size(0)
        if full <= room:
            return 0, full
        starts = [i for i, t in enumerate(turns) if t["role"] == "user" and i > 0]
        # a text of B bytes has at least B / max_token_bytes tokens: skip what cannot fit
        tail, lo = 0, 0
        for j in range(len(starts) - 1, -1, -1):
            tail = sum(len(t["content"].encode()) for t in turns[starts[j]:])
            if tail // tk.max_token_bytes > room:
                lo = j + 1
                break
        hi = len(starts) - 1
        if lo > hi or size(starts[hi]) > model.ctx - 1:
            return None
        while lo < hi:  # the fewest turns left out
            mid = (lo + hi) // 2
            if size(starts[mid]) <= room:
                hi = mid
            else:
                lo = mid + 1
        return starts[lo], size(starts[lo])
    except Exception:  # a template that refuses the turns: start_chat says so
        return None


def _loaded_id(registry, mid: str) -> str:
    """The id of the model that loads for `mid` (an adapter's base)."""
    return getattr(registry, "adapters", {}).get(mid, (mid,))[0]


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
        body = body or GenerateIn()
        going_on = None
        if body.continue_id:
            going_on = store.get_message(who.user, body.continue_id)
            if going_on is None or going_on.conversation_id != cid:
                raise invalid("continue_id", f"no message {body.continue_id} in conversation {cid}")
            if going_on.role != "assistant":
                raise invalid("continue_id", "only a reply can be continued")
            if going_on.id in web.live:
                raise invalid("continue_id", "that reply is still running")
            parent_id = going_on.parent_id
        else:
            parent_id = body.parent_id or conv.current_leaf_id
        parent = store.get_message(who.user, parent_id) if parent_id else None
        if parent is None or parent.conversation_id != cid:
            raise invalid("parent_id", f"no message {parent_id} in conversation {cid}"
                          if parent_id else "the conversation has no message to answer")
        if parent.role != "user":
            raise invalid("parent_id", "a reply answers a user message; to regenerate, give "
                          "the parent of the reply")
        system = ([{"role": "system", "content": conv.system_prompt}]
                  if conv.system_prompt else [])
        path = store.path(who.user, parent.id)
        turns = [{"role": m.role, "content": m.content} for m in path]
        model_name = conv.model or default_model(request, who)
        settings = generation_settings(conv.sampling)
        settings.prompt_cache_key = f"conversation:{cid}"  # its keys and values outlive memory
        settings.logprobs = False  # (the page shows none)
        try:
            mid = registry.resolve_id(model_name)
        except APIError:
            mid = None  # acquire() says so
        cold = mid is not None and _loaded_id(registry, mid) not in registry.loaded
        if cold:  # the page shows "loading model…" (GET /api/models) until it is in
            web.loading.setdefault(mid, time.monotonic())
        try:
            model = await registry.acquire(model_name)  # APIError (unknown, no memory): JSON
        finally:
            if cold:
                web.loading.pop(mid, None)
        try:
            if cold:
                web.load_s[model.id] = (getattr(model, "base", None) or model).load_s
            web.ctx[model.id] = model.ctx
            fit = await asyncio.to_thread(_fit, model, system, turns, settings.max_tokens)
        finally:
            registry.release(model)
        first, context = 0, None
        if fit is not None and fit[0] > 0:
            first = fit[0]
            context = {"first_sent": path[first].id, "left_out": first}
        stream = await start_chat(registry, model_name, system + turns[first:], settings,
                                  prefill=going_on.content if going_on else "")  # APIError: JSON
        web.ctx[stream.model.id] = stream.model.ctx
        sampling = {k: v for k, v in (conv.sampling or {}).items() if k != "seed"}
        never = 1 << 62  # this route saves before it sends (FLUSH_S), not on the writer's own
        if going_on is not None:
            writer = store.continue_reply(who.user, going_on.id, flush_tokens=never,
                                          flush_s=float("inf"))
            before = going_on.completion_tokens or 0
        else:
            writer = store.start_reply(who.user, cid, parent.id, model=stream.model.id,
                                       sampling=sampling, seed=stream.seed,
                                       flush_tokens=never, flush_s=float("inf"))
            before = 0
        if writer is None:  # deleted meanwhile
            stream.cancel()
            raise not_found(f"conversation {cid}")
        if context is not None:
            store.db.run("UPDATE messages SET meta = ? WHERE id = ?",
                         (json.dumps({**(writer.message.meta or {}), "context": context},
                                     sort_keys=True), writer.id))
            writer.message.meta = {**(writer.message.meta or {}), "context": context}
        stop = asyncio.Event()
        web.running[writer.id] = stop
        live = LiveReply(writer.message, [m.id for m in store.siblings(who.user, writer.id)],
                         context)
        web.live[writer.id] = live
        queue = live.watch()
        asyncio.get_running_loop().create_task(
            _run(request, who, cid, conv, stream, writer, live, stop, before))
        return _stream(live, queue)

    @router.get("/replies/{mid}/events")
    async def events(mid: str, request: Request, who: Caller = Depends(caller)):
        web = state_of(request)
        m = web.store.get_message(who.user, mid)
        if m is None:
            raise not_found(f"message {mid}")
        live = web.live.get(mid)
        if live is None:
            raise APIError(409, "that reply is not running (GET its conversation for its text)",
                           code="not_running")
        return _stream(live, live.watch())

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


async def _run(request: Request, who: Caller, cid: str, conv, stream, writer, live: LiveReply,
               stop: asyncio.Event, before: int):
    """Generate the reply to its end (or a stop), saving each piece before it is published."""
    web = state_of(request)
    store = web.store
    tokens, pending, sent_at = 0, [], 0.0
    stop_wait = asyncio.ensure_future(stop.wait())
    nxt = None

    def send():
        nonlocal pending, sent_at
        if pending:
            writer.flush()          # saved first: a page never shows what the store lacks
            live.publish("delta", {"text": "".join(pending)})
            pending = []
        sent_at = time.monotonic()

    try:
        stopped = False
        while True:
            if nxt is None:
                nxt = asyncio.ensure_future(stream.__anext__())
            wait = None if not pending else max(0.0, sent_at + FLUSH_S - time.monotonic())
            done, _ = await asyncio.wait({nxt, stop_wait}, timeout=wait,
                                         return_when=asyncio.FIRST_COMPLETED)
            if nxt in done:
                try:
                    delta = nxt.result()
                except StopAsyncIteration:
                    break
                nxt = None
                tokens += len(delta.tokens)
                if delta.text:
                    writer.append(delta.text)
                    pending.append(delta.text)
            elif stop_wait in done:
                nxt.cancel()
                stream.cancel()
                stopped = True
                break
            if pending and time.monotonic() - sent_at >= FLUSH_S:
                send()
        r = stream.result
        if stopped or r is None:
            final = writer.finish(finish_reason="stopped", incomplete=True,
                                  prompt_tokens=stream.prompt_tokens,
                                  completion_tokens=before + tokens)
        else:
            final = writer.finish(finish_reason=r.finish_reason,
                                  prompt_tokens=r.prompt_tokens,
                                  completion_tokens=before + r.completion_tokens,
                                  timings=r.timings())
        if pending:  # saved by finish()
            live.publish("delta", {"text": "".join(pending)})
            pending = []
        conv_now = store.get_conversation(who.user, cid) or conv
        live.publish("done", {"message": message_json(final),
                              "context": context_use(request, conv_now,
                                                     store.branch(who.user, cid))})
    except APIError as e:
        writer.finish(finish_reason="error", incomplete=True,
                      prompt_tokens=stream.prompt_tokens, completion_tokens=before + tokens)
        if pending:
            live.publish("delta", {"text": "".join(pending)})
        live.publish("error", e.body())
    finally:
        stop_wait.cancel()
        web.running.pop(writer.id, None)
        web.live.pop(writer.id, None)
        if not writer.finished:  # cancelled (the process is ending): keep the text, mark it
            stream.cancel()
            writer.finish(finish_reason="stopped", incomplete=True,
                          prompt_tokens=stream.prompt_tokens, completion_tokens=before + tokens)
            live.publish("done", {"message": message_json(writer.message), "context": None})
