"""JSON values of any nesting depth, and strings that are not valid Unicode.

Python's `json` recurses once per level of nesting and raises RecursionError past ~1,000
levels. A conversation tree nests two levels per turn (a message, its "replies" list), so a
long conversation exported by homellm itself is deeper than that. `loads` and `dumps` try
`json` first (fast, C) and fall back to loops with an explicit stack, giving the same values
and the same text:

    value = loads(line)           # json.JSONDecodeError on bad JSON, as json.loads
    text = dumps(value)           # == json.dumps(value, ensure_ascii=False)

JSON text may escape a lone UTF-16 surrogate ("\\ud800"); `json` decodes it into a Python
string that cannot be encoded as UTF-8 (SQLite, the tokenizer and every file writer then
fail). `lone_surrogate(value)` says where the first one is, so a reader can refuse the line.
"""
from __future__ import annotations

import json
import re
from json.decoder import JSONDecodeError, scanstring
from json.scanner import NUMBER_RE

_WHITESPACE = re.compile(r"[ \t\n\r]*")
_LITERALS = (("true", True), ("false", False), ("null", None), ("NaN", float("nan")),
             ("Infinity", float("inf")), ("-Infinity", float("-inf")))  # what json.loads reads
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # how one gets into JSON text
_END = object()


def loads(text: str):
    """json.loads(text), for any depth of nesting."""
    try:
        return json.loads(text)
    except RecursionError:
        return _loads_iteratively(text)


def dumps(value, **options) -> str:
    """json.dumps(value, ensure_ascii=False, **options), for any depth of nesting (the deep
    path takes only the options `ensure_ascii` and `allow_nan`)."""
    options.setdefault("ensure_ascii", False)
    try:
        return json.dumps(value, **options)
    except RecursionError:
        if set(options) - {"ensure_ascii", "allow_nan"}:
            raise
        return _dumps_iteratively(value, options)


def lone_surrogate(value, text: str | None = None) -> str | None:
    """Where the first string (or key) holding a lone UTF-16 surrogate is in `value`, e.g.
    "message m7: field 'text'" or "field 'messages[1].content'"; None if there is none.
    `text`, the JSON text `value` came from, skips the search when it holds no such escape."""
    if text is not None and not _SURROGATE_ESCAPE.search(text):
        return None
    stack = [(value, None, "")]  # (item, the enclosing message's id, path inside it)
    while stack:
        item, owner, path = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return _place(owner, path, item)
            continue
        if isinstance(item, dict):
            if isinstance(item.get("message_id"), str):
                owner, path = item["message_id"], ""
            for key, child in item.items():
                if isinstance(key, str) and _SURROGATE.search(key):
                    return _place(owner, f"{path}.{key}".lstrip("."), key)
                if key == "replies" and isinstance(child, list):  # messages: they name themselves
                    stack.extend((reply, owner, "") for reply in reversed(child))
                else:
                    stack.append((child, owner, f"{path}.{key}".lstrip(".")[:200]))
        elif isinstance(item, list):
            stack.extend((c, owner, f"{path}[{i}]"[:200]) for i, c in reversed(list(enumerate(item))))
    return None


def _place(owner: str | None, path: str, text: str) -> str:
    code = f"\\u{ord(_SURROGATE.search(text).group()):04x}"
    where = f"field '{path}'" if path else "a key"
    if owner is not None:
        where = f"message {owner}: {where}"
    return f"{where}: a lone UTF-16 surrogate ({code}) is not valid Unicode text"


def nesting_depth(value, limit: int) -> int:
    """How many levels of objects and arrays `value` nests (a scalar: 0), counted with a loop;
    stops counting once past `limit`."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            break
        stack.extend((child, depth + 1) for child in children)
    return deepest


# ---------------------------------------------------------------- the deep paths

def _loads_iteratively(s: str):
    """JSON text to a value with a stack of open containers instead of recursion; the same
    values and the same JSONDecodeError messages as json.loads for the same text."""
    open_: list[list] = []  # [container, key awaiting its value (objects)]
    i = _WHITESPACE.match(s, 0).end()
    while True:
        # one value starts at s[i]
        c = s[i:i + 1]
        if c == "{":
            i = _WHITESPACE.match(s, i + 1).end()
            if s[i:i + 1] == "}":
                value, i = {}, i + 1
            else:
                key, i = _key(s, i)
                open_.append([{}, key])
                i = _WHITESPACE.match(s, i).end()
                continue
        elif c == "[":
            i = _WHITESPACE.match(s, i + 1).end()
            if s[i:i + 1] == "]":
                value, i = [], i + 1
            else:
                open_.append([[], None])
                continue
        elif c == '"':
            value, i = scanstring(s, i + 1, True)
        else:
            number = NUMBER_RE.match(s, i)
            if number:
                whole, frac, exp = number.groups()
                value = float(whole + (frac or "") + (exp or "")) if frac or exp else int(whole)
                i = number.end()
            else:
                for word, value in _LITERALS:
                    if s.startswith(word, i):
                        i += len(word)
                        break
                else:
                    raise JSONDecodeError("Expecting value", s, i)
        # the value is complete: put it into the open containers, closing those that end
        while True:
            i = _WHITESPACE.match(s, i).end()
            if not open_:
                if i != len(s):
                    raise JSONDecodeError("Extra data", s, i)
                return value
            top = open_[-1]
            container = top[0]
            if isinstance(container, dict):
                container[top[1]] = value
            else:
                container.append(value)
            c = s[i:i + 1]
            if c == ",":
                i = _WHITESPACE.match(s, i + 1).end()
                if isinstance(container, dict):
                    top[1], i = _key(s, i)
                    i = _WHITESPACE.match(s, i).end()
                break
            if c == ("}" if isinstance(container, dict) else "]"):
                value, i = container, i + 1
                open_.pop()
                continue
            raise JSONDecodeError("Expecting ',' delimiter", s, i)


def _key(s: str, i: int) -> tuple[str, int]:
    """An object's key and the ':' after it, from s[i]; the index after the ':'."""
    if s[i:i + 1] != '"':
        raise JSONDecodeError("Expecting property name enclosed in double quotes", s, i)
    key, i = scanstring(s, i + 1, True)
    i = _WHITESPACE.match(s, i).end()
    if s[i:i + 1] != ":":
        raise JSONDecodeError("Expecting ':' delimiter", s, i)
    return key, i + 1


def _dumps_iteratively(value, options: dict) -> str:
    out: list[str] = []
    stack = [(None, iter((value,)), True)]  # (closing bracket, items left, first item)
    while stack:
        close, items, first = stack[-1]
        item = next(items, _END)
        if item is _END:
            stack.pop()
            if close:
                out.append(close)
            continue
        stack[-1] = (close, items, False)
        if close and not first:
            out.append(", ")
        if close == "}":
            key, item = item
            # a key as json writes it (a number or true/false/null becomes a string)
            text = json.dumps(key, **options) if isinstance(key, str) else json.dumps({key: 0}, **options)[1:-4]
            out.append(text + ": ")
        if isinstance(item, dict):
            out.append("{")
            stack.append(("}", iter(item.items()), True))
        elif isinstance(item, (list, tuple)):
            out.append("[")
            stack.append(("]", iter(item), True))
        else:
            out.append(json.dumps(item, **options))
    return "".join(out)
