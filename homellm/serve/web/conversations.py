"""The web app's JSON API for conversations, messages, branches, ratings, search, export/import.

    GET    /api/conversations                 the list, newest first
    POST   /api/conversations                 {title, model, system_prompt, sampling} -> 201
    GET    /api/conversations/{id}            settings, the shown branch (turns), context use
    PATCH  /api/conversations/{id}            rename, change model / system prompt / sampling
    DELETE /api/conversations/{id}
    POST   /api/conversations/{id}/messages   {content, parent_id}: a user message (then generate)
    POST   /api/messages/{id}/edit            {content}: a new sibling of a user message
    POST   /api/messages/{id}/select          show the branch through it (the `< 2/3 >` arrows)
    PUT    /api/messages/{id}/rating          {value: 1 | -1 | 0, comment}
    GET    /api/search?q=words                full-text search over titles and messages
    GET    /api/conversations/{id}/export     one conversation as Open Assistant JSONL trees
    GET    /api/export[?shared=true]          all of mine; shared: the admin's opted-in feedback
    POST   /api/import                        such a JSONL file -> new ones (imports.py)

Another user's conversation or message is a 404, exactly like a missing one (the store sees
only the caller's rows). Nothing is overwritten: edits and regenerations add siblings.
"""
from __future__ import annotations

import asyncio
from dataclasses import asdict

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from homellm.errors import HomellmError
from homellm.serve.errors import APIError, invalid
from homellm.serve.web.context import Caller, caller, not_found, state_of

MAX_TEXT = 200_000          # characters of one message or system prompt (typed or imported)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Sampling(_Body):
    """Per-conversation generation settings (GenerationSettings' names; unset: its defaults)."""
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repeat_penalty: float | None = Field(default=None, gt=0, le=10)
    max_tokens: int | None = Field(default=None, ge=1, le=1 << 20)
    seed: int | None = Field(default=None, ge=0, lt=1 << 63)


class ConversationIn(_Body):
    title: str | None = Field(default=None, max_length=500)
    model: str | None = Field(default=None, max_length=500)
    system_prompt: str | None = Field(default=None, max_length=MAX_TEXT)
    sampling: Sampling | None = None


class MessageIn(_Body):
    content: str = Field(min_length=1, max_length=MAX_TEXT)
    parent_id: str | None = None


class EditIn(_Body):
    content: str = Field(min_length=1, max_length=MAX_TEXT)


class RatingIn(_Body):
    value: int = Field(ge=-1, le=1)
    comment: str | None = Field(default=None, max_length=10_000)


def conversation_json(c) -> dict:
    return {"id": c.id, "title": c.title, "model": c.model, "system_prompt": c.system_prompt,
            "sampling": c.sampling or {}, "current_leaf_id": c.current_leaf_id,
            "created_at": c.created_at, "updated_at": c.updated_at}


def message_json(m) -> dict:
    d = asdict(m)
    d.pop("n", None)
    return d


def rating_json(r) -> dict | None:
    return None if r is None else {"value": r.value, "comment": r.comment}


def context_use(request: Request, conv, turns) -> dict:
    """Tokens of the shown branch (its last reply's prompt + reply) against the model's context."""
    web = state_of(request)
    used = None
    for t in reversed(turns):
        m = t.message
        if m.role == "assistant" and m.prompt_tokens is not None:
            used = m.prompt_tokens + (m.completion_tokens or 0)
            break
    model = conv.model or default_model(request)
    ctx = web.ctx.get(model)
    if ctx is None:
        loaded = request.app.state.registry.loaded.get(model)
        ctx = loaded.ctx if loaded is not None else None
    return {"used": used, "ctx": ctx, "model": model}


def detail_json(request: Request, conv, turns) -> dict:
    return {"conversation": conversation_json(conv),
            "turns": [{"message": message_json(t.message), "sibling_ids": t.sibling_ids,
                       "index": t.index, "rating": rating_json(t.rating)} for t in turns],
            "context": context_use(request, conv, turns)}


def default_model(request: Request) -> str:
    return request.app.state.registry.ids()[0]


def check_model(request: Request, name: str) -> str:
    """The model id for a conversation setting (400 naming the served ones if unknown)."""
    try:
        return request.app.state.registry.resolve_id(name)
    except APIError as e:
        raise invalid("model", e.message, code="model_not_found") from None


def _settings(request: Request, body: ConversationIn) -> dict:
    out = {}
    for k in body.model_fields_set:
        v = getattr(body, k)
        if k == "model" and v is not None:
            v = check_model(request, v)
        if k == "sampling":
            v = body.sampling.model_dump(exclude_none=True) if body.sampling else None
        if k == "title":
            v = " ".join((v or "").split())
        out[k] = v
    return out


def _store_call(fn, *args, **kwargs):
    """A store call whose HomellmError (bad input) becomes a 400."""
    try:
        return fn(*args, **kwargs)
    except HomellmError as e:
        raise invalid(None, str(e)) from None


