"""Open Assistant message trees: read, write, and extract SFT examples and DPO pairs.

The format is oasst2's `*.trees.jsonl` (LAION-AI/Open-Assistant, oasst-data/oasst_data/
schemas.py, `ExportMessageTree` and `ExportMessageNode`): one tree a line,

    {"message_tree_id": str, "tree_state": str | null, "origin": str | null,
     "prompt": {"message_id": str, "parent_id": str | null, "text": str,
                "role": "prompter" | "assistant", "lang": str | null, "rank": int | null,
                "labels": {name: {"value": float | null, "count": int}} | null,
                "emojis": {emoji: int} | null, "synthetic": bool | null,
                "model_name": str | null, "replies": [message, ...], ...}}

Roles alternate from the root prompt (a prompter message) to every leaf. Fields we do not
know are kept in `extra` and written back unchanged; `.gz` files are read and written
gzipped. homellm adds one field of its own to trees and messages, `"homellm"`: the
conversation's title, model, system prompt and sampling settings, and each reply's seed,
sampling, token counts, timings, finish_reason and `incomplete` flag, so that a store
export imports back unchanged. Other readers ignore it.

Ratings. The web app stores a thumbs up (+1) or down (-1), with an optional comment, per
user and assistant message. In a tree they appear as
- `emojis`: {"+1": ups, "-1": downs} (only the non-zero counts; oasst's own emoji names);
- `labels["quality"]`: {"value": ups / (ups + downs), "count": ups + downs};
- `events["rating"]`: one {"type": "rating", "user_id", "rating": "+1" | "-1", "comment"} each;
- `rank` among siblings: the rated replies to one message, ordered by score = ups - downs
  (higher first; ties by the order of the replies), get ranks 0, 1, 2, ... (0 = preferred,
  as in oasst); unrated replies have no rank (null), and a lone rated reply is rank 0.

Preference between two sibling replies (`prefer(a, b)`): if both have a rank, the lower rank
wins; otherwise if both have votes (+1/-1 counts), the higher score wins; otherwise neither
is preferred. Equal ranks or equal scores prefer neither.

SFT selection (`sft_examples`): "the best-rated paths". An assistant reply is *eligible* when
it is not deleted, not rejected in review, not incomplete, has text, and its score is not
negative. From the root, at every prompter message take its best eligible reply: the lowest
rank, then the highest score, then the first in reply order. At every assistant message
follow *each* prompter reply (different human follow-ups are all genuine). Every path that
reaches an assistant message is one example, cut after its last assistant message; examples
that are a prefix of (or equal to) another example are dropped. Messages are OpenAI-style:
prompter -> "user", assistant -> "assistant", with the tree's system prompt (if any) first.

DPO selection (`dpo_pairs`): for every prompter message, every ordered pair (chosen,
rejected) of its complete, non-deleted replies with `prefer(chosen, rejected)`; the prompt is
the system prompt and the path from the root through that prompter message. Pairs are listed
by tree order of the prompter message, then by the chosen reply's position, then the
rejected reply's.
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from homellm.data import deep_json
from homellm.errors import HomellmError

ROLES = ("prompter", "assistant")
OPENAI_ROLE = {"prompter": "user", "assistant": "assistant"}
UP, DOWN = "+1", "-1"

# the message fields we model, in the order they are written (oasst's order)
_MESSAGE_FIELDS = ("message_id", "parent_id", "user_id", "created_date", "text", "role", "lang",
                   "review_count", "review_result", "deleted", "rank", "synthetic",
                   "model_name", "emojis", "labels", "events", "homellm")
_TREE_FIELDS = ("message_tree_id", "tree_state", "origin", "homellm")
# How deeply a field's value (other than "replies") may nest: metadata is shallow, and the
# store and the exports write it with json, which recurses. Replies nest without limit.
FIELD_MAX_DEPTH = 64


class TreeFileError(HomellmError, ValueError):
    """A trees file (or upload) that cannot be imported; the message starts "FILE:LINE:".
    A ValueError too, for callers that catch those."""


@dataclass
class Message:
    """One node of a tree; `replies` are its children in order."""
    message_id: str
    role: str                      # "prompter" | "assistant"
    text: str
    parent_id: str | None = None
    user_id: str | None = None
    created_date: str | None = None  # ISO 8601
    lang: str | None = None
    review_count: int | None = None
    review_result: bool | None = None
    deleted: bool | None = None
    rank: int | None = None        # 0 = preferred among siblings
    synthetic: bool | None = None
    model_name: str | None = None
    emojis: dict[str, int] | None = None
    labels: dict[str, dict] | None = None   # name -> {"value": float | None, "count": int}
    events: dict[str, list] | None = None
    homellm: dict | None = None    # our own metadata (see the module docstring)
    extra: dict = field(default_factory=dict)
    replies: list["Message"] = field(default_factory=list)

    def votes(self) -> tuple[int, int]:
        """(ups, downs): the +1 / -1 counts in `emojis`."""
        e = self.emojis or {}
        return int(e.get(UP, 0)), int(e.get(DOWN, 0))

    def score(self) -> int:
        up, down = self.votes()
        return up - down

    def rated(self) -> bool:
        return sum(self.votes()) > 0

    def complete(self) -> bool:
        """Usable as training text: not deleted, not rejected, not incomplete, not empty."""
        return (not self.deleted and self.review_result is not False and bool(self.text.strip())
                and not (self.homellm or {}).get("incomplete", False))

    def walk(self) -> Iterator["Message"]:
        """This message and all below it, depth first in reply order."""
        stack = [self]
        while stack:
            m = stack.pop()
            yield m
            stack.extend(reversed(m.replies))


@dataclass
class Tree:
    """One conversation tree: the root prompt and everything below it."""
    message_tree_id: str
    prompt: Message
    tree_state: str | None = None
    origin: str | None = None
    homellm: dict | None = None    # title, model, system_prompt, sampling, conversation_id
    extra: dict = field(default_factory=dict)

    @property
    def system_prompt(self) -> str | None:
        return (self.homellm or {}).get("system_prompt") or None

    def messages(self) -> list[Message]:
        return list(self.prompt.walk())


# ---------------------------------------------------------------- reading and validation

class _Bad(ValueError):
    pass


def _check(cond: bool, what: str):
    if not cond:
        raise _Bad(what)


def _show(value) -> str:
    """A value, shortly, for an error message (without recursing into a deep one)."""
    if isinstance(value, (dict, list)) and deep_json.nesting_depth(value, 4) > 4:
        return "an object" if isinstance(value, dict) else "a list"
    return json.dumps(value)[:60]


def _opt(d: dict, key: str, kind: type, where: str, expected: str):
    """d[key] if it is None or a `kind` (a bool is not an int here), else _Bad."""
    v = d.get(key)
    ok = v is None or (isinstance(v, kind) and (kind is bool or not isinstance(v, bool)))
    _check(ok, f"{where}: field '{key}': expected {expected} or null, got {_show(v)}")
    return v


def message_from_dict(d, parent: Message | None, where: str, seen: set[str]) -> Message:
    """A Message (and its replies) from the JSON object `d`; ValueError says what is wrong.

    Replies are read with a loop, not recursion: a conversation may be thousands deep."""
    root, base = None, where
    pending = [(d, parent, where)]  # (object, its parent Message, where it is)
    while pending:
        d, parent, where = pending.pop()
        m = _one_message(d, parent, where, seen)
        if parent is None:
            root = m
        else:
            parent.replies.append(m)
        replies = d.get("replies") or []
        pending.extend((r, m, f"{base} message {m.message_id} reply {i}")
                       for i, r in reversed(list(enumerate(replies))))
    return root


def _one_message(d, parent: Message | None, where: str, seen: set[str]) -> Message:
    """One message's fields (its replies are left to the caller)."""
    _check(isinstance(d, dict), f"{where}: expected a message object, got {type(d).__name__}")
    mid = d.get("message_id")
    _check(isinstance(mid, str) and mid != "", f"{where}: field 'message_id': expected a "
           f"non-empty string, got {_show(mid)}")
    where = f"{where} message {mid}"
    _check(mid not in seen, f"{where}: duplicate message_id")
    seen.add(mid)
    role = d.get("role")
    _check(role in ROLES, f"{where}: field 'role': expected 'prompter' or 'assistant', got "
           f"{_show(role)}")
    want_role = "prompter" if parent is None or parent.role == "assistant" else "assistant"
    _check(role == want_role, f"{where}: field 'role': expected '{want_role}' "
           f"({'the root is a prompt' if parent is None else 'roles alternate'}), got '{role}'")
    _check(isinstance(d.get("text"), str), f"{where}: field 'text': expected a string")
    pid = d.get("parent_id")
    want_pid = parent.message_id if parent else None
    _check(pid == want_pid or "parent_id" not in d,  # absent: known from the nesting
           f"{where}: field 'parent_id': expected {json.dumps(want_pid)} (where it sits in the "
           f"tree), got {_show(pid)}")
    for key in ("user_id", "created_date", "lang", "model_name"):
        _opt(d, key, str, where, "a string")
    for key in ("review_count", "rank"):
        _opt(d, key, int, where, "an integer")
    for key in ("review_result", "deleted", "synthetic"):
        _opt(d, key, bool, where, "true/false")
    for key in ("emojis", "labels", "events", "homellm"):
        _opt(d, key, dict, where, "an object")
    for k, v in (d.get("emojis") or {}).items():
        _check(isinstance(v, int) and not isinstance(v, bool) and v >= 0,
               f"{where}: field 'emojis': count of {k!r}: expected an integer >= 0, got "
               f"{_show(v)}")
    for k, v in (d.get("labels") or {}).items():
        _check(isinstance(v, dict) and isinstance(v.get("count"), int)
               and (v.get("value") is None or isinstance(v.get("value"), (int, float))),
               f"{where}: field 'labels': {k!r}: expected {{\"value\": number, \"count\": int}}")
    replies = d.get("replies")
    _check(replies is None or isinstance(replies, list),
           f"{where}: field 'replies': expected a list")
    _check_depths(d, where)
    known = {k: d.get(k) for k in _MESSAGE_FIELDS}
    return Message(**{k: v for k, v in known.items() if k != "parent_id"}, parent_id=want_pid,
                   extra={k: v for k, v in d.items() if k not in _MESSAGE_FIELDS and k != "replies"})


