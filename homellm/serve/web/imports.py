"""POST /api/import: Open Assistant JSONL trees (the request body) -> new conversations.

    POST /api/import   body: the file; header X-Filename names it in errors -> 201
                       {"imported": n, "conversations": [...], "warnings": [...]}

The upload is read in pieces up to MAX_IMPORT_BYTES (a Content-Length over it is refused
before anything is read; the guard in serve/guard.py counts a body without one), then
parsed, checked and stored in a worker thread, all of it or nothing. An import is held to
what the page itself could have made: message ids a URL can carry (MESSAGE_ID), texts up to
MAX_TEXT characters like a typed message, sampling settings the settings form accepts, and
a model this server has (else the conversation uses the default model, with a warning).
Anything else is a 400 naming the tree, message and field.
"""
from __future__ import annotations

import asyncio
import math
import re

from fastapi import APIRouter, Depends, Request
from pydantic import ValidationError

from homellm.errors import HomellmError
from homellm.serve.errors import APIError, invalid
from homellm.serve.web.context import Caller, caller, state_of

MAX_IMPORT_BYTES = 64 << 20
MESSAGE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")  # uuids, oasst's and ours


class ImportRefused(ValueError):
    pass


def _refuse(where: str, message: str):
    raise ImportRefused(f"{where}: {message}")


