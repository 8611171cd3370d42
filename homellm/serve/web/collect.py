"""The volunteer collection's JSON API (Open Assistant's tasks in the web app): the Contribute
page at /contribute, the volunteers' leaderboard at /contributors, the moderators' view at
/moderate (the pages are app.js views, served like the others: guard.PAGES).

Volunteers (everyone logged in):
    GET  /api/collect[?brief=true]             role, preferences, tasks available by kind,
                                               the task kinds and OA's labels, the settings
                                               (brief: the role and ban only)
    PUT  /api/collect/prefs                    {langs: ["en"], tags: ["cooking"]}
    POST /api/collect/tasks                    {type: "random" | a kind, lang?} -> {task,
                                               resumed} or {task: null, reason}
    GET  /api/collect/tasks/{id}               one of the caller's tasks (404 for others')
    POST /api/collect/tasks/{id}/submit        {text, lang, tags} | {labels} |
                                               {ranking, not_rankable} | {approve}
    POST /api/collect/tasks/{id}/skip
    POST /api/collect/messages/{id}/report     {reason}
    POST /api/collect/messages/{id}/emoji      {emoji: "+1" | "-1" | ..., op: "toggle"}
    POST /api/collect/messages/{id}/edits      {text}: an edit proposal, voted on by others
    GET  /api/collect/leaderboard?time_frame=day|week|month|total
Moderators (403 for volunteers):
    GET  /api/collect/trees[?state=]           GET /api/collect/trees/{id}
    POST /api/collect/trees/{id}/halt          {halt: true | false (resume)}
    POST /api/collect/messages/{id}/delete     with the replies below it
    POST /api/collect/messages/{id}/synthetic  {model?, max_tokens, temperature}: a served
                                               model's reply (serve/completion.start_chat),
                                               marked synthetic with its model name
    GET  /api/collect/reports                  GET /api/collect/trollboard?time_frame=
    GET  /api/collect/users/{username}         their history
    POST /api/collect/users/{username}/ban     {banned: true | false}
    GET  /api/collect/export?format=trees|messages&state=ready_for_export|all&gz=&events=
         &include_spam=&include_deleted=       Open Assistant's JSONL (data/oasst_collect.py)
Admins:
    PUT  /api/collect/users/{username}/role    {role: volunteer | moderator | admin}

Without --auth the one local user is an admin. Errors are OpenAI-shaped: 400 naming the
field (empty or oversized text, a ranking that is not a permutation, a label out of range),
403 for a role that may not (code not_moderator / not_admin) or a banned volunteer, 404 for
another volunteer's task, 409 for a task answered, skipped, withdrawn or expired. The routes
that touch the database are plain functions: FastAPI runs them in its thread pool, each
thread with its own connection.
"""
from __future__ import annotations

import asyncio
import gzip
import json
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from homellm.collect import CollectError, CollectSettings, TreeManager
from homellm.collect import labels as L
from homellm.collect import tasks as K
from homellm.serve.errors import APIError
from homellm.serve.web.context import Caller, caller, db_caller

TYPES = {403: "permission_error", 404: "not_found"}
MAX_BODY_TEXT = 1 << 20      # a text field's characters before the manager's own limit


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NextIn(_Body):
    type: str = "random"
    lang: str | None = Field(default=None, max_length=40)


class SubmitIn(_Body):
    text: str | None = Field(default=None, max_length=MAX_BODY_TEXT)
    lang: str | None = Field(default=None, max_length=40)
    tags: list[str] | None = Field(default=None, max_length=50)
    labels: dict[str, Any] | None = None
    ranking: list[Any] | None = Field(default=None, max_length=1000)
    not_rankable: bool | None = None
    approve: bool | None = None


class PrefsIn(_Body):
    langs: list[str] = Field(default_factory=list, max_length=20)
    tags: list[str] = Field(default_factory=list, max_length=50)


class ReportIn(_Body):
    reason: str = Field(max_length=MAX_BODY_TEXT)


class EmojiIn(_Body):
    emoji: str = Field(max_length=40)
    op: Literal["toggle", "add", "remove"] = "toggle"


class EditIn(_Body):
    text: str = Field(max_length=MAX_BODY_TEXT)


class HaltIn(_Body):
    halt: bool = True


class BanIn(_Body):
    banned: bool = True


class RoleIn(_Body):
    role: str = Field(max_length=40)


