"""The web app's JSON API for conversations, messages, branches, ratings, search, export/import.

    GET    /api/conversations                 the list, newest first
    POST   /api/conversations                 {title, model, system_prompt, sampling} -> 201
    GET    /api/conversations/{id}            settings, the shown branch (turns), context use
    PATCH  /api/conversations/{id}            rename, change model / system prompt / sampling
    DELETE /api/conversations/{id}
    POST   /api/conversations/{id}/messages   {content, parent_id, role}: a user message (then
                                              generate), or a reply the user writes (role
                                              "assistant", under a user message)
    POST   /api/messages/{id}/edit            {content}: a new sibling of a message (of a reply:
                                              written by the user, `synthetic: false` in exports)
    POST   /api/messages/{id}/select          show the branch through it (the `< 2/3 >` arrows)
    PUT    /api/messages/{id}/rating          {value: 1 | -1 | 0, comment} (0 + a comment: a
                                              comment without a thumb)
    GET    /api/models                        served models (context, loaded, loading), the
                                              default for a new chat, the sampler's defaults
    GET    /api/search?q=words                full-text search over titles and messages
    (messages.py: delete a branch, "which is better?", per-user defaults)
    GET    /api/conversations/{id}/export     one conversation as Open Assistant JSONL trees
    GET    /api/export[?shared=true]          all of mine; shared: the admin's opted-in feedback
    POST   /api/import                        such a JSONL file -> new ones (imports.py)

Another user's conversation or message is a 404, exactly like a missing one (the store sees
only the caller's rows). Nothing is overwritten: edits and regenerations add siblings.
"""
from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Literal

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
    role: Literal["user", "assistant"] = "user"


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


EXACT_BYTES = 64 << 10   # a branch up to this size is counted with the tokenizer, else estimated
BYTES_PER_TOKEN = 4      # the estimate for a model not loaded yet (English text, BPE vocabularies)


