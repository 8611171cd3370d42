"""The volunteer collection's rows: trees, messages, reviews, rankings, emojis, reports, edit
proposals, preferences and roles (the tables of migration 007_collect).

    trees = CollectTrees(store.db)
    with store.db.transaction():
        trees.lock_tree(tree_id)           # PostgreSQL: the tree's row, FOR UPDATE
        trees.add_review(...)

Plain rows in and out (dicts, JSON columns decoded); the rules live in homellm/collect/.
Writes whose answer nobody reads are sent with Database.queue: in a batched transaction
(PostgreSQL) they go out with the next statement that is waited for.

Concurrency: every change to a tree, its messages, its tasks and its edit proposals is made
inside a transaction that first takes the tree's lock (`lock_tree`): on PostgreSQL the tree's
row `FOR UPDATE`, on SQLite the database's write lock that `BEGIN IMMEDIATE` takes. So the
checks a change depends on (how many reviews a message has, how many replies a tree) are read
and acted on by one writer of that tree at a time, and no review, ranking or reply is lost or
counted twice. New trees are counted under a second lock (`lock_new_trees`).
"""
from __future__ import annotations

import json
import sqlite3
import uuid

from homellm.store.db import now

# UPDATE ... RETURNING: SQLite 3.35 and later (older ones read the row back)
_RETURNING = sqlite3.sqlite_version_info >= (3, 35)
NEW_TREES_LOCK = 700701   # pg_advisory_xact_lock key for the count of active trees
ROLES = ("volunteer", "moderator", "admin")


def _json(text, default=None):
    return json.loads(text) if text else default


def _dumps(value) -> str:
    """JSON text keeping the keys' order (an imported file's fields come back as they were)."""
    return json.dumps(value, ensure_ascii=False)


def message_row(r: dict) -> dict:
    out = dict(r)
    out["imported"] = _json(r.get("imported"))
    for k in ("deleted", "synthetic"):
        out[k] = bool(r[k])
    if r.get("review_result") is not None:
        out["review_result"] = bool(r["review_result"])
    return out


def tree_row(r: dict) -> dict:
    out = dict(r)
    out["tags"] = _json(r.get("tags"), [])
    out["extra"] = _json(r.get("extra"))
    return out


