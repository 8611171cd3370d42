"""The arena: one prompt, two anonymous served models side by side, a vote, then the names;
and the leaderboard of every vote (Chatbot Arena's battle flow, on a home server).

    GET  /api/arena                        {ready, models: how many, reason, defaults}
    POST /api/arena/battles                {prompt, max_tokens, temperature} -> event stream
    GET  /api/arena/battles                the caller's battles, newest first
    GET  /api/arena/battles/{id}           one of them
    POST /api/arena/battles/{id}/stop      end both replies now, keeping their text
    POST /api/arena/battles/{id}/vote      {vote: "a" | "b" | "tie" | "both_bad"}: once (409
                                           after that); the answer names the two models
    GET  /api/arena/leaderboard            Bradley-Terry ratings (eval/bradley_terry.py)
    GET  /api/arena/export?format=battles|dpo[&shared=true]   the caller's voted battles as
                                           JSONL (shared: an admin's export of the opted-in
                                           users'), as battles or as DPO pairs (data/arena.py)

Blindness: two different models are drawn at random from the served ones, in random order,
and a battle is "A" and "B" until its vote: its id is random, no response about it carries a
model name, its replies' speeds are left out, and an error from one side has the model's id,
aliases and file names replaced by "model A" / "model B". `models` appears in a battle's JSON
only once it has its vote. Another user's battle is a 404, exactly like a missing one.

The battle's events (Server-Sent Events, one JSON object each):
    event: start      {"battle": the battle (no models)}
    event: delta      {"side": "a" | "b", "text": "..."}
    event: side_done  {"side", "finish_reason", "completion_tokens"}
    event: error      {"side", "error": {...}}      (that side failed after it started)
    event: done       {"battle": the battle, both replies saved}
Both replies are saved when each ends; stopped (the stop route, or the client going away),
each keeps what was streamed with finish_reason "stopped", and is left out of the DPO
export. Refusals before any text (fewer than two models, a prompt longer than a model's
context, a full queue) are a JSON error and store nothing.
"""
from __future__ import annotations

import asyncio
import json
import logging
import random
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from homellm.serve.errors import APIError
from homellm.serve.guard import PAGES
from homellm.serve.web.assets import asset
from homellm.serve.web.context import Caller, caller, not_found, state_of
from homellm.serve.web.conversations import MAX_TEXT

log = logging.getLogger("homellm.serve")

DEFAULT_MAX_TOKENS = 1024      # Chatbot Arena's default reply length
DEFAULT_TEMPERATURE = 0.7      # ... and temperature
VIEWS = tuple(p for p in PAGES if p != "/")   # the page's other views, each at its address
_pick = random.SystemRandom()


class BattleIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1, max_length=MAX_TEXT)
    max_tokens: int = Field(default=DEFAULT_MAX_TOKENS, ge=1, le=1 << 20)
    temperature: float = Field(default=DEFAULT_TEMPERATURE, ge=0, le=2)


class VoteIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    vote: Literal["a", "b", "tie", "both_bad"]


def battle_json(b) -> dict:
    """What the caller may see of a battle: the models only once it has its vote."""
    out = {"id": b.id, "prompt": b.prompt,
           "replies": {s: {"text": text, "finish_reason": finish, "completion_tokens": tokens}
                       for s in ("a", "b") for _, text, finish, tokens in (b.side(s),)},
           "settings": {k: v for k, v in (b.sampling or {}).items()
                        if k in ("max_tokens", "temperature")},
           "vote": b.vote, "created_at": b.created_at, "voted_at": b.voted_at}
    if b.vote is not None:
        out["models"] = {"a": b.model_a, "b": b.model_b}
    return out


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def _names(registry, mid: str) -> list[str]:
    """Every text that would tell which model `mid` is: its id, aliases, path and file name."""
    names = {mid} | {alias for alias, target in registry.aliases.items() if target == mid}
    source = registry.sources.get(mid)
    if source is not None:
        names |= {str(source), Path(str(source)).name, Path(str(source)).stem}
    return sorted((n for n in names if n), key=len, reverse=True)