def _check_depths(d: dict, where: str):
    for key, value in d.items():
        if key not in ("replies", "prompt") and isinstance(value, (dict, list)):
            _check(deep_json.nesting_depth(value, FIELD_MAX_DEPTH) <= FIELD_MAX_DEPTH,
                   f"{where}: field '{key}': nested more than {FIELD_MAX_DEPTH} levels deep")


def tree_from_dict(d, where: str = "tree") -> Tree:
    """A Tree from one parsed line; ValueError (prefixed by `where`) says what is wrong."""
    _check(isinstance(d, dict), f"{where}: expected a JSON object, got {type(d).__name__}")
    tid = d.get("message_tree_id")
    _check(isinstance(tid, str) and tid != "",
           f"{where}: field 'message_tree_id': expected a non-empty string, got {_show(tid)}")
    _opt(d, "tree_state", str, where, "a string")
    _opt(d, "origin", str, where, "a string")
    _opt(d, "homellm", dict, where, "an object")
    _check(isinstance(d.get("prompt"), dict), f"{where}: field 'prompt': expected a message "
           f"object, got {_show(d.get('prompt'))}")
    _check_depths(d, where)
    prompt = message_from_dict(d["prompt"], None, f"{where}: prompt", set())
    return Tree(message_tree_id=tid, prompt=prompt, tree_state=d.get("tree_state"),
                origin=d.get("origin"), homellm=d.get("homellm"),
                extra={k: v for k, v in d.items() if k not in _TREE_FIELDS and k != "prompt"})