def conversations_router() -> APIRouter:
    router = APIRouter(prefix="/api")

    def _conv(request: Request, who: Caller, cid: str):
        conv = state_of(request).store.get_conversation(who.user, cid)
        if conv is None:
            raise not_found(f"conversation {cid}")
        return conv

    def _detail(request: Request, who: Caller, cid: str):
        store = state_of(request).store
        conv = _conv(request, who, cid)
        return detail_json(request, conv, store.branch(who.user, cid))

    @router.get("/models")
    async def models(request: Request, who: Caller = Depends(caller)):
        registry, web = request.app.state.registry, state_of(request)
        out = []
        for mid in registry.ids():
            loaded = registry.loaded.get(mid)
            out.append({"id": mid, "ctx": loaded.ctx if loaded else web.ctx.get(mid)})
        return {"models": out, "default": registry.ids()[0]}

    @router.get("/conversations")
    async def list_conversations(request: Request, who: Caller = Depends(caller),
                                 limit: int = Query(200, ge=1, le=1000),
                                 offset: int = Query(0, ge=0)):
        convs = state_of(request).store.list_conversations(who.user, limit=limit, offset=offset)
        return {"conversations": [conversation_json(c) for c in convs]}

    @router.post("/conversations", status_code=201)
    async def create(body: ConversationIn, request: Request, who: Caller = Depends(caller)):
        settings = _settings(request, body)
        settings.setdefault("model", default_model(request))
        conv = state_of(request).store.create_conversation(who.user, **settings)
        return detail_json(request, conv, [])

    @router.get("/conversations/{cid}")
    async def get(cid: str, request: Request, who: Caller = Depends(caller)):
        return _detail(request, who, cid)

    @router.patch("/conversations/{cid}")
    async def update(cid: str, body: ConversationIn, request: Request,
                     who: Caller = Depends(caller)):
        settings = _settings(request, body)
        conv = _store_call(state_of(request).store.update_conversation, who.user, cid,
                           **settings)
        if conv is None:
            raise not_found(f"conversation {cid}")
        return _detail(request, who, cid)

    @router.delete("/conversations/{cid}")
    async def delete(cid: str, request: Request, who: Caller = Depends(caller)):
        if not state_of(request).store.delete_conversation(who.user, cid):
            raise not_found(f"conversation {cid}")
        # its keys and values (replies.py's cache key), in memory and on disk
        await asyncio.to_thread(request.app.state.registry.forget_cache, f"conversation:{cid}")
        return {"deleted": cid}

    @router.post("/conversations/{cid}/messages", status_code=201)
    async def add_message(cid: str, body: MessageIn, request: Request,
                          who: Caller = Depends(caller)):
        store = state_of(request).store
        conv = _conv(request, who, cid)
        parent = body.parent_id if "parent_id" in body.model_fields_set else conv.current_leaf_id
        m = _store_call(store.add_message, who.user, cid, "user", body.content, parent_id=parent)
        if m is None:
            raise not_found(f"conversation {cid}")
        if not conv.title:
            store.update_conversation(who.user, cid, title=" ".join(body.content.split())[:80])
        return {"message": message_json(m), **_detail(request, who, cid)}

    @router.post("/messages/{mid}/edit", status_code=201)
    async def edit(mid: str, body: EditIn, request: Request, who: Caller = Depends(caller)):
        store = state_of(request).store
        m = store.get_message(who.user, mid)
        if m is None:
            raise not_found(f"message {mid}")
        if m.role != "user":
            raise invalid("message", "only user messages can be edited (regenerate a reply)")
        new = _store_call(store.edit_message, who.user, mid, body.content)
        return {"message": message_json(new), **_detail(request, who, m.conversation_id)}

    @router.post("/messages/{mid}/select")
    async def select(mid: str, request: Request, who: Caller = Depends(caller)):
        store = state_of(request).store
        m = store.get_message(who.user, mid)
        if m is None:
            raise not_found(f"message {mid}")
        store.select(who.user, mid)
        return _detail(request, who, m.conversation_id)

    @router.put("/messages/{mid}/rating")
    async def rate(mid: str, body: RatingIn, request: Request, who: Caller = Depends(caller)):
        store = state_of(request).store
        if store.get_message(who.user, mid) is None:
            raise not_found(f"message {mid}")
        r = _store_call(store.rate, who.user, mid, body.value, body.comment)
        return {"message_id": mid, "rating": rating_json(r)}

    @router.get("/search")
    async def search(request: Request, q: str = Query(max_length=500),
                     who: Caller = Depends(caller)):
        hits = state_of(request).store.search(who.user, q, limit=50)
        return {"query": q, "hits": [asdict(h) for h in hits]}

    def _jsonl(trees, filename: str) -> Response:
        from homellm.data.oasst import dumps_trees
        return Response(dumps_trees(trees), media_type="application/x-ndjson",
                        headers={"Content-Disposition": f'attachment; filename="{filename}"'})

    @router.get("/conversations/{cid}/export")
    async def export_one(cid: str, request: Request, who: Caller = Depends(caller)):
        from homellm.data.oasst import export_trees
        _conv(request, who, cid)
        trees = export_trees(state_of(request).store, who.user, [cid])
        return _jsonl(trees, f"homellm-{cid[:8]}.trees.jsonl")

    @router.get("/export")
    async def export_all(request: Request, shared: bool = False, who: Caller = Depends(caller)):
        from homellm.data.oasst import export_trees
        if shared and not who.user.is_admin:
            raise APIError(403, "only an admin can export everyone's shared feedback",
                           type="permission_error", code="not_admin")
        trees = export_trees(state_of(request).store, who.user, shared=shared)
        return _jsonl(trees, "homellm-shared-feedback.trees.jsonl" if shared else
                      "homellm-conversations.trees.jsonl")

    return router