def context_use(request: Request, conv, turns) -> dict:
    """Tokens of the shown branch (with the system prompt) against the model's context: counted
    with the loaded model's tokenizer, else from the last reply's prompt + reply, else (a model
    not loaded, an imported chat) estimated from the text's size (`estimate`: true).
    `left_out`: turns the last reply was sent without (replies.py)."""
    web = state_of(request)
    registry = request.app.state.registry
    model = conv.model or default_model(request)
    try:
        model = registry.resolve_id(model)
    except APIError:
        pass
    ctx = web.ctx.get(model)
    loaded = registry.loaded.get(getattr(registry, "adapters", {}).get(model, (model,))[0])
    if ctx is None and loaded is not None:
        ctx = loaded.ctx
    used, estimate, left_out = None, False, 0
    last = None  # the last reply with token counts
    for i in range(len(turns) - 1, -1, -1):
        if turns[i].message.role == "assistant" and turns[i].message.prompt_tokens is not None:
            last = i
            m = turns[i].message
            left_out = ((m.meta or {}).get("context") or {}).get("left_out", 0)
            break
    if last is not None and last == len(turns) - 1:  # its own counts: exact
        m = turns[last].message
        return {"used": m.prompt_tokens + (m.completion_tokens or 0), "ctx": ctx,
                "model": model, "estimate": False, "left_out": left_out}
    texts = ([conv.system_prompt] if conv.system_prompt else []) + \
        [t.message.content for t in turns]
    size = sum(len(x.encode()) for x in texts)
    if turns and loaded is not None and size <= EXACT_BYTES:
        messages = ([{"role": "system", "content": conv.system_prompt}]
                    if conv.system_prompt else [])
        messages += [{"role": t.message.role, "content": t.message.content} for t in turns]
        try:
            tk = loaded.tokenizer
            used = len(tk.encode(tk.render_chat(messages, add_generation_prompt=False),
                                 add_special_tokens=False))
        except Exception:  # a template that refuses these turns: an estimate below
            used = None
    if used is None and last is not None:  # the last reply's counts and the text after it
        m = turns[last].message
        later = sum(len(t.message.content.encode()) for t in turns[last + 1:])
        used = m.prompt_tokens + (m.completion_tokens or 0) + -(-later // BYTES_PER_TOKEN)
        estimate = True
    if used is None and turns:
        used, estimate = -(-size // BYTES_PER_TOKEN), True
    return {"used": used, "ctx": ctx, "model": model, "estimate": estimate,
            "left_out": left_out}


def detail_json(request: Request, conv, turns) -> dict:
    web = state_of(request)
    running = [t.message.id for t in turns if t.message.id in web.live]
    return {"conversation": conversation_json(conv),
            "turns": [{"message": message_json(t.message), "sibling_ids": t.sibling_ids,
                       "index": t.index, "rating": rating_json(t.rating)} for t in turns],
            "context": context_use(request, conv, turns), "running": running,
            "preferences": [list(p) for p in web.store.preferences(conv.user_id, conv.id)]}


def default_model(request: Request, who: Caller | None = None) -> str:
    """The model a new chat starts with: the user's own default, else the model of their last
    conversation, else the catalog's default model, else the first served one (each if it is
    served)."""
    from homellm.catalog.library import DEFAULT_NAME
    registry = request.app.state.registry
    store = state_of(request).store
    wanted = []
    if who is not None:
        wanted += [store.user_settings(who.user).get("model"), store.last_used_model(who.user)]
    for name in wanted + [DEFAULT_NAME]:
        if name:
            try:
                return registry.resolve_id(name)
            except APIError:
                pass
    return registry.ids()[0]


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
        """Each served model: its context, whether it is loaded, and while the page waits for
        one to load, `loading_s` (and `estimate_s`, its last load's time, once it has loaded)."""
        import time

        from homellm.serve.web.replies import sampler_defaults
        registry, web = request.app.state.registry, state_of(request)
        out = []
        for mid in registry.ids():
            loaded = registry.loaded.get(getattr(registry, "adapters", {}).get(mid, (mid,))[0])
            if loaded is not None:
                web.ctx.setdefault(mid, loaded.ctx)
            elif mid not in web.ctx:
                try:  # from the file's metadata (no loading)
                    web.ctx[mid] = await asyncio.to_thread(registry.context_of, mid)
                except (HomellmError, OSError, ValueError):
                    pass
            item = {"id": mid, "ctx": web.ctx.get(mid), "loaded": loaded is not None}
            if mid in web.loading:
                item["loading_s"] = round(time.monotonic() - web.loading[mid], 1)
                item["estimate_s"] = web.load_s.get(mid)
            out.append(item)
        return {"models": out, "default": default_model(request, who),
                "sampling": sampler_defaults()}

    @router.get("/conversations")
    async def list_conversations(request: Request, who: Caller = Depends(caller),
                                 limit: int = Query(200, ge=1, le=1000),
                                 offset: int = Query(0, ge=0)):
        convs = state_of(request).store.list_conversations(who.user, limit=limit, offset=offset)
        return {"conversations": [conversation_json(c) for c in convs]}

    @router.post("/conversations", status_code=201)
    async def create(body: ConversationIn, request: Request, who: Caller = Depends(caller)):
        settings = _settings(request, body)
        mine = state_of(request).store.user_settings(who.user)  # the user's defaults
        for k in ("system_prompt", "sampling"):
            if k not in settings and mine.get(k):
                settings[k] = mine[k]
        settings.setdefault("model", default_model(request, who))
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
        written = {"meta": {"synthetic": False}} if body.role == "assistant" else {}
        m = _store_call(store.add_message, who.user, cid, body.role, body.content,
                        parent_id=parent, **written)
        if m is None:
            raise not_found(f"conversation {cid}")
        if not conv.title and body.role == "user":
            store.update_conversation(who.user, cid, title=" ".join(body.content.split())[:80])
        return {"message": message_json(m), **_detail(request, who, cid)}

    @router.post("/messages/{mid}/edit", status_code=201)
    async def edit(mid: str, body: EditIn, request: Request, who: Caller = Depends(caller)):
        store = state_of(request).store
        m = store.get_message(who.user, mid)
        if m is None:
            raise not_found(f"message {mid}")
        if m.role == "assistant":  # the user's own version of a reply: OA's best data
            new = _store_call(store.add_message, who.user, m.conversation_id, "assistant",
                              body.content, parent_id=m.parent_id, meta={"synthetic": False})
        else:
            new = _store_call(store.edit_message, who.user, mid, body.content)
            conv = _conv(request, who, m.conversation_id)
            if m.parent_id is None and conv.title == " ".join(m.content.split())[:80]:
                store.update_conversation(who.user, conv.id,  # the title it was given: renew
                                          title=" ".join(body.content.split())[:80])
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