def _open(path: Path, mode: str, gz: bool | None = None):
    gz = path.suffix == ".gz" if gz is None else gz
    return gzip.open(path, mode + "t", encoding="utf-8") if gz else open(path, mode, encoding="utf-8")


def read_trees(path) -> list[Tree]:
    """Every tree in an oasst `.jsonl` (or `.jsonl.gz`) file; blank lines are skipped.

    A bad record raises TreeFileError (a HomellmError and a ValueError) starting `FILE:LINE:`
    and naming the message and field; message ids must be unique within the file. Nothing is
    returned unless every line is good, so an import is all or nothing.
    """
    path = Path(path)
    try:
        f = _open(path, "r")
    except OSError as e:
        raise TreeFileError(f"{path}: cannot read: {e.strerror or e}") from None
    with f:
        try:
            return parse_trees(f, str(path))
        except (UnicodeDecodeError, EOFError, gzip.BadGzipFile) as e:
            raise TreeFileError(f"{path}: not a UTF-8 JSONL file: {e}") from None
        except OSError as e:
            raise TreeFileError(f"{path}: cannot read: {e.strerror or e}") from None


def parse_trees(lines, source: str = "<trees>") -> list[Tree]:
    """Trees from JSONL text lines (e.g. an uploaded file's `text.splitlines()`); errors
    as read_trees (TreeFileError), with `source` in place of the file name.

    Trees may nest to any depth (a long conversation is one deep chain); a string with a
    lone UTF-16 surrogate (JSON "\\ud800", not valid Unicode) is refused, never stored."""
    trees, ids = [], set()
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = deep_json.loads(line)
        except json.JSONDecodeError as e:
            raise TreeFileError(f"{source}:{lineno}: not JSON: {e.msg} (column {e.colno})") \
                from None
        bad_text = deep_json.lone_surrogate(d, line)
        if bad_text:
            raise TreeFileError(f"{source}:{lineno}: {bad_text}; fix or remove it")
        try:
            tree = tree_from_dict(d, "tree")
        except _Bad as e:
            raise TreeFileError(f"{source}:{lineno}: {e}") from None
        for m in tree.prompt.walk():
            if m.message_id in ids:
                raise TreeFileError(f"{source}:{lineno}: message {m.message_id}: duplicate "
                                    "message_id (it is in an earlier tree)")
            ids.add(m.message_id)
        trees.append(tree)
    return trees


