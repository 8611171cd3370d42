"""POST /v1/score: a reward model's scores of (prompt, reply) pairs, for a judge or the arena.

    POST /v1/score  {"model": "my-rm", "input": [{"prompt": "Hi", "reply": "Hello!"}, ...]}
    -> {"object": "list", "model": "my-rm", "data": [{"object": "score", "index": 0, "score": 1.3}],
        "usage": {"prompt_tokens": 42, "total_tokens": 42}}

`model` names a reward model under $HOMELLM_HOME/rewards (`homellm tune rm` writes them there
by default; a path is refused: a request never names a file). An input item is {"prompt": str
or [messages], "reply": str} or {"messages": [... ending with the assistant's reply]}. The
model loads on first use (PyTorch, train/reward.py) and stays; scoring runs in a worker thread,
under one lock a model.
"""
from __future__ import annotations

import asyncio
import threading

from fastapi import APIRouter, Request
from pydantic import Field

from homellm.serve.errors import APIError, invalid
from homellm.serve.schemas import _Body

MAX_INPUTS = 2048
NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-:")


class ScoreRequest(_Body):
    model: str = Field(min_length=1)
    input: dict | list[dict]


class _Loaded:
    def __init__(self):
        self.models: dict[str, object] = {}
        self.locks: dict[str, threading.Lock] = {}
        self.lock = threading.Lock()


def _pairs(items: list[dict]) -> list[tuple[list[dict], str]]:
    from homellm.data.conversations import _messages
    out = []
    for i, d in enumerate(items):
        where = f"input[{i}]" if len(items) > 1 else "input"
        try:
            if "messages" in d:
                m = _messages(d["messages"], "messages")
                if len(m) < 2 or m[-1]["role"] != "assistant":
                    raise ValueError("'messages' must end with the assistant's reply")
                out.append((m[:-1], m[-1]["content"]))
                continue
            prompt, reply = d.get("prompt"), d.get("reply")
            if not isinstance(reply, str) or prompt is None:
                raise ValueError("expected 'prompt' and 'reply' (a string), or 'messages'")
            prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _messages(prompt, "prompt")
            out.append((prompt, reply))
        except ValueError as e:
            raise invalid(where, f"{where}: {e}") from None
    return out


def _model(loaded: _Loaded, name: str):
    from homellm.errors import HomellmError
    from homellm.train.reward import load_reward_model, rewards_dir
    with loaded.lock:
        if name in loaded.models:
            return loaded.models[name], loaded.locks[name]
        if not set(name) <= NAME_CHARS or ".." in name:
            raise invalid("model", f"{name!r}: a reward model is named by its folder under the "
                                   "server's rewards folder, not by a path")
        folder = rewards_dir() / name
        if not folder.is_dir():
            have = sorted(p.name for p in rewards_dir().glob("*") if (p / "reward_config.json").is_file()) \
                if rewards_dir().is_dir() else []
            raise APIError(404, f"no reward model {name!r} (available: {', '.join(have) or 'none'})",
                           param="model", code="model_not_found")
        try:
            rm = load_reward_model(folder)
        except HomellmError as e:
            raise APIError(400, str(e), param="model") from None
        loaded.models[name], loaded.locks[name] = rm, threading.Lock()
        return rm, loaded.locks[name]


def rewards_router(auth) -> APIRouter:
    router = APIRouter()
    loaded = _Loaded()

    @router.post("/v1/score", dependencies=auth)
    async def score(body: ScoreRequest, request: Request):
        items = body.input if isinstance(body.input, list) else [body.input]
        if not items:
            raise invalid("input", "expected at least one {prompt, reply}")
        if len(items) > MAX_INPUTS:
            raise invalid("input", f"at most {MAX_INPUTS} inputs a request, got {len(items)}")
        pairs = _pairs(items)

        def work():
            rm, lock = _model(loaded, body.model)
            with lock:
                ids = [rm.encode(p, r) for p, r in pairs]
                pad = rm.tokenizer.padding_id if rm.tokenizer.padding_id is not None else (rm.tokenizer.eos_id or 0)
                return rm.score_ids(ids, pad), sum(map(len, ids))

        scores, n = await asyncio.to_thread(work)
        return {"object": "list", "model": body.model,
                "data": [{"object": "score", "index": i, "score": s} for i, s in enumerate(scores)],
                "usage": {"prompt_tokens": n, "total_tokens": n}}

    return router
