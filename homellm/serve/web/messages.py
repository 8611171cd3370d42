"""The web app's message actions beyond writing and rating, and each user's defaults.

    GET    /api/messages/{id}                 the message and `branch_size` (it and all below it)
    DELETE /api/messages/{id}                 delete that branch -> {deleted: n, conversation...}
    POST   /api/messages/{id}/prefer          {over: a sibling reply's id}: "which is better?"
    GET    /api/preferences/export            my preferences as DPO pairs (JSONL, the format of
                                              homellm.data.pairs: {"prompt", "chosen", "rejected"})
    GET    /api/settings                      my defaults for new chats {model, system_prompt,
    PUT    /api/settings                      sampling}; a new chat starts with them

A branch with a reply still running is not deleted (409: stop it first).
"""
from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Request, Response
from pydantic import Field

from homellm.serve.errors import APIError
from homellm.serve.web.context import Caller, caller, not_found, state_of
from homellm.serve.web.conversations import (MAX_TEXT, Sampling, _Body, _store_call, check_model,
                                             detail_json, message_json)


class PreferIn(_Body):
    over: str = Field(min_length=1, max_length=200)


class DefaultsIn(_Body):
    model: str | None = Field(default=None, max_length=500)
    system_prompt: str | None = Field(default=None, max_length=MAX_TEXT)
    sampling: Sampling | None = None


def messages_router() -> APIRouter:
    router = APIRouter(prefix="/api")

    def _message(request: Request, who: Caller, mid: str):
        m = state_of(request).store.get_message(who.user, mid)
        if m is None:
            raise not_found(f"message {mid}")
        return m

    @router.get("/messages/{mid}")
    async def get(mid: str, request: Request, who: Caller = Depends(caller)):
        m = _message(request, who, mid)
        return {"message": message_json(m),
                "branch_size": state_of(request).store.branch_size(who.user, mid)}

    @router.delete("/messages/{mid}")
    async def delete(mid: str, request: Request, who: Caller = Depends(caller)):
        web = state_of(request)
        m = _message(request, who, mid)
        if any(live.message.conversation_id == m.conversation_id for live in web.live.values()):
            raise APIError(409, "a reply in this conversation is still running: stop it first",
                           code="reply_running")
        n = web.store.delete_branch(who.user, mid)
        conv = web.store.get_conversation(who.user, m.conversation_id)
        return {"deleted": n, **detail_json(request, conv, web.store.branch(who.user, conv.id))}

    @router.post("/messages/{mid}/prefer")
    async def prefer(mid: str, body: PreferIn, request: Request, who: Caller = Depends(caller)):
        store = state_of(request).store
        m = _message(request, who, mid)
        _message(request, who, body.over)
        _store_call(store.prefer, who.user, mid, body.over)
        conv = store.get_conversation(who.user, m.conversation_id)
        return detail_json(request, conv, store.branch(who.user, conv.id))

    @router.get("/preferences/export")
    async def export(request: Request, who: Caller = Depends(caller)):
        pairs = state_of(request).store.preference_pairs(who.user)
        text = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)
        return Response(text, media_type="application/x-ndjson", headers={
            "Content-Disposition": 'attachment; filename="homellm-preferences.dpo.jsonl"'})

    @router.get("/settings")
    async def settings(request: Request, who: Caller = Depends(caller)):
        return {"settings": state_of(request).store.user_settings(who.user)}

    @router.put("/settings")
    async def set_settings(body: DefaultsIn, request: Request, who: Caller = Depends(caller)):
        out = {}
        if body.model:
            out["model"] = check_model(request, body.model)
        if body.system_prompt:
            out["system_prompt"] = body.system_prompt
        sampling = body.sampling.model_dump(exclude_none=True) if body.sampling else {}
        if sampling:
            out["sampling"] = sampling
        return {"settings": state_of(request).store.set_user_settings(who.user, out)}

    return router