class SyntheticIn(_Body):
    model: str | None = Field(default=None, max_length=500)
    max_tokens: int = Field(default=400, ge=1, le=8192)
    temperature: float = Field(default=0.7, ge=0, le=2)


def _json(value) -> Response:
    """`value` (plain JSON types only) as FastAPI's JSONResponse writes it, byte for byte,
    without its jsonable_encoder walk: the two routes every volunteer calls in a loop."""
    return Response(json.dumps(value, ensure_ascii=False, allow_nan=False, indent=None,
                               separators=(",", ":")).encode("utf-8"),
                    media_type="application/json")


def api_error(e: CollectError) -> APIError:
    return APIError(e.status, str(e), type=TYPES.get(e.status, "invalid_request_error"),
                    param=e.param, code=e.code)


def collect_router(store, settings: CollectSettings | None = None, threads=None) -> APIRouter:
    """The routes over `store`; their database work runs on `threads` (db_threads.DbThreads;
    None: FastAPI's thread pool), the caller's session lookup too: one queue, a connection
    each, no hop through FastAPI's pool."""
    tm = TreeManager(store.db, settings or CollectSettings())
    router = APIRouter(prefix="/api/collect")
    router.manager = tm  # for tests

    def run(fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CollectError as e:
            raise api_error(e) from None

    async def db(fn, *args, **kwargs):
        """`run(fn, ...)` on the database threads."""
        if threads is None:
            return await asyncio.to_thread(run, fn, *args, **kwargs)
        return await threads.run(run, fn, *args, **kwargs)

    async def db_as(request: Request, fn, *args):
        """fn(the caller, *args) on the database threads, the session lookup (caller) in the
        same hop: the routes every volunteer calls wait in the threads' queue once, not twice"""
        return await db(lambda: fn(caller(request), *args))

    @router.get("")
    async def info(who: Caller = Depends(db_caller),
                   lang: str | None = Query(None, max_length=40), brief: bool = False):
        return await db(_info, who, lang, brief)

    def _info(who: Caller, lang: str | None, brief: bool) -> dict:
        role, banned = tm.trees.role(who.user.id)
        if brief:   # the page asks this on load, for its Moderate link
            return {"role": role, "banned": banned}
        return {"role": role, "banned": banned, "prefs": tm.prefs(who.user),
                "available": {} if banned else tm.available(who.user, lang),
                "kinds": [{"type": k, "title": K.TITLES[k]} for k in K.KINDS
                          if k != K.RANK_PROMPTER_REPLIES or tm.s.rank_prompter_replies],
                "labels": [x.json() for x in L.LABELS.values()],
                "settings": tm.s.as_dict()}

    @router.put("/prefs")
    async def prefs(body: PrefsIn, who: Caller = Depends(db_caller)):
        return await db(tm.set_prefs, who.user, body.langs, body.tags)

    @router.post("/tasks")
    async def next_task(body: NextIn, request: Request):
        return _json(await db_as(request, lambda who: tm.next_task(who.user, body.type, body.lang)))

    @router.get("/tasks/{tid}")
    async def get_task(tid: str, request: Request):
        return await db_as(request, lambda who: tm.task(who.user, tid))

    @router.post("/tasks/{tid}/submit")
    async def submit(tid: str, body: SubmitIn, request: Request):
        answer = body.model_dump(exclude_none=True)
        return _json(await db_as(request, lambda who: tm.submit(who.user, tid, answer)))

    @router.post("/tasks/{tid}/skip")
    async def skip(tid: str, request: Request):
        return {"task": await db_as(request, lambda who: tm.skip(who.user, tid))}

    @router.post("/messages/{mid}/report")
    async def report(mid: str, body: ReportIn, who: Caller = Depends(db_caller)):
        return await db(tm.report, who.user, mid, body.reason)

    @router.post("/messages/{mid}/emoji")
    async def emoji(mid: str, body: EmojiIn, who: Caller = Depends(db_caller)):
        return await db(tm.emoji, who.user, mid, body.emoji, body.op)

    @router.post("/messages/{mid}/edits", status_code=201)
    async def propose_edit(mid: str, body: EditIn, who: Caller = Depends(db_caller)):
        return await db(tm.propose_edit, who.user, mid, body.text)

    @router.get("/leaderboard")
    async def leaderboard(who: Caller = Depends(db_caller), time_frame: str = "total",
                          limit: int = Query(100, ge=1, le=1000)):
        return {"time_frame": time_frame,
                "leaderboard": await db(tm.leaderboard, time_frame, limit)}

    # -- moderators
    @router.get("/trollboard")
    async def trollboard(who: Caller = Depends(db_caller), time_frame: str = "total",
                         limit: int = Query(100, ge=1, le=1000)):
        return {"time_frame": time_frame,
                "trollboard": await db(tm.trollboard, who.user, time_frame, limit)}

    @router.get("/trees")
    async def trees(who: Caller = Depends(db_caller), state: str | None = None,
                    limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0)):
        def both():
            return {"trees": tm.tree_list(who.user, state, limit, offset),
                    "states": tm.trees.state_counts()}
        return await db(both)

    @router.get("/trees/{tree_id}")
    async def tree(tree_id: str, who: Caller = Depends(db_caller)):
        return await db(tm.tree_view, who.user, tree_id)

    @router.post("/trees/{tree_id}/halt")
    async def halt(tree_id: str, body: HaltIn, who: Caller = Depends(db_caller)):
        return await db(tm.halt, who.user, tree_id, body.halt)

    @router.post("/messages/{mid}/delete")
    async def delete(mid: str, who: Caller = Depends(db_caller)):
        return await db(tm.delete_message, who.user, mid)

    @router.get("/reports")
    async def reports(who: Caller = Depends(db_caller), open_only: bool = True):
        return {"reports": await db(tm.reports, who.user, open_only)}

    @router.get("/users/{username}")
    async def history(username: str, who: Caller = Depends(db_caller)):
        return await db(tm.history, who.user, username)

    @router.post("/users/{username}/ban")
    async def ban(username: str, body: BanIn, who: Caller = Depends(db_caller)):
        return await db(tm.ban, who.user, username, body.banned)

    @router.put("/users/{username}/role")
    async def role(username: str, body: RoleIn, who: Caller = Depends(db_caller)):
        return await db(tm.set_role, who.user, username, body.role)

    @router.get("/export")
    def export(who: Caller = Depends(caller), format: Literal["trees", "messages"] = "trees",
               state: str = "ready_for_export", gz: bool = False, events: bool = False,
               include_spam: bool = False, include_deleted: bool = False,
               lang: str | None = Query(None, max_length=40)):
        from homellm.data.oasst import dumps_trees
        from homellm.data.oasst_collect import EXPORT_STATES, collect_trees, message_records
        run(tm.require, who.user, "moderator")
        states = None if state == "all" else state.split(",")
        for s in states or ():
            if s not in EXPORT_STATES:
                raise APIError(400, f"state: {s!r} is not a tree state (expected 'all' or "
                               f"some of {', '.join(EXPORT_STATES)})", param="state",
                               code="invalid_value")
        trees = collect_trees(store.db, states=states, lang=lang, include_spam=include_spam,
                              include_deleted=include_deleted, events=events)
        if format == "trees":
            text = dumps_trees(trees)
        else:
            text = "".join(json.dumps(d, ensure_ascii=False) + "\n"
                           for d in message_records(trees))
        name = f"homellm-collect.{format}.jsonl"
        data = text.encode()
        if gz:
            data, name = gzip.compress(data, mtime=0), name + ".gz"
        return Response(data, media_type="application/gzip" if gz else "application/x-ndjson",
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})

    @router.post("/messages/{mid}/synthetic", status_code=201)
    async def synthetic(mid: str, body: SyntheticIn, request: Request,
                        who: Caller = Depends(caller)):
        from homellm.serve.completion import GenerationSettings, start_chat
        registry = request.app.state.registry
        messages = await db(tm.synthetic_context, who.user, mid)
        if not registry.ids():
            raise APIError(409, "this server serves no model to write a reply",
                           code="no_model")
        model = registry.resolve_id(body.model or registry.ids()[0])
        stream = await start_chat(registry, model, messages, GenerationSettings(
            max_tokens=body.max_tokens, temperature=body.temperature))
        async with stream:
            text, _ = await stream.collect()
        if not text.strip():
            raise APIError(502, f"the model {model!r} wrote an empty reply; try again (a "
                           "higher temperature?)", type="server_error", code="empty_reply")
        return await db(tm.add_synthetic, who.user, mid, text, model)

    return router
