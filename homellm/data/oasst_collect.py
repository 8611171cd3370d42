"""The volunteer collection in and out, in Open Assistant's export formats.

    trees = collect_trees(store.db, states=["ready_for_export"])    # data.oasst.Tree objects
    write_trees(trees, "trees.jsonl.gz")                             # oasst2 *.trees.jsonl(.gz)
    write_messages(trees, "messages.jsonl")                          # oasst2 *.messages.jsonl
    trees = read_export("2023-11-05_oasst2_all.trees.jsonl.gz")      # either kind of file
    import_collect(store.db, trees)                                  # into the collection

The formats are those of oasst-data (LAION-AI/Open-Assistant, oasst-data/README.md and
oasst_data/schemas.py; the backend's utils/tree_export.py writes them):

- trees: one `{"message_tree_id", "tree_state", "origin"?, "prompt": message}` a line, each
  message with its `replies` nested, sorted by rank (unranked last), null fields left out;
- messages: one message a line, depth first through each tree, every field written (null
  too, as oasst-data's tree_to_messages writes them) and without `replies`, with the tree's
  `message_tree_id` and `tree_state` added.

A message's fields: message_id, parent_id, user_id, created_date (ISO 8601), text, role
(prompter | assistant), lang, review_count, review_result (null while in review), deleted,
rank (0 = best of its siblings), synthetic, model_name, emojis ({code: count}, including
OA's skip marks), labels ({name: {"value": mean, "count": reviews}}), and with
`events=True` the rankings (`events.ranking` on the ranked replies' parent, OA's
ExportMessageEventRanking) and emojis (`events.emoji`). A tree's topics go in our own field,
`"homellm": {"tags": [...]}`.

Import keeps everything a file says: ids, authors (as `user_id`, not local accounts),
states, review counts and results, ranks, labels, emojis, events and fields we do not know,
so that export -> import -> export gives the same bytes. Imported trees in one of our
active states (initial_prompt_review, growing, ranking) go on collecting; OA's other states
(prompt_lottery_waiting, backlog_ranking, ...) are kept as they are and hand out no tasks.
Reviews, rankings and emojis added here later are merged into the imported ones on export.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

from homellm.data import deep_json
from homellm.data.oasst import Message, Tree, TreeFileError, parse_trees, tree_from_dict
from homellm.errors import HomellmError

# oasst-data's ExportMessageNode order
MESSAGE_FIELDS = ("message_id", "parent_id", "user_id", "created_date", "text", "role", "lang",
                  "review_count", "review_result", "deleted", "rank", "synthetic",
                  "model_name", "emojis", "labels")
_OPTIONAL = ("events", "homellm")
_DEFAULTS = {"review_count": 0, "deleted": False, "synthetic": False}
# Open Assistant's TextLabel order: the order of a message's `labels`
LABEL_ORDER = ("spam", "fails_task", "lang_mismatch", "pii", "not_appropriate", "hate_speech",
               "sexual_content", "moral_judgement", "political_content", "quality", "toxicity",
               "humor", "helpfulness", "creativity", "violence")
EXPORT_STATES = ("initial_prompt_review", "growing", "ranking", "ready_for_export",
                 "aborted_low_grade", "halted_by_moderator")


# ---------------------------------------------------------------- the collection -> trees

def collect_trees(db, *, states: list[str] | None = ("ready_for_export",),
                  lang: str | None = None, include_deleted: bool = False,
                  include_spam: bool = False, events: bool = False) -> list[Tree]:
    """The collection's trees as data.oasst Trees, oldest first. `states`: which trees
    (None: all); `include_deleted` / `include_spam` (OA's --include-deleted /
    --include-spam): keep deleted messages and those not accepted in review (rejected or
    still in review), with what is below them."""
    from homellm.store.collect_trees import CollectTrees
    ct = CollectTrees(db)
    rows = [t for t in reversed(ct.trees(list(states) if states else None, limit=10**9,
                                         lang=lang))]
    out = []
    for t in rows:
        ms = ct.tree_messages(t["id"])
        ids = [m["id"] for m in ms]
        reviews, emojis = ct.reviews(ids), ct.emoji_counts(ids)
        rankings = ct.rankings_in(ids) if events else {}
        emoji_events = _emoji_events(db, ids) if events else {}
        nodes: dict[str, Message] = {}
        for m in ms:
            if m["parent_id"] is not None and m["parent_id"] not in nodes:
                continue   # below a message left out
            if (m["deleted"] and not include_deleted) or \
                    (m["review_result"] is not True and m["parent_id"] is not None
                     and not include_spam):
                continue
            node = _node(m, aggregate(reviews.get(m["id"], [])), emojis.get(m["id"], {}),
                         rankings.get(m["id"], []), emoji_events.get(m["id"], []))
            nodes[m["id"]] = node
            if m["parent_id"] is not None:
                nodes[m["parent_id"]].replies.append(node)
        root = nodes.get(t["id"])
        if root is None:
            continue
        for node in nodes.values():   # OA: replies by rank, the unranked last (stable)
            node.replies.sort(key=lambda r: (r.rank is None, r.rank or 0))
        extra = t["extra"] or {}
        ours = {**(extra.get("homellm") or {}), **({"tags": t["tags"]} if t["tags"] else {})}
        out.append(Tree(message_tree_id=t["id"], prompt=root,
                        tree_state=None if extra.get("no_state") else t["state"],
                        origin=t["origin"], homellm=ours or None,
                        extra=extra.get("extra") or {}))
    return out


def aggregate(reviews: list[dict]) -> dict[str, dict]:
    """{label: {"value": mean, "count": reviews that set it}} over reviews' label dicts, in
    LABEL_ORDER (the `labels` field of a message)."""
    sums: dict[str, list[float]] = {}
    for r in reviews:
        for k, v in r.items():
            sums.setdefault(k, []).append(float(v))
    rank = {k: i for i, k in enumerate(LABEL_ORDER)}
    return {k: {"value": sum(v) / len(v), "count": len(v)}
            for k, v in sorted(sums.items(), key=lambda kv: (rank.get(kv[0], 99), kv[0]))}


def _emoji_events(db, ids: list[str]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for i in range(0, len(ids), 500):
        part = ids[i:i + 500]
        for r in db.all("SELECT message_id, user_id, emoji FROM collect_emojis WHERE "
                        f"message_id IN ({', '.join('?' * len(part))}) ORDER BY created_at, "
                        "user_id, emoji", part):
            out.setdefault(r["message_id"], []).append(
                {"type": "emoji", "user_id": r["user_id"], "emoji": r["emoji"]})
    return out


def _node(m: dict, local_labels: dict, local_emojis: dict, rankings: list[dict],
          emoji_events: list[dict]) -> Message:
    imp = m["imported"] or {}
    absent = set(imp.get("absent", ()))
    labels = _merge_labels(imp.get("labels"), local_labels)
    emojis = dict(imp.get("emojis") or {})
    for k, v in local_emojis.items():
        emojis[k] = emojis.get(k, 0) + v
    events = {k: list(v) for k, v in (imp.get("events") or {}).items()}
    if rankings:
        events.setdefault("ranking", []).extend(
            {"type": "ranking", "user_id": r["user_id"], "ranking": r["ranking"],
             "ranked_message_ids": r["ranked_message_ids"], "ranking_parent_id": m["id"],
             "message_tree_id": m["tree_id"], **({"not_rankable": True} if r["not_rankable"]
                                                 else {})} for r in rankings)
    if emoji_events:
        events.setdefault("emoji", []).extend(emoji_events)

    def kept(name, value):
        return None if name in absent and value == _DEFAULTS.get(name) else value

    return Message(
        message_id=m["id"], role=m["role"], text=m["text"], parent_id=m["parent_id"],
        user_id=m["author"], created_date=None if "created_date" in absent else m["created_at"],
        lang=m["lang"], review_count=kept("review_count", m["review_count"]),
        review_result=m["review_result"], deleted=kept("deleted", m["deleted"]),
        rank=m["rank"], synthetic=kept("synthetic", m["synthetic"]), model_name=m["model_name"],
        emojis=emojis or None, labels=labels or None, events=events or None,
        homellm=imp.get("homellm"), extra=imp.get("extra") or {})


def _merge_labels(imported: dict | None, local: dict) -> dict:
    out = dict(imported or {})
    for k, v in local.items():
        if k in out and out[k].get("value") is not None:
            c0, c1 = out[k]["count"], v["count"]
            out[k] = {"value": (out[k]["value"] * c0 + v["value"] * c1) / (c0 + c1),
                      "count": c0 + c1}
        else:
            out[k] = v
    return out


# ---------------------------------------------------------------- files

def _open(path: Path, mode: str, gz: bool | None = None):
    if path.suffix == ".gz" if gz is None else gz:
        return gzip.open(path, mode + "t", encoding="utf-8")
    return open(path, mode, encoding="utf-8")


def message_records(trees) -> list[dict]:
    """Every message of the trees as a flat record (the messages file's lines)."""
    out = []
    for t in trees:
        for m in t.prompt.walk():
            d = {k: getattr(m, k) for k in MESSAGE_FIELDS}
            d.update({k: getattr(m, k) for k in _OPTIONAL if getattr(m, k) is not None})
            d.update(m.extra)
            d["message_tree_id"], d["tree_state"] = t.message_tree_id, t.tree_state
            out.append(d)
    return out


def write_messages(trees, path) -> int:
    """The trees' messages as oasst2 `*.messages.jsonl` (gzipped for `.gz`), atomically;
    returns how many."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    n = 0
    try:
        with _open(tmp, "w", gz=path.suffix == ".gz") as f:
            for d in message_records(trees):
                f.write(deep_json.dumps(d) + "\n")
                n += 1
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n


def read_export(path) -> list[Tree]:
    """Trees from an Open Assistant export: a trees file or a messages file (oasst1 or
    oasst2, `.jsonl` or `.jsonl.gz`), told apart by its first record. TreeFileError
    (FILE:LINE: ...) for anything that does not fit; nothing is returned unless all does."""
    path = Path(path)
    try:
        with _open(path, "r") as f:
            lines = f.read().splitlines()
    except (OSError, EOFError, gzip.BadGzipFile, UnicodeDecodeError) as e:
        raise TreeFileError(f"{path}: cannot read as UTF-8 JSONL: {e}") from None
    first = next((x for x in lines if x.strip()), "")
    try:
        head = json.loads(first) if first else {}
    except json.JSONDecodeError:
        head = {}
    if isinstance(head, dict) and "message_id" in head and "prompt" not in head:
        return trees_from_messages(lines, str(path))
    return parse_trees(lines, str(path))


def trees_from_messages(lines, source: str = "<messages>") -> list[Tree]:
    """Trees rebuilt from a messages file's lines (parents before their replies or not;
    trees in the order of their prompts)."""
    records, where = [], {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = deep_json.loads(line)
        except json.JSONDecodeError as e:
            raise TreeFileError(f"{source}:{lineno}: not JSON: {e.msg} (column {e.colno})") \
                from None
        if not isinstance(d, dict) or not isinstance(d.get("message_id"), str):
            raise TreeFileError(f"{source}:{lineno}: expected a message object with a "
                                "'message_id'")
        if d["message_id"] in where:
            raise TreeFileError(f"{source}:{lineno}: message {d['message_id']}: duplicate "
                                f"message_id (also on line {where[d['message_id']]})")
        where[d["message_id"]] = lineno
        records.append(d)
    by_id = {d["message_id"]: {k: v for k, v in d.items() if k != "replies"} for d in records}
    roots, states = [], {}
    for d in records:
        node = by_id[d["message_id"]]
        tid, state = node.pop("message_tree_id", None), node.pop("tree_state", None)
        pid = d.get("parent_id")
        if pid is None:
            roots.append(node)
            states[d["message_id"]] = (tid, state)
        elif pid not in by_id:
            raise TreeFileError(f"{source}:{where[d['message_id']]}: message "
                                f"{d['message_id']}: its parent {pid} is not in the file")
        else:
            by_id[pid].setdefault("replies", []).append(node)
    trees = []
    for root in roots:
        tid, state = states[root["message_id"]]
        obj = {"message_tree_id": tid or root["message_id"], "tree_state": state,
               "prompt": root}
        try:
            trees.append(tree_from_dict(obj, f"tree {obj['message_tree_id']}"))
        except ValueError as e:
            raise TreeFileError(f"{source}: {e}") from None
    seen = {m.message_id for t in trees for m in t.prompt.walk()}
    lost = [mid for mid in by_id if mid not in seen]
    if lost:
        raise TreeFileError(f"{source}:{where[lost[0]]}: message {lost[0]}: not reachable from "
                            "a prompt (a cycle of parent_ids?)")
    return trees


# ---------------------------------------------------------------- trees -> the collection

def import_collect(db, trees: list[Tree], *, goal_size: int = 12, max_depth: int = 3,
                   max_children: int = 3, progress=None) -> tuple[int, int]:
    """Store trees in the collection (each tree in one transaction); (trees, messages).
    The shape limits are those a tree imported in an active state keeps growing to (OA's
    defaults). HomellmError, before anything is written, if an id is in the database
    already."""
    from homellm.store.collect_trees import CollectTrees
    ct = CollectTrees(db)
    ids = [m.message_id for t in trees for m in t.prompt.walk()] + \
        [t.message_tree_id for t in trees]
    for i in range(0, len(ids), 500):
        part = ids[i:i + 500]
        clash = db.one("SELECT id FROM collect_messages WHERE id IN "
                       f"({', '.join('?' * len(part))}) UNION SELECT id FROM collect_trees "
                       f"WHERE id IN ({', '.join('?' * len(part))}) LIMIT 1", part + part)
        if clash:
            raise HomellmError(f"message or tree {clash['id']} is in the collection already; "
                               "nothing imported")
    n = 0
    for t in trees:
        ours = dict(t.homellm or {})
        tags = ours.pop("tags", []) or []
        extra = {k: v for k, v in (("extra", t.extra), ("homellm", ours),
                                   ("no_state", t.tree_state is None)) if v}
        with db.transaction():
            ct.insert_tree(t.message_tree_id, t.tree_state or "ready_for_export",
                           t.prompt.lang, [str(x) for x in tags], t.origin, goal_size,
                           max_depth, max_children, extra or None,
                           created_at=t.prompt.created_date)
            depth: dict[str, int] = {}
            for m in t.prompt.walk():
                depth[m.message_id] = 0 if m.parent_id is None else depth[m.parent_id] + 1
                absent = [k for k in ("created_date", "review_count", "deleted", "synthetic")
                          if getattr(m, k) is None]
                imported = {k: v for k, v in (
                    ("labels", m.labels), ("emojis", m.emojis), ("events", m.events),
                    ("homellm", m.homellm), ("extra", m.extra), ("absent", absent)) if v}
                ct.insert_message(
                    tree_id=t.message_tree_id, parent_id=m.parent_id,
                    depth=depth[m.message_id], role=m.role, text=m.text, lang=m.lang,
                    user_id=None, author=m.user_id, message_id=m.message_id,
                    synthetic=bool(m.synthetic), model_name=m.model_name,
                    review_count=m.review_count or 0, review_result=m.review_result,
                    deleted=bool(m.deleted), rank=m.rank, imported=imported or None,
                    created_at=m.created_date)
                n += 1
        if progress is not None:
            progress(1)
    return len(trees), n