def dumps_trees(trees) -> str:
    """Trees as JSONL text (what write_trees writes), e.g. for a download."""
    return "".join(deep_json.dumps(tree_to_dict(t)) + "\n" for t in trees)


# ---------------------------------------------------------------- writing

def message_to_dict(m: Message) -> dict:
    """The JSON object of a message and its replies (built with a loop: any depth)."""
    top = None
    pending = [(m, None)]  # (message, the replies list its object goes into)
    while pending:
        m, into = pending.pop()
        d = {k: getattr(m, k) for k in _MESSAGE_FIELDS
             if getattr(m, k) is not None or k == "parent_id"}  # the root says parent_id: null
        d.update(m.extra)
        d["replies"] = []
        if into is None:
            top = d
        else:
            into.append(d)
        pending.extend((r, d["replies"]) for r in reversed(m.replies))
    return top


def tree_to_dict(t: Tree) -> dict:
    d = {k: getattr(t, k) for k in _TREE_FIELDS if getattr(t, k) is not None}
    d.update(t.extra)
    d["prompt"] = message_to_dict(t.prompt)
    return d


def write_trees(trees, path) -> int:
    """Write trees as oasst JSONL (one a line; gzipped for `.gz`), atomically; returns the count.

    The file appears complete or not at all: it is written beside the target and renamed.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    n = 0
    try:
        with _open(tmp, "w", gz=path.suffix == ".gz") as f:
            for t in trees:
                f.write(dumps_trees([t]))
                n += 1
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n


# ---------------------------------------------------------------- ratings -> tree fields

def rating_fields(ratings: list[dict]) -> dict:
    """emojis / labels / events for one message from its ratings.

    `ratings`: [{"user_id": str | None, "value": +1 | -1, "comment": str | None}, ...].
    Returns {} when there are none.
    """
    if not ratings:
        return {}
    up = sum(1 for r in ratings if r["value"] > 0)
    down = sum(1 for r in ratings if r["value"] < 0)
    emojis = {k: v for k, v in ((UP, up), (DOWN, down)) if v}
    events = [{"type": "rating", "user_id": r.get("user_id"),
               "rating": UP if r["value"] > 0 else DOWN,
               **({"comment": r["comment"]} if r.get("comment") else {})} for r in ratings]
    return {"emojis": emojis, "labels": {"quality": {"value": up / (up + down), "count": up + down}},
            "events": {"rating": events}}


def ratings_of(m: Message) -> list[dict]:
    """The ratings that `rating_fields` wrote (from `events["rating"]`), else from the counts."""
    events = (m.events or {}).get("rating")
    if events:
        return [{"user_id": e.get("user_id"), "value": 1 if e.get("rating") == UP else -1,
                 "comment": e.get("comment")} for e in events if e.get("rating") in (UP, DOWN)]
    up, down = m.votes()
    return [{"user_id": None, "value": 1, "comment": None}] * up + \
           [{"user_id": None, "value": -1, "comment": None}] * down


def assign_ranks(siblings: list[Message]) -> None:
    """Set `rank` on rated siblings by score (higher first, ties in reply order); others None."""
    rated = [m for m in siblings if m.rated()]
    order = sorted(range(len(rated)), key=lambda i: (-rated[i].score(), i))
    for m in siblings:
        m.rank = None
    for r, i in enumerate(order):
        rated[i].rank = r


# ---------------------------------------------------------------- preference, SFT, DPO

def prefer(a: Message, b: Message) -> bool:
    """True when `a` is preferred to its sibling `b` (see the module docstring)."""
    if a.rank is not None and b.rank is not None:
        return a.rank < b.rank
    if a.rated() and b.rated():
        return a.score() > b.score()
    return False


def _best_reply(m: Message) -> Message | None:
    ok = [(i, r) for i, r in enumerate(m.replies) if r.complete() and r.score() >= 0]
    if not ok:
        return None
    big = float("inf")
    return min(ok, key=lambda ir: (ir[1].rank if ir[1].rank is not None else big,
                                   -ir[1].score(), ir[0]))[1]


def _openai(path: list[Message], system: str | None) -> list[dict]:
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": OPENAI_ROLE[m.role], "content": m.text} for m in path]


def sft_examples(tree: Tree) -> list[dict]:
    """SFT examples `{"messages": [...]}` from the tree's best-rated paths (module docstring).

    The selected paths form a subtree (each prompter message's best reply, each such reply's
    follow-ups); an example ends at each selected reply with no selected reply below it, as
    every shorter path is a prefix of a longer one. Walked with a loop: any depth."""
    out = []
    before: dict[int, Message] = {}  # id(message) -> the message before it on its path
    first = _best_reply(tree.prompt)
    pending = [(tree.prompt, first)] if first is not None else []
    while pending:
        m, best = pending.pop()  # a prompter message and its best reply
        before[id(best)] = m
        follow = [(r, b) for r in best.replies if r.text.strip() and not r.deleted
                  for b in (_best_reply(r),) if b is not None]
        if not follow:
            out.append({"messages": _openai(_path_to(best, before), tree.system_prompt)})
        for r, _ in follow:
            before[id(r)] = best
        pending.extend(reversed(follow))
    return out


def dpo_pairs(tree: Tree) -> list[dict]:
    """DPO pairs `{"prompt", "chosen", "rejected"}` from rated siblings (module docstring)."""
    out = []
    before: dict[int, Message] = {}
    pending = [tree.prompt]
    while pending:  # depth first, in reply order
        m = pending.pop()
        if m.role == "prompter":
            replies = [r for r in m.replies if r.complete()]
            pairs = [(a, b) for a in replies for b in replies if a is not b and prefer(a, b)]
            prompt = _openai(_path_to(m, before), tree.system_prompt) if pairs else None
            for a, b in pairs:
                out.append({"prompt": prompt,
                            "chosen": [{"role": "assistant", "content": a.text}],
                            "rejected": [{"role": "assistant", "content": b.text}]})
        for r in m.replies:
            before[id(r)] = m
        pending.extend(reversed(m.replies))
    return out


def _path_to(m: Message, before: dict[int, Message]) -> list[Message]:
    """The messages from the root down to `m`."""
    path = [m]
    while id(path[-1]) in before:
        path.append(before[id(path[-1])])
    return path[::-1]


# ---------------------------------------------------------------- the store <-> trees

ROLE_FROM_STORE = {"user": "prompter", "assistant": "assistant"}
_REPLY_META = ("sampling", "seed", "prompt_tokens", "completion_tokens", "timings",
               "finish_reason", "incomplete")
_KEPT = ("lang", "review_count", "review_result", "deleted", "synthetic")


def trees_from_dump(dump, usernames: dict[str, str]) -> list[Tree]:
    """The oasst trees of one stored conversation (one per root message, in order).

    `dump`: a homellm.store ConversationDump; `usernames`: user id -> username, for the
    `user_id` fields (prompter messages carry the owner's username, rating events the
    rater's). Fields kept from an import (`meta`) are written back as they came.
    """
    conv, owner = dump.conversation, dump.owner
    by_message: dict[str, list[dict]] = {}
    for r in dump.ratings:
        by_message.setdefault(r.message_id, []).append(
            {"user_id": usernames.get(r.user_id) if r.user_id else None, "value": r.value,
             "comment": r.comment})
    nodes: dict[str, Message] = {}
    roots: list[Message] = []
    for m in dump.messages:  # parents come before children (insertion order)
        meta = dict(m.meta or {})
        extra = meta.pop("extra", {})
        node = Message(message_id=m.id, role=ROLE_FROM_STORE[m.role], text=m.content,
                       parent_id=m.parent_id, created_date=m.created_at,
                       user_id=owner.username if m.role == "user" else None,
                       synthetic=m.role == "assistant",
                       model_name=m.model if m.role == "assistant" else None, extra=extra)
        for k in _KEPT + ("rank",):
            if k in meta:
                setattr(node, k, meta[k])
        fields = rating_fields(by_message.get(m.id, []))
        node.emojis = _merge(meta.get("emojis"), fields.get("emojis"))
        node.labels = _merge(meta.get("labels"), fields.get("labels"))
        node.events = _merge(meta.get("events"), fields.get("events"))
        ours = {k: getattr(m, k) for k in _REPLY_META if getattr(m, k) not in (None, False)}
        node.homellm = ours or None
        nodes[m.id] = node
        if m.parent_id is None:
            roots.append(node)
        else:
            nodes[m.parent_id].replies.append(node)
    for node in nodes.values():
        if any(r.rated() for r in node.replies):
            assign_ranks(node.replies)
    info = {"conversation_id": conv.id, "title": conv.title, "model": conv.model,
            "system_prompt": conv.system_prompt, "sampling": conv.sampling,
            "created_at": conv.created_at, "updated_at": conv.updated_at}
    trees = []
    for root in roots:
        leaf = conv.current_leaf_id if conv.current_leaf_id in {m.message_id for m in
                                                                root.walk()} else None
        trees.append(Tree(message_tree_id=root.message_id, prompt=root,
                          tree_state="ready_for_export", origin="homellm",
                          homellm={k: v for k, v in {**info, "current_leaf_id": leaf}.items()
                                   if v is not None}))
    return trees


def _merge(kept: dict | None, ours: dict | None) -> dict | None:
    out = {**(kept or {}), **(ours or {})}
    return out or None


def export_trees(store, user, conversation_ids: list[str] | None = None, *,
                 shared: bool = False) -> list[Tree]:
    """Trees of `user`'s conversations (all, or the given ids: HomellmError names a missing
    one). `shared=True`: every opted-in user's rated conversations (`user` must be admin)."""
    from homellm.errors import HomellmError
    if shared:
        dumps = store.shared_feedback(user)
    else:
        ids = conversation_ids if conversation_ids is not None else \
            [c.id for c in reversed(store.list_conversations(user, limit=10**9))]
        dumps = []
        for cid in ids:
            d = store.dump_conversation(user, cid)
            if d is None:
                raise HomellmError(f"no conversation {cid}")
            dumps.append(d)
    usernames = {u.id: u.username for u in store.list_users()}
    return [t for d in dumps for t in trees_from_dump(d, usernames)]