class CollectTrees:
    def __init__(self, db):
        self.db = db
        self.pg = db.dialect.name == "postgresql"

    # -- locks (inside a transaction)
    def lock_tree(self, tree_id: str) -> dict | None:
        r = self.db.one("SELECT * FROM collect_trees WHERE id = ?" +
                        (" FOR UPDATE" if self.pg else ""), (tree_id,))
        return tree_row(r) if r else None

    def lock_new_trees(self) -> None:
        """(Queued: Database.queue; it is granted before any later statement runs.)"""
        if self.pg:
            self.db.queue("SELECT pg_advisory_xact_lock(?)", (NEW_TREES_LOCK,))

    def queue_lock_tree(self, tree_id: str):
        """lock_tree, queued (Database.queue: its answer read later, if at all)."""
        return self.db.queue("SELECT * FROM collect_trees WHERE id = ?" +
                             (" FOR UPDATE" if self.pg else ""), (tree_id,))

    def queue_lock_of_task(self, task_id: str):
        """The lock a submission of task `task_id` takes, queued: its tree's row (FOR UPDATE
        on PostgreSQL), or for a new prompt the lock on the count of new trees (then no
        row). Read with `tree_row` (None: no tree)."""
        tree = self.db.queue("SELECT * FROM collect_trees WHERE id = (SELECT tree_id FROM "
                             "collect_tasks WHERE id = ?)" + (" FOR UPDATE" if self.pg else ""),
                             (task_id,))
        if self.pg:
            self.db.queue("SELECT pg_advisory_xact_lock(?) FROM collect_tasks WHERE id = ? AND "
                          "kind = 'initial_prompt'", (NEW_TREES_LOCK, task_id))
        return tree

    # -- roles, bans and preferences
    def role(self, user_id: str) -> tuple[str, bool]:
        """(role, banned) of a user: "admin" for an admin, else its role column."""
        r = self.db.one("SELECT is_admin, role, banned FROM users WHERE id = ?", (user_id,))
        if r is None:
            return "volunteer", False
        role = "admin" if r["is_admin"] else ("moderator" if r["role"] == "moderator"
                                              else "volunteer")
        return role, bool(r["banned"])

    def user_state(self, user_id: str) -> tuple[str, bool, list[str], list[str]]:
        """(role, banned, preferred languages, preferred topics) in one query."""
        r = self.db.one("SELECT u.is_admin, u.role, u.banned, p.langs, p.tags FROM users u "
                        "LEFT JOIN collect_prefs p ON p.user_id = u.id WHERE u.id = ?",
                        (user_id,))
        if r is None:
            return "volunteer", False, [], []
        role = "admin" if r["is_admin"] else ("moderator" if r["role"] == "moderator"
                                              else "volunteer")
        return role, bool(r["banned"]), _json(r["langs"], []), _json(r["tags"], [])

    def user(self, username: str) -> dict | None:
        """{id, username, role, banned} of a user by name."""
        r = self.db.one("SELECT id, username, is_admin, role, banned FROM users WHERE "
                        "username = ?", (username,))
        if r is None:
            return None
        role = "admin" if r["is_admin"] else ("moderator" if r["role"] == "moderator"
                                              else "volunteer")
        return {"id": r["id"], "username": r["username"], "role": role,
                "banned": bool(r["banned"])}

    def usernames(self) -> dict[str, str]:
        return {r["id"]: r["username"] for r in self.db.all("SELECT id, username FROM users")}

    def set_role(self, user_id: str, role: str) -> None:
        self.db.run("UPDATE users SET role = ?, is_admin = ? WHERE id = ?",
                    ("volunteer" if role == "admin" else role, role == "admin", user_id))

    def set_banned(self, user_id: str, banned: bool) -> None:
        self.db.run("UPDATE users SET banned = ? WHERE id = ?", (bool(banned), user_id))

    def prefs(self, user_id: str) -> tuple[list[str], list[str]]:
        r = self.db.one("SELECT langs, tags FROM collect_prefs WHERE user_id = ?", (user_id,))
        return (_json(r["langs"], []), _json(r["tags"], [])) if r else ([], [])

    def set_prefs(self, user_id: str, langs: list[str], tags: list[str]) -> None:
        self.db.run("INSERT INTO collect_prefs (user_id, langs, tags, updated_at) "
                    "VALUES (?, ?, ?, ?) ON CONFLICT (user_id) DO UPDATE SET langs = "
                    "excluded.langs, tags = excluded.tags, updated_at = excluded.updated_at",
                    (user_id, _dumps(langs), _dumps(tags), now()))

    # -- trees
    def insert_tree(self, tree_id: str, state: str, lang: str | None, tags: list[str],
                    origin: str | None, goal_size: int, max_depth: int, max_children: int,
                    extra: dict | None = None, created_at: str | None = None) -> None:
        t = created_at or now()
        self.db.run("INSERT INTO collect_trees (id, state, lang, tags, origin, goal_size, "
                    "max_depth, max_children, extra, created_at, updated_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (tree_id, state, lang, _dumps(tags), origin, goal_size, max_depth,
                     max_children, _dumps(extra) if extra else None, t, now()))

    def tree(self, tree_id: str) -> dict | None:
        r = self.db.one("SELECT * FROM collect_trees WHERE id = ?", (tree_id,))
        return tree_row(r) if r else None

    def set_state(self, tree_id: str, state: str) -> None:
        self.db.queue("UPDATE collect_trees SET state = ?, updated_at = ? WHERE id = ?",
                      (state, now(), tree_id))

    def trees(self, states: list[str] | None = None, *, limit: int = 100, offset: int = 0,
              lang: str | None = None) -> list[dict]:
        """Trees, newest first, with `size` (messages not deleted) and the prompt's text."""
        where, params = [], []
        if states:
            where.append(f"t.state IN ({', '.join('?' * len(states))})")
            params += list(states)
        if lang:
            where.append("t.lang = ?")
            params.append(lang)
        sql = ("SELECT t.*, m.text AS prompt, m.user_id AS prompt_user_id, "
               "(SELECT COUNT(*) FROM collect_messages x WHERE x.tree_id = t.id AND "
               "x.deleted = ?) AS size FROM collect_trees t LEFT JOIN collect_messages m ON "
               "m.id = t.id" + (f" WHERE {' AND '.join(where)}" if where else "") +
               " ORDER BY t.n DESC LIMIT ? OFFSET ?")
        rows = self.db.all(sql, [False] + params + [int(limit), int(offset)])
        return [tree_row(r) for r in rows]

    def state_counts(self) -> dict[str, int]:
        return {r["state"]: r["n"] for r in self.db.all(
            "SELECT state, COUNT(*) AS n FROM collect_trees GROUP BY state")}

    # -- messages
    def insert_message(self, *, tree_id: str, parent_id: str | None, depth: int, role: str,
                       text: str, lang: str | None, user_id: str | None, author: str | None,
                       message_id: str | None = None, synthetic: bool = False,
                       model_name: str | None = None, review_count: int = 0,
                       review_result: bool | None = None, deleted: bool = False,
                       rank: int | None = None, imported: dict | None = None,
                       created_at: str | None = None) -> str:
        mid = message_id or str(uuid.uuid4())
        t = now()
        self.db.queue("INSERT INTO collect_messages (id, tree_id, parent_id, depth, role, text, "
                      "lang, user_id, author, review_count, review_result, deleted, rank, "
                      "synthetic, model_name, imported, created_at, updated_at) "
                      "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                      (mid, tree_id, parent_id, depth, role, text, lang, user_id, author,
                       review_count, review_result, bool(deleted), rank, bool(synthetic),
                       model_name, _dumps(imported) if imported else None, created_at or t, t))
        return mid

    def message(self, message_id: str) -> dict | None:
        r = self.db.one("SELECT * FROM collect_messages WHERE id = ?", (message_id,))
        return message_row(r) if r else None

    def path(self, message_id: str) -> list[dict]:
        """The messages from the prompt down to `message_id` ([] if there is none)."""
        # one query (a task's conversation is read on every next-task), each step an index
        # lookup; the depth bound only stops a cycle, which no writer makes
        rows = self.db.all(
            "WITH RECURSIVE up AS (SELECT m.*, 0 AS up_level FROM collect_messages m WHERE "
            "m.id = ? UNION ALL SELECT m.*, up.up_level + 1 FROM up JOIN collect_messages m ON "
            "m.id = up.parent_id WHERE up.up_level < 10000) SELECT * FROM up ORDER BY "
            "up_level DESC", (message_id,))
        for r in rows:
            del r["up_level"]
        return [message_row(r) for r in rows]

    def tree_messages(self, tree_id: str) -> list[dict]:
        return [message_row(r) for r in self.db.all(
            "SELECT * FROM collect_messages WHERE tree_id = ? ORDER BY n", (tree_id,))]

    def children(self, parent_id: str, *, accepted: bool = False,
                 role: str | None = None) -> list[dict]:
        sql = "SELECT * FROM collect_messages WHERE parent_id = ? AND deleted = ?"
        params: list = [parent_id, False]
        if accepted:
            sql += " AND review_result = ?"
            params.append(True)
        if role:
            sql += " AND role = ?"
            params.append(role)
        return [message_row(r) for r in self.db.all(sql + " ORDER BY n", params)]

    def sizes(self, tree_id: str) -> tuple[int, int]:
        """(accepted, in review) messages of a tree, not counting deleted ones."""
        r = self.db.one("SELECT COUNT(CASE WHEN review_result = ? THEN 1 END) AS accepted, "
                        "COUNT(CASE WHEN review_result IS NULL THEN 1 END) AS awaiting "
                        "FROM collect_messages WHERE tree_id = ? AND deleted = ?",
                        (True, tree_id, False))
        return r["accepted"], r["awaiting"]

    def set_review_result(self, message_id: str, accepted: bool) -> None:
        self.db.queue("UPDATE collect_messages SET review_result = ?, updated_at = ? WHERE "
                      "id = ?", (bool(accepted), now(), message_id))

    def set_text(self, message_id: str, text: str) -> None:
        self.db.run("UPDATE collect_messages SET text = ?, updated_at = ? WHERE id = ?",
                    (text, now(), message_id))

    def set_ranks(self, ranks: dict[str, int | None]) -> None:
        """Each message's rank (None: unranked), in one statement: the caller holds the
        tree's lock, and a statement a message held it a round trip each on PostgreSQL."""
        items = list(ranks.items())
        for i in range(0, len(items), 400):
            part = items[i:i + 400]
            cases = " ".join("WHEN ? THEN CAST(? AS INTEGER)" for _ in part)
            self.db.run(f"UPDATE collect_messages SET rank = CASE id {cases} END, updated_at = ? "
                        f"WHERE id IN ({', '.join('?' * len(part))})",
                        [x for mid, rank in part for x in (mid, rank)] + [now()] +
                        [mid for mid, _ in part])

    def delete_subtree(self, message_id: str) -> list[str]:
        """Mark a message and every reply below it deleted; their ids."""
        ids, frontier = [], [message_id]
        while frontier:
            ids += frontier
            marks = ", ".join("?" * len(frontier))
            frontier = [r["id"] for r in self.db.all(
                f"SELECT id FROM collect_messages WHERE parent_id IN ({marks})", frontier)]
        for i in range(0, len(ids), 500):
            part = ids[i:i + 500]
            self.db.run(f"UPDATE collect_messages SET deleted = ?, updated_at = ? WHERE id IN "
                        f"({', '.join('?' * len(part))})", [True, now()] + part)
        return ids

    def messages_of_user(self, user_id: str, limit: int = 200) -> list[dict]:
        return [message_row(r) for r in self.db.all(
            "SELECT * FROM collect_messages WHERE user_id = ? ORDER BY n DESC LIMIT ?",
            (user_id, int(limit)))]

    # -- reviews
    def add_review(self, task_id: str | None, message_id: str, user_id: str, labels: dict,
                   mode: str) -> dict | None:
        """One review; the message's review_count goes up by one (same transaction). The
        message as it is then."""
        self.db.queue("INSERT INTO collect_reviews (task_id, message_id, user_id, labels, "
                      "mode, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                      (task_id, message_id, user_id, _dumps(labels), mode, now()))
        sql = "UPDATE collect_messages SET review_count = review_count + 1, updated_at = ? " \
              "WHERE id = ?"
        if _RETURNING or self.pg:   # the row back from the same statement
            r = self.db.one(sql + " RETURNING *", (now(), message_id))
            return message_row(r) if r else None
        self.db.run(sql, (now(), message_id))
        return self.message(message_id)

    def reviews(self, message_ids: list[str]) -> dict[str, list[dict]]:
        """message id -> its reviews' label dicts, oldest first."""
        out: dict[str, list[dict]] = {}
        for i in range(0, len(message_ids), 500):
            part = message_ids[i:i + 500]
            for r in self.db.all("SELECT message_id, labels FROM collect_reviews WHERE "
                                 f"message_id IN ({', '.join('?' * len(part))}) ORDER BY n",
                                 part):
                out.setdefault(r["message_id"], []).append(json.loads(r["labels"]))
        return out

    def reviews_by_user(self, user_id: str, limit: int = 200) -> list[dict]:
        return [{**r, "labels": json.loads(r["labels"])} for r in self.db.all(
            "SELECT message_id, labels, mode, created_at FROM collect_reviews WHERE user_id = ? "
            "ORDER BY n DESC LIMIT ?", (user_id, int(limit)))]

    # -- rankings
    def add_ranking(self, task_id: str | None, parent_id: str | None, user_id: str,
                    ranked_ids: list[str], ranking: list[int], not_rankable: bool) -> None:
        """One ranking; each ranked message's ranking_count goes up by one."""
        self.db.queue("INSERT INTO collect_rankings (task_id, parent_id, user_id, ranked_ids, "
                      "ranking, not_rankable, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                      (task_id, parent_id, user_id, json.dumps(ranked_ids),
                       json.dumps(ranking), bool(not_rankable), now()))
        ids = sorted(set(ranked_ids))
        if ids:   # one statement (the tree is locked meanwhile)
            self.db.queue("UPDATE collect_messages SET ranking_count = ranking_count + 1 "
                          f"WHERE id IN ({', '.join('?' * len(ids))})", ids)

    def ranking_counts(self, parent_ids: list[str]) -> dict[str, int]:
        """parent id -> how many rankings its replies have (0 for none), in one query."""
        out = dict.fromkeys(parent_ids, 0)
        for i in range(0, len(parent_ids), 500):
            part = parent_ids[i:i + 500]
            for r in self.db.all("SELECT parent_id, COUNT(*) AS n FROM collect_rankings WHERE "
                                 f"parent_id IN ({', '.join('?' * len(part))}) GROUP BY "
                                 "parent_id", part):
                out[r["parent_id"]] = r["n"]
        return out

    def rankings(self, parent_id: str) -> list[dict]:
        return [{"ranked_ids": json.loads(r["ranked_ids"]), "not_rankable":
                 bool(r["not_rankable"]), "user_id": r["user_id"]} for r in self.db.all(
                     "SELECT ranked_ids, not_rankable, user_id FROM collect_rankings "
                     "WHERE parent_id = ? ORDER BY n", (parent_id,))]

    def rankings_in(self, message_ids: list[str]) -> dict[str, list[dict]]:
        """parent id -> rankings of its replies (the oasst export's ranking events)."""
        out: dict[str, list[dict]] = {}
        for i in range(0, len(message_ids), 500):
            part = message_ids[i:i + 500]
            for r in self.db.all("SELECT * FROM collect_rankings WHERE parent_id IN "
                                 f"({', '.join('?' * len(part))}) ORDER BY n", part):
                out.setdefault(r["parent_id"], []).append(
                    {"user_id": r["user_id"], "ranking": json.loads(r["ranking"]),
                     "ranked_message_ids": json.loads(r["ranked_ids"]),
                     "not_rankable": bool(r["not_rankable"])})
        return out

    def rankings_by_user(self, user_id: str, limit: int = 200) -> list[dict]:
        return [{**r, "ranked_ids": json.loads(r["ranked_ids"]),
                 "not_rankable": bool(r["not_rankable"])} for r in self.db.all(
            "SELECT parent_id, ranked_ids, not_rankable, created_at FROM collect_rankings "
            "WHERE user_id = ? ORDER BY n DESC LIMIT ?", (user_id, int(limit)))]

    # -- emojis (thumbs, red flags, and the skip marks)
    def add_emoji(self, message_id: str, user_id: str, emoji: str) -> bool:
        return self.db.run("INSERT INTO collect_emojis (message_id, user_id, emoji, created_at) "
                           "VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                           (message_id, user_id, emoji, now())) > 0

    def remove_emoji(self, message_id: str, user_id: str, emoji: str) -> bool:
        return self.db.run("DELETE FROM collect_emojis WHERE message_id = ? AND user_id = ? "
                           "AND emoji = ?", (message_id, user_id, emoji)) > 0

    def emoji_counts(self, message_ids: list[str]) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for i in range(0, len(message_ids), 500):
            part = message_ids[i:i + 500]
            for r in self.db.all("SELECT message_id, emoji, COUNT(*) AS n FROM collect_emojis "
                                 f"WHERE message_id IN ({', '.join('?' * len(part))}) "
                                 "GROUP BY message_id, emoji ORDER BY emoji", part):
                out.setdefault(r["message_id"], {})[r["emoji"]] = r["n"]
        return out

    def emoji_count(self, message_id: str, emoji: str) -> int:
        return self.db.one("SELECT COUNT(*) AS n FROM collect_emojis WHERE message_id = ? AND "
                           "emoji = ?", (message_id, emoji))["n"]

    # -- reports and the moderators' log
    def add_report(self, message_id: str, user_id: str, reason: str) -> str:
        rid = uuid.uuid4().hex
        self.db.run("INSERT INTO collect_reports (id, message_id, user_id, reason, created_at) "
                    "VALUES (?, ?, ?, ?, ?)", (rid, message_id, user_id, reason, now()))
        return rid

    def reports(self, *, open_only: bool = True, limit: int = 200) -> list[dict]:
        return self.db.all(
            "SELECT r.*, u.username, m.text, m.tree_id, m.deleted FROM collect_reports r "
            "LEFT JOIN users u ON u.id = r.user_id JOIN collect_messages m ON m.id = "
            "r.message_id" + (" WHERE r.resolved_at IS NULL" if open_only else "") +
            " ORDER BY r.n DESC LIMIT ?", (int(limit),))

    def resolve_reports(self, message_id: str, by: str) -> int:
        return self.db.run("UPDATE collect_reports SET resolved_at = ?, resolved_by = ? WHERE "
                           "message_id = ? AND resolved_at IS NULL", (now(), by, message_id))

    def log(self, user_id: str | None, action: str, target: str, detail: dict | None = None):
        self.db.run("INSERT INTO collect_log (user_id, action, target, detail, created_at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (user_id, action, target, _dumps(detail) if detail else None, now()))

    def log_entries(self, limit: int = 100) -> list[dict]:
        return self.db.all("SELECT l.*, u.username FROM collect_log l LEFT JOIN users u ON "
                           "u.id = l.user_id ORDER BY l.n DESC LIMIT ?", (int(limit),))

    # -- edit proposals
    def add_edit(self, message_id: str, tree_id: str, user_id: str, text: str) -> str:
        eid = uuid.uuid4().hex
        self.db.run("INSERT INTO collect_edits (id, message_id, tree_id, user_id, text, status, "
                    "created_at) VALUES (?, ?, ?, ?, ?, 'pending', ?)",
                    (eid, message_id, tree_id, user_id, text, now()))
        return eid

    def edit(self, edit_id: str) -> dict | None:
        return self.db.one("SELECT * FROM collect_edits WHERE id = ?", (edit_id,))

    def vote_edit(self, edit_id: str, user_id: str, task_id: str | None, approve: bool) -> None:
        self.db.run("INSERT INTO collect_edit_votes (edit_id, user_id, task_id, approve, "
                    "created_at) VALUES (?, ?, ?, ?, ?)",
                    (edit_id, user_id, task_id, bool(approve), now()))
        column = "approvals" if approve else "rejections"
        self.db.run(f"UPDATE collect_edits SET {column} = {column} + 1 WHERE id = ?", (edit_id,))

    def decide_edit(self, edit_id: str, status: str) -> None:
        self.db.run("UPDATE collect_edits SET status = ?, decided_at = ? WHERE id = ?",
                    (status, now(), edit_id))

    def add_revision(self, message_id: str, old_text: str, edit_id: str | None) -> None:
        self.db.run("INSERT INTO collect_revisions (message_id, text, edit_id, created_at) "
                    "VALUES (?, ?, ?, ?)", (message_id, old_text, edit_id, now()))

    def edits(self, *, message_id: str | None = None, user_id: str | None = None,
              limit: int = 100) -> list[dict]:
        where, params = [], []
        if message_id:
            where.append("message_id = ?")
            params.append(message_id)
        if user_id:
            where.append("user_id = ?")
            params.append(user_id)
        sql = "SELECT * FROM collect_edits" + (f" WHERE {' AND '.join(where)}" if where else "")
        return self.db.all(sql + " ORDER BY n DESC LIMIT ?", params + [int(limit)])