def _text(value, where: str, field: str, limit: int, required: bool = False):
    if value is None and not required:
        return
    if not isinstance(value, str):
        _refuse(where, f"{field}: expected a string")
    if len(value) > limit:
        _refuse(where, f"{field}: {len(value)} characters, at most {limit} (as in the app)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        _refuse(where, f"{field}: not valid Unicode: a lone surrogate at character {e.start}")


def _id(value, where: str, field: str):
    if not isinstance(value, str) or not MESSAGE_ID.fullmatch(value):
        shown = repr(value)[:60]
        _refuse(where, f"{field}: expected an id of 1-128 letters, digits, '.', '_', ':' or '-' "
                f"(starting with a letter or digit), got {shown}")


def _sampling(value, where: str, field: str) -> dict | None:
    from homellm.serve.web.conversations import Sampling
    if value is None:
        return None
    if not isinstance(value, dict):
        _refuse(where, f"{field}: expected an object")
    try:
        return Sampling(**value).model_dump(exclude_none=True)
    except ValidationError as e:
        first = e.errors()[0]
        name = ".".join(str(p) for p in first.get("loc", ()))
        _refuse(where, f"{field}.{name}: {first.get('msg', 'invalid value')}")


def _finite_numbers(value, where: str, field: str, depth: int = 0):
    if isinstance(value, float) and not math.isfinite(value):
        _refuse(where, f"{field}: {value} is not a number JSON can hold")
    if depth > 8:
        return
    if isinstance(value, dict):
        for k, v in value.items():
            _finite_numbers(v, where, f"{field}.{k}", depth + 1)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _finite_numbers(v, where, f"{field}[{i}]", depth + 1)


def check_trees(trees, resolve_model, max_text: int) -> list[str]:
    """Check parsed trees against what the app accepts (ImportRefused naming the place) and
    settle their settings in place; returns warnings. `resolve_model(name)` -> a served id
    or None."""
    warnings = []
    for n, tree in enumerate(trees, 1):
        where = f"tree {n}"
        _id(tree.message_tree_id, where, "message_tree_id")
        where = f"tree {n} ({tree.message_tree_id})"
        info = tree.homellm or {}
        _text(info.get("title"), where, "homellm.title", 500)
        _text(info.get("system_prompt"), where, "homellm.system_prompt", max_text)
        for key in ("conversation_id", "current_leaf_id"):
            if info.get(key) is not None:
                _id(info[key], where, f"homellm.{key}")
        for key in ("created_at", "updated_at"):
            _text(info.get(key), where, f"homellm.{key}", 64)
        if "sampling" in info:
            info["sampling"] = _sampling(info["sampling"], where, "homellm.sampling")
        model = info.get("model")
        if model is not None:
            _text(model, where, "homellm.model", 500)
            served = resolve_model(model)
            if served is None:
                warnings.append(f"{where}: model {model[:80]!r} is not served here: the "
                                "conversation uses the default model")
            info["model"] = served
        for m in tree.prompt.walk():
            _id(m.message_id, where, "message_id")
            at = f"{where}: message {m.message_id}"
            _text(m.text, at, "text", max_text, required=True)
            for key in ("user_id", "created_date", "lang", "model_name"):
                _text(getattr(m, key), at, key, 500)
            _finite_numbers(m.labels, at, "labels")
            _finite_numbers(m.extra, at, "extra")
            ours = m.homellm or {}
            if "sampling" in ours:
                ours["sampling"] = _sampling(ours["sampling"], at, "homellm.sampling")
            for key in ("seed", "prompt_tokens", "completion_tokens"):
                v = ours.get(key)
                if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0
                                      or v >= 1 << 63):
                    _refuse(at, f"homellm.{key}: expected an integer from 0 to 2^63-1")
            _text(ours.get("finish_reason"), at, "homellm.finish_reason", 32)
            if ours.get("incomplete") is not None and not isinstance(ours["incomplete"], bool):
                _refuse(at, "homellm.incomplete: expected true or false")
            timings = ours.get("timings")
            if timings is not None and (not isinstance(timings, dict) or any(
                    not isinstance(v, (int, float)) or isinstance(v, bool) for v in
                    timings.values())):
                _refuse(at, "homellm.timings: expected an object of numbers")
            _finite_numbers(timings, at, "homellm.timings")
    return warnings


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, up to `limit` bytes (413 above it), gathered without copying it
    over and over."""
    too_large = APIError(413, f"the file is larger than {limit >> 20} MB", code="too_large")
    try:
        declared = int(request.headers.get("content-length", ""))
    except ValueError:
        declared = None
    if declared is not None and declared > limit:
        raise too_large
    pieces, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        pieces.append(chunk)
    return b"".join(pieces)


def imports_router() -> APIRouter:
    router = APIRouter(prefix="/api")

    @router.post("/import", status_code=201)
    async def import_file(request: Request, who: Caller = Depends(caller)):
        from homellm.data.oasst import import_trees, parse_trees
        from homellm.serve.web.conversations import MAX_TEXT, conversation_json
        raw = await read_body(request, MAX_IMPORT_BYTES)
        name = re.sub(r"[^\w.-]", "_", request.headers.get("X-Filename", "upload"))[:200]
        store, registry = state_of(request).store, request.app.state.registry

        def resolve(model: str) -> str | None:
            try:
                return registry.resolve_id(model)
            except APIError:
                return None

        def work():  # parsing and storing a big file: off the event loop
            try:
                text = raw.decode("utf-8-sig")
            except UnicodeDecodeError as e:
                raise ImportRefused(f"not UTF-8 text (byte {e.start})") from None
            try:
                trees = parse_trees(text.splitlines(), source=name)
            except RecursionError:
                raise ImportRefused(f"{name}: a tree is nested too deeply to read") from None
            if not trees:
                raise ImportRefused(f"{name}: no conversation trees in it")
            warnings = check_trees(trees, resolve, MAX_TEXT)
            return import_trees(store, who.user, trees), warnings

        try:
            convs, warnings = await asyncio.to_thread(work)
        except ImportRefused as e:
            text = str(e)
            raise invalid("file", text if text.startswith(name) else f"{name}: {text}") from None
        except (HomellmError, ValueError) as e:  # the reader's or the store's word on the file
            raise invalid("file", str(e)) from None
        except RecursionError:
            raise invalid("file", f"{name}: a tree is nested too deeply to store") from None
        return {"imported": len(convs), "conversations": [conversation_json(c) for c in convs],
                "warnings": warnings}

    return router