def hidden(error: APIError, registry, models: dict[str, str]) -> APIError:
    """`error` from one side of a battle, with every name of either model replaced by
    "model A" / "model B" (the original goes to the server's log)."""
    message = error.message
    for side, mid in models.items():
        for name in _names(registry, mid):
            message = message.replace(name, f"model {side.upper()}")
    if message != error.message:
        log.warning("arena: %s", error.message)
    return APIError(error.status, message, type=error.type, param=error.param, code=error.code,
                    headers=error.headers)


class Leaderboard:
    """The leaderboard of the votes so far, recomputed only when they change."""

    def __init__(self):
        self.key, self.value = None, None

    async def get(self, battles) -> dict:
        from homellm.eval.bradley_terry import leaderboard
        outcomes = await asyncio.to_thread(battles.outcomes)
        key = (len(outcomes), hash(tuple(outcomes)))
        if key != self.key:
            self.value = await asyncio.to_thread(leaderboard, outcomes)
            self.key = key
        return self.value


def arena_router(store) -> APIRouter:
    from homellm.store.arena import AlreadyVoted, Battles, StillRunning
    battles = Battles(store.db)
    board = Leaderboard()
    router = APIRouter()

    def _page(request: Request):
        return asset("index.html", request)

    for path in VIEWS:  # the page itself; the view comes from the address (app.js)
        router.add_api_route(path, _page, methods=["GET"], include_in_schema=False)

    def _battle(who: Caller, bid: str):
        b = battles.get(who.user, bid)
        if b is None:
            raise not_found(f"battle {bid}")
        return b

    @router.get("/api/arena")
    async def arena(request: Request, who: Caller = Depends(caller)):
        n = len(request.app.state.registry.ids())
        return {"ready": n >= 2, "models": n,
                "reason": None if n >= 2 else _too_few(n),
                "defaults": {"max_tokens": DEFAULT_MAX_TOKENS,
                             "temperature": DEFAULT_TEMPERATURE}}

    @router.get("/api/arena/battles")
    async def list_battles(who: Caller = Depends(caller), limit: int = Query(50, ge=1, le=500),
                           offset: int = Query(0, ge=0)):
        return {"battles": [battle_json(b) for b in battles.recent(who.user, limit=limit,
                                                                   offset=offset)]}

    @router.get("/api/arena/battles/{bid}")
    async def get_battle(bid: str, who: Caller = Depends(caller)):
        return battle_json(_battle(who, bid))

    @router.post("/api/arena/battles/{bid}/vote")
    async def vote(bid: str, body: VoteIn, who: Caller = Depends(caller)):
        try:
            b = battles.vote(who.user, bid, body.vote)
        except AlreadyVoted as e:
            raise APIError(409, str(e), type="invalid_request_error", code="already_voted"
                           ) from None
        except StillRunning as e:
            raise APIError(409, str(e), type="invalid_request_error", code="battle_running"
                           ) from None
        if b is None:
            raise not_found(f"battle {bid}")
        return battle_json(b)

    @router.post("/api/arena/battles/{bid}/stop")
    async def stop(bid: str, request: Request, who: Caller = Depends(caller)):
        b = _battle(who, bid)
        event = state_of(request).running.get(b.id)
        if event is not None:
            event.set()
        return {"stopped": event is not None, "battle_id": b.id}

    @router.get("/api/arena/leaderboard")
    async def leaderboard(who: Caller = Depends(caller)):
        # only models that were in a voted battle: their names are no secret any more
        return {**await board.get(battles),
                "ties": "a tie and 'both bad' count as half a win for each model"}

    @router.get("/api/arena/export")
    async def export(format: Literal["battles", "dpo"] = "battles", shared: bool = False,
                     who: Caller = Depends(caller)):
        from homellm.data.arena import battle_records, dpo_pairs
        if shared and not who.user.is_admin:
            raise APIError(403, "only an admin can export everyone's shared votes",
                           type="permission_error", code="not_admin")
        voted = await asyncio.to_thread(battles.voted, None if shared else who.user,
                                        shared=shared)
        if format == "dpo":
            lines = dpo_pairs(voted)
        else:
            lines = battle_records(voted, {u.id: u.username for u in store.list_users()})
        name = f"homellm-arena-{'shared-' if shared else ''}{format}.jsonl"
        return Response("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines),
                        media_type="application/x-ndjson",
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})

    @router.post("/api/arena/battles")
    async def start(body: BattleIn, request: Request, who: Caller = Depends(caller)):
        from homellm.serve.completion import GenerationSettings, start_chat
        web, registry = state_of(request), request.app.state.registry
        ids = registry.ids()
        if len(ids) < 2:
            raise APIError(409, _too_few(len(ids)), code="arena_needs_two_models")
        model_a, model_b = _pick.sample(ids, 2)    # two different models, in random order
        models = {"a": model_a, "b": model_b}
        seeds = {s: _pick.randrange(2**63) for s in models}
        messages = [{"role": "user", "content": body.prompt}]
        streams = {}
        try:
            for side, mid in models.items():
                settings = GenerationSettings(max_tokens=body.max_tokens,
                                              temperature=body.temperature, seed=seeds[side])
                streams[side] = await start_chat(registry, mid, messages, settings)
        except APIError as e:
            for s in streams.values():
                s.cancel()
            raise hidden(e, registry, models) from None
        b = battles.create(who.user, body.prompt, model_a, model_b,
                           seeds=(seeds["a"], seeds["b"]),
                           sampling={"max_tokens": body.max_tokens,
                                     "temperature": body.temperature})
        stop_event = asyncio.Event()
        web.running[b.id] = stop_event
        return StreamingResponse(_events(b, who, streams, stop_event, web, registry, models),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _events(b, who, streams, stop_event, web, registry, models):
        queue: asyncio.Queue = asyncio.Queue()
        texts = {s: [] for s in streams}
        tokens = {s: 0 for s in streams}
        finished: dict[str, str] = {}

        async def pump(side, stream):
            try:
                async for delta in stream:
                    tokens[side] += len(delta.tokens)
                    if delta.text:
                        await queue.put(("delta", side, delta.text))
                await queue.put(("end", side, stream.result))
            except APIError as e:
                await queue.put(("error", side, e))
            except Exception:  # never leave the battle waiting for a side that died
                log.exception("arena: side %s of battle %s failed", side, b.id)
                await queue.put(("error", side, APIError(
                    500, "generation failed (the server logged why)", type="server_error",
                    code="generation_failed")))

        def save(side, finish_reason, completion_tokens) -> dict:
            finished[side] = finish_reason
            battles.finish(who.user, b.id, side, "".join(texts[side]), finish_reason,
                           completion_tokens)
            return {"side": side, "finish_reason": finish_reason,
                    "completion_tokens": completion_tokens}

        tasks = [asyncio.ensure_future(pump(s, st)) for s, st in streams.items()]
        stop_wait = asyncio.ensure_future(stop_event.wait())
        try:
            yield _sse("start", {"battle": battle_json(b)})
            while len(finished) < len(streams):
                nxt = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({nxt, stop_wait},
                                             return_when=asyncio.FIRST_COMPLETED)
                if nxt not in done:  # stopped: both sides end now, keeping their text
                    nxt.cancel()
                    break
                kind, side, value = nxt.result()
                if kind == "delta":
                    texts[side].append(value)
                    yield _sse("delta", {"side": side, "text": value})
                elif kind == "end":
                    r = value
                    yield _sse("side_done", save(side, r.finish_reason if r else "stopped",
                                                 r.completion_tokens if r else tokens[side]))
                else:
                    save(side, "error", tokens[side])
                    yield _sse("error", {"side": side,
                                         **hidden(value, registry, models).body()})
            for side in streams:
                if side not in finished:
                    streams[side].cancel()
                    yield _sse("side_done", save(side, "stopped", tokens[side]))
            yield _sse("done", {"battle": battle_json(battles.get(who.user, b.id))})
        finally:
            stop_wait.cancel()
            for t in tasks:
                t.cancel()
            web.running.pop(b.id, None)
            for side, stream in streams.items():
                stream.cancel()
                if side not in finished:  # the client went away: keep the text, marked
                    save(side, "stopped", tokens[side])

    return router


def _too_few(n: int) -> str:
    return (f"the arena needs at least two served models; this server has {n} (start it "
            "with two or more: homellm serve -m MODEL1 MODEL2)")