def _stored_message(m: Message, rated_siblings: bool) -> dict:
    ours = m.homellm or {}
    meta = {k: getattr(m, k) for k in _KEPT if getattr(m, k) is not None}
    if meta.get("synthetic") == (m.role == "assistant"):
        del meta["synthetic"]  # what export writes anyway
    if m.rank is not None and not rated_siblings:
        meta["rank"] = m.rank
    for name, ours_keys in (("emojis", (UP, DOWN)), ("labels", ("quality",)),
                            ("events", ("rating",))):
        rest = {k: v for k, v in (getattr(m, name) or {}).items() if k not in ours_keys}
        if rest:
            meta[name] = rest
    if m.extra:
        meta["extra"] = m.extra
    return {"id": m.message_id, "parent_id": m.parent_id,
            "role": "user" if m.role == "prompter" else "assistant", "content": m.text,
            "created_at": m.created_date,
            "model": m.model_name if m.role == "assistant" else None,
            **{k: ours.get(k) for k in _REPLY_META}, "meta": meta or None}


def import_trees(store, user, trees: list[Tree], progress=None) -> list:
    """Store trees as conversations of `user` (trees that share a homellm conversation_id
    become one conversation); each conversation in one transaction. Ratings by the tree's
    owner (the root's user_id) become `user`'s; other votes are kept anonymous. Message ids
    already in the database get new ones. `progress(n_trees)` is called after each
    conversation. Returns the new Conversations."""
    groups: dict[str, list[Tree]] = {}
    for t in trees:
        key = (t.homellm or {}).get("conversation_id") or f"tree:{t.message_tree_id}"
        groups.setdefault(key, []).append(t)
    uid = user.id if hasattr(user, "id") else user
    made = []
    for group in groups.values():
        info = dict(group[0].homellm or {})
        if not info.get("title"):
            info["title"] = " ".join(group[0].prompt.text.split())[:80]
        messages, ratings, leaf = [], [], info.get("current_leaf_id")
        for t in group:
            owner = t.prompt.user_id
            leaf = (t.homellm or {}).get("current_leaf_id") or leaf
            # ranks among rated siblings are recomputed from the votes on export
            ranked_by_votes = {r.message_id for m in t.prompt.walk()
                               if any(s.rated() for s in m.replies) for r in m.replies}
            for m in t.prompt.walk():
                messages.append(_stored_message(m, m.message_id in ranked_by_votes))
                for r in ratings_of(m):
                    ratings.append({"message_id": m.message_id, "value": r["value"],
                                    "comment": r["comment"],
                                    "user_id": uid if owner and r["user_id"] == owner else None})
        info["current_leaf_id"] = leaf
        made.append(store.restore_conversation(user, info, messages, ratings))
        if progress is not None:
            progress(len(group))
    return made
