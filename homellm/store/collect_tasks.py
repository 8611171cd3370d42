"""Volunteer tasks: reservations, the one conditional UPDATE that completes one, and the
queries that find what a volunteer can be handed.

    tasks = CollectTasks(store.db)
    tasks.candidates("label_assistant_reply", me, langs, settings, now)   # what fits, best first
    tid = tasks.reserve(kind, me, langs, settings, tree_id, target_id, payload, created,
                        expires)     # under the tree's lock; None if taken meanwhile
    tasks.claim(tid, me, now)        # True once: the task is done from here on

A task is reserved for one volunteer until it expires (`expires_at`); while it is live it
holds one of its target's slots, so a message that needs three reviews is never handed to a
fourth reviewer while three reviews are pending or done. `claim` is the exactly-once point:
one UPDATE that matches only a live reservation of that volunteer, so of two submissions of
the same task one wins, and an expired or skipped task takes none.

Each candidate query is one statement: on PostgreSQL it reads one snapshot, so counts of
messages and reservations are consistent with each other. Under the tree's lock, `reserve`
inserts the reservation only if the same query, for that target, still finds it: one
INSERT ... SELECT ... WHERE EXISTS, a statement after the lock's, so on PostgreSQL it reads
a snapshot taken once the lock was granted (the lock and the check in one statement would
read the snapshot from before the wait).

Round trips are what a request costs on PostgreSQL, so a next-task reads the user, their
preferences, their live reservations and the first kind with candidates (with them) in one
statement (`next_state`; SQLite: `user_and_live`, then `candidates_in_order`), its
reservation is sent with the tree's lock, BEGIN and COMMIT in one batch (`queue_reserve`,
Database.transaction(batch=True)), and a submission sends the user and task read, the lock
and the claim together (`queue_role_and_task`, `queue_claim`). Migrations 008 and 010 index
the live reservations by kind, target and tree (partial indexes on status = 'reserved').
"""
from __future__ import annotations

import json
import uuid

LIVE = "k.status = 'reserved' AND k.expires_at > ?"
# the task kinds (homellm/collect/tasks.py names them; the store only needs their strings)
LABEL_KINDS = ("label_initial_prompt", "label_assistant_reply", "label_prompter_reply")
REPLY_KINDS = ("assistant_reply", "prompter_reply")
RANK_ROLE = {"rank_assistant_replies": "assistant", "rank_prompter_replies": "prompter"}
# the kinds with candidate queries, and the order each query gives its candidates in (its
# ORDER BY, as a sort key of its rows; next_state sorts them so): best first
CANDIDATE_ORDER = {**{k: lambda r: (-r["review_count"], r["n"]) for k in LABEL_KINDS},
                   **{k: lambda r: r["n"] for k in (*REPLY_KINDS, *RANK_ROLE, "review_edit")},
                   "rank_initial_prompts": lambda r: -r["n"]}
MY_LANGS = object()   # langs: the user's, from next_state's walk (its row's `want`)


_COLUMNS = ("n", "id", "kind", "user_id", "tree_id", "target_id", "payload", "status",
            "created_at", "expires_at", "done_at")
_TASK_COLUMNS = ", ".join(f"k.{c} AS k_{c}" for c in _COLUMNS)


def _task_row(r: dict) -> dict:
    return {**r, "payload": json.loads(r["payload"])}


def _task_of(r: dict) -> dict:
    """A task's columns out of a joined row (selected as _TASK_COLUMNS)."""
    return {c: r["k_" + c] for c in _COLUMNS}


def _role(r: dict) -> tuple[str, bool]:
    """(role, banned) from a users row, or a missing one (a volunteer, not banned); as
    CollectTrees.role says it."""
    if r["is_admin"] is None:
        return "volunteer", False
    return ("admin" if r["is_admin"] else ("moderator" if r["role"] == "moderator"
                                           else "volunteer")), bool(r["banned"])


class CollectTasks:
    def __init__(self, db):
        self.db = db

    # -- reservations
    def insert(self, kind: str, user_id: str, tree_id: str | None, target_id: str | None,
               payload: dict, created_at: str, expires_at: str, task_id: str | None = None
               ) -> str:
        tid = task_id or uuid.uuid4().hex
        # (queued: in a batch it goes out with the COMMIT; an error fails the transaction)
        self.db.queue("INSERT INTO collect_tasks (id, kind, user_id, tree_id, target_id, "
                      "payload, status, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, "
                      "'reserved', ?, ?)", (tid, kind, user_id, tree_id, target_id,
                                            json.dumps(payload, ensure_ascii=False),
                                            created_at, expires_at))
        return tid

    def get(self, task_id: str) -> dict | None:
        r = self.db.one("SELECT * FROM collect_tasks WHERE id = ?", (task_id,))
        return _task_row(r) if r else None

    def claim(self, task_id: str, user_id: str, now: str) -> bool:
        """Mark a live reservation of this user done; False if it is not one any more."""
        return self.queue_claim(task_id, user_id, now).rowcount == 1

    def queue_claim(self, task_id: str, user_id: str, now: str):
        """claim, queued (Database.queue): done if its rowcount is 1."""
        return self.db.queue("UPDATE collect_tasks SET status = 'done', done_at = ? WHERE "
                             "id = ? AND user_id = ? AND status = 'reserved' AND expires_at > ?",
                             (now, task_id, user_id, now))

    def release(self, task_id: str, user_id: str, status: str) -> bool:
        """End a live reservation as 'skipped' or 'cancelled'; False if it was not live."""
        return self.db.run("UPDATE collect_tasks SET status = ?, done_at = ? WHERE id = ? AND "
                           "user_id = ? AND status = 'reserved'",
                           (status, None, task_id, user_id)) == 1

    def user_and_live(self, user_id: str, now: str
                      ) -> tuple[str, bool, list[str], list[str], list[dict]]:
        """(role, banned, languages, topics, live reservations) of a user in one query
        (CollectTrees.user_state and live_of together: a next-task request's first read)."""
        rows = self.db.all(
            "SELECT u.is_admin, u.role, u.banned, p.langs, p.tags, " + _TASK_COLUMNS +
            " FROM (SELECT 1 AS one) o LEFT JOIN users u ON u.id = ? LEFT JOIN collect_prefs p "
            "ON p.user_id = u.id LEFT JOIN collect_tasks k ON k.user_id = ? AND " + LIVE +
            " ORDER BY k.n", (user_id, user_id, now))
        r = rows[0]
        role, banned = _role(r)
        return (role, banned, json.loads(r["langs"]) if r["langs"] else [],
                json.loads(r["tags"]) if r["tags"] else [],
                [_task_row(_task_of(x)) for x in rows if x["k_id"] is not None])

    def role_and_task(self, user_id: str, task_id: str) -> tuple[str, bool, dict | None]:
        """(role, banned, the task) in one query: a submission's first read."""
        return self.role_and_task_of(self.queue_role_and_task(user_id, task_id))

    def queue_role_and_task(self, user_id: str, task_id: str):
        """role_and_task, queued (Database.queue); read with role_and_task_of."""
        return self.db.queue("SELECT u.is_admin, u.role, u.banned, " + _TASK_COLUMNS + " FROM "
                             "(SELECT 1 AS one) o LEFT JOIN users u ON u.id = ? LEFT JOIN "
                             "collect_tasks k ON k.id = ?", (user_id, task_id))

    @staticmethod
    def role_and_task_of(queued) -> tuple[str, bool, dict | None]:
        r = queued.row
        role, banned = _role(r)
        return role, banned, _task_row(_task_of(r)) if r["k_id"] is not None else None

    def live_of(self, user_id: str, now: str) -> list[dict]:
        return [_task_row(r) for r in self.db.all(
            "SELECT * FROM collect_tasks k WHERE k.user_id = ? AND " + LIVE + " ORDER BY k.n",
            (user_id, now))]

    def cancel_tree(self, tree_id: str, target_ids: list[str] | None = None,
                    keep_kinds: tuple[str, ...] = ()) -> int:
        """Cancel the reservations of a tree (or of these targets in it), but those of
        `keep_kinds`."""
        sql = "UPDATE collect_tasks SET status = 'cancelled' WHERE tree_id = ? AND " \
              "status = 'reserved'"
        params: list = [tree_id]
        if keep_kinds:
            sql += f" AND kind NOT IN ({', '.join('?' * len(keep_kinds))})"
            params += list(keep_kinds)
        if target_ids is not None:
            if not target_ids:
                return 0
            sql += f" AND target_id IN ({', '.join('?' * len(target_ids))})"
            params += target_ids
        return self.db.run(sql, params)

    def cancel_user(self, user_id: str) -> int:
        return self.db.run("UPDATE collect_tasks SET status = 'cancelled' WHERE user_id = ? "
                           "AND status = 'reserved'", (user_id,))

    def counts(self) -> dict[str, int]:
        return {r["status"]: r["n"] for r in self.db.all(
            "SELECT status, COUNT(*) AS n FROM collect_tasks GROUP BY status")}

    # -- what can be handed out
    def prompt_slots(self, max_active: int, now: str) -> int:
        """New trees that may start: max_active_trees minus the trees in review or growing
        and the live initial-prompt reservations (one statement)."""
        r = self.db.one("SELECT (SELECT COUNT(*) FROM collect_trees WHERE state IN "
                        "('initial_prompt_review', 'growing')) + (SELECT COUNT(*) FROM "
                        "collect_tasks k WHERE k.kind = 'initial_prompt' AND " + LIVE + ") AS n",
                        (now,))
        return max(0, max_active - r["n"])

    def candidates(self, kind: str, user_id: str, langs: list[str], s, now: str,
                   target: str | None = None, limit: int = 50) -> list[dict]:
        """Targets of `kind` that `user_id` may be handed now: dicts with target_id, tree_id,
        tags (JSON text), n and kind-specific counts; best first for reviews and edits.
        `s`: CollectSettings. `target`: only that one (the recheck under the lock)."""
        return self.db.all(*self._candidates_sql(kind, user_id, langs, s, now, target, limit))

    def _candidates_sql(self, kind, user_id, langs, s, now, target=None, limit=50
                        ) -> tuple[str, list]:
        if kind in LABEL_KINDS:
            return self._to_review(kind, user_id, langs, s, now, target, limit)
        if kind in REPLY_KINDS:
            return self._to_extend(kind, user_id, langs, s, now, target, limit)
        if kind in RANK_ROLE:
            return self._to_rank(kind, user_id, langs, s, now, target, limit)
        if kind == "review_edit":
            return self._edits(user_id, langs, s, now, target, limit)
        if kind == "rank_initial_prompts":
            return self._prompts(user_id, langs, limit)
        raise ValueError(f"no candidates for task kind {kind!r}")

    def candidates_in_order(self, kinds: list[str], user_id: str, langs: list[str], s,
                            now: str, max_active: int):
        """(kind, candidates) for each of `kinds` in turn, each looked up when its turn comes
        ("initial_prompt": [{}] while a new tree may start, else []); the caller stops at
        the first kind it can use. (PostgreSQL's next-task reads the first kind's with
        next_state; this looks up the kinds after it, if none of its candidates could be
        reserved, or all after a task of another kind was given back.)

        On PostgreSQL one statement first says which kinds have any candidate (an EXISTS
        each, which stops at the first), so the empty kinds are skipped; SQLite has no round
        trips to save and looks each kind up in turn."""
        has = None
        if self.db.dialect.name == "postgresql" and len(kinds) > 1:
            parts, params = [], []
            for k in sorted(kinds):   # the same text each time: prepared once per connection
                if k == "initial_prompt":
                    parts.append("(SELECT (SELECT COUNT(*) FROM collect_trees WHERE state IN "
                                 "('initial_prompt_review', 'growing')) + (SELECT COUNT(*) FROM "
                                 "collect_tasks k WHERE k.kind = 'initial_prompt' AND " + LIVE +
                                 ") < ?)")
                    params += [now, max_active]
                else:
                    sql, ps = self._candidates_sql(k, user_id, langs, s, now)
                    parts.append(f"EXISTS ({sql})")
                    params += ps
            row = self.db.one("SELECT " + ", ".join(f"{p} AS x{i}" for i, p in enumerate(parts)),
                              params)
            has = {k: bool(row[f"x{i}"]) for i, k in enumerate(sorted(kinds))}
        for k in kinds:
            if has is not None and not has[k]:
                yield k, []
            elif k == "initial_prompt":
                yield k, [{}] * min(1, self.prompt_slots(max_active, now))
            else:
                yield k, self.candidates(k, user_id, langs, s, now)

    def next_state(self, user_id: str, lang: str | None, order: list[str], s, now: str,
                   max_active: int) -> dict:
        """PostgreSQL: all a next-task request reads, in one statement: the user (role,
        banned, languages, topics), their live reservations, and, when they hold none, the
        first kind of `order` that has a candidate for them with its candidates (best first;
        [{}] for "initial_prompt" while a new tree may start). `lang`: the language asked
        for (None: the user's preferred ones, all if none).

        {"role", "banned", "langs", "tags", "live": [task], "kind": str | None,
         "candidates": [row]}

        The kinds are tried in `order` by a recursive walk, one kind a step, that stops at
        the first kind with candidates: each kind's query is a subquery PostgreSQL runs
        only when the walk reaches it (an InitPlan in a CASE), so the kinds after it are
        never computed, and the candidates are the rows that were found (the same
        snapshot). The text is the same for every request (the order and the language are
        parameters): it is prepared once per connection, with its generic plan."""
        params: list = [lang or "", lang or "", user_id, user_id, now, list(order)]
        branches = []
        for k in CANDIDATE_ORDER:
            sql, ps = self._candidates_sql(k, user_id, MY_LANGS, s, now)
            branches.append(f"WHEN '{k}' THEN (SELECT json_agg(q) FROM ({sql}) q)")
            params += ps
        branches.append(   # [1] while a new tree may start
            "WHEN 'initial_prompt' THEN (SELECT json_agg(1) WHERE (SELECT COUNT(*) FROM "
            "collect_trees WHERE state IN ('initial_prompt_review', 'growing')) + (SELECT "
            f"COUNT(*) FROM collect_tasks k WHERE k.kind = 'initial_prompt' AND {LIVE}) < ?)")
        params += [now, max_active]
        sql = (
            "WITH RECURSIVE me AS (SELECT u.is_admin, u.role, u.banned, p.langs, p.tags, "
            "CASE WHEN CAST(? AS TEXT) = '' THEN ARRAY(SELECT json_array_elements_text(CAST("
            "COALESCE(p.langs, '[]') AS JSON))) ELSE ARRAY[CAST(? AS TEXT)] END AS want FROM "
            "(SELECT 1 AS one) o LEFT JOIN users u ON u.id = ? LEFT JOIN collect_prefs p ON "
            "p.user_id = u.id), "
            f"live AS MATERIALIZED (SELECT k.* FROM collect_tasks k WHERE k.user_id = ? AND "
            f"{LIVE}), "
            # (step i: the kind at i, and its candidates as a JSON array; none while the
            # user holds a live task)
            "w (i, a, want, kind, cands) AS (SELECT 0, CAST(? AS TEXT[]), me.want, "
            "CAST(NULL AS TEXT), CAST(NULL AS JSON) FROM me WHERE NOT EXISTS (SELECT 1 FROM "
            "live) UNION ALL SELECT w.i + 1, w.a, w.want, w.a[w.i + 1], CASE w.a[w.i + 1] " +
            " ".join(branches) + " END FROM w WHERE w.cands IS NULL AND "
            "w.i < cardinality(w.a)) "
            "SELECT row_to_json(me.*) AS me, (SELECT json_agg(live.*) FROM live) AS live, "
            "f.kind, f.cands FROM me LEFT JOIN (SELECT kind, cands FROM w WHERE cands IS NOT "
            "NULL) f ON TRUE")
        with self.db.transaction(batch=True):   # one round trip
            self.generic_plans()
            row = self.db.queue(sql, params, prepare=True)
        row = row.row
        me, kind, cands = row["me"], row["kind"], row["cands"] or []
        role, banned = _role(me)
        if kind in CANDIDATE_ORDER:   # (json_agg keeps its input's order as a rule, not
            cands.sort(key=CANDIDATE_ORDER[kind])   # by promise: sorted as the query does)
        return {"role": role, "banned": banned,
                "langs": json.loads(me["langs"]) if me["langs"] else [],
                "tags": json.loads(me["tags"]) if me["tags"] else [],
                "live": sorted((_task_row(t) for t in row["live"] or []),
                               key=lambda t: t["n"]),
                "kind": kind, "candidates": [{}] if kind == "initial_prompt" else cands}

    def generic_plans(self) -> None:
        """PostgreSQL, inside a transaction: its prepared statements run with their generic
        plan, made once per connection. The candidate queries are long (next_state's plans
        in ~4 ms on a quiet machine, far longer than it runs), and PostgreSQL's own choice
        between a generic and a custom plan (a plan made for the parameters, each time)
        depends on estimates that change with the data: on some databases it planned the
        candidate queries on every call."""
        if self.db.dialect.name == "postgresql":
            self.db.queue("SET LOCAL plan_cache_mode = force_generic_plan")

    def reserve(self, kind: str, user_id: str, langs: list[str], s, tree_id: str | None,
                target_id: str, payload: dict, created_at: str, expires_at: str
                ) -> str | None:
        """Insert the reservation if `target_id` is still a candidate of `kind` for this
        user (one statement: the check reads a snapshot taken after the caller locked the
        tree); its id, or None if the target was taken meanwhile."""
        tid, added = self.queue_reserve(kind, user_id, langs, s, tree_id, target_id, payload,
                                        created_at, expires_at)
        return tid if added.rowcount == 1 else None

    def queue_reserve(self, kind: str, user_id: str, langs: list[str], s,
                      tree_id: str | None, target_id: str, payload: dict, created_at: str,
                      expires_at: str):
        """reserve, queued (Database.queue): (its id, the Queued INSERT); reserved if the
        INSERT's rowcount is 1."""
        tid = uuid.uuid4().hex
        check, params = self._candidates_sql(kind, user_id, langs, s, created_at,
                                             target=target_id, limit=1)
        return tid, self.db.queue(
            "INSERT INTO collect_tasks (id, kind, user_id, tree_id, target_id, payload, status, "
            "created_at, expires_at) SELECT ?, ?, ?, ?, ?, ?, 'reserved', ?, ? WHERE EXISTS "
            f"(SELECT 1 FROM ({check}) c)",
            [tid, kind, user_id, tree_id, target_id, json.dumps(payload, ensure_ascii=False),
             created_at, expires_at] + params)

    @staticmethod
    def _filters(langs, target, column: str) -> tuple[str, list]:
        sql, params = "", []
        if langs is MY_LANGS:   # (PostgreSQL: next_state's statement, its walk's row)
            sql += " AND (cardinality(w.want) = 0 OR t.lang = ANY(w.want))"
        elif langs:
            sql += f" AND t.lang IN ({', '.join('?' * len(langs))})"
            params += list(langs)
        if target is not None:
            sql += f" AND {column} = ?"
            params.append(target)
        return sql, params

    def _to_review(self, kind, user_id, langs, s, now, target, limit):
        prompt = kind == "label_initial_prompt"
        role = "assistant" if kind == "label_assistant_reply" else "prompter"
        extra, params = self._filters(langs, target, "m.id")
        sql = (
            "SELECT m.id AS target_id, m.tree_id, t.tags, t.lang, m.n, m.review_count FROM "
            "collect_messages m JOIN collect_trees t ON t.id = m.tree_id "
            # the prompt: depth 0 (only it; "parent_id IS NULL" would lead SQLite to read
            # every tree's prompt by the parent index instead of the trees in review)
            f"WHERE t.state = ? AND {'m.depth = 0' if prompt else 'm.parent_id IS NOT NULL'} "
            "AND m.role = ? AND m.deleted = ? AND m.review_result IS NULL "
            "AND (m.user_id IS NULL OR m.user_id <> ?) "
            "AND NOT EXISTS (SELECT 1 FROM collect_reviews r WHERE r.message_id = m.id AND "
            "r.user_id = ?) "
            "AND NOT EXISTS (SELECT 1 FROM collect_emojis e WHERE e.message_id = m.id AND "
            "e.user_id = ? AND e.emoji = '_skip_labeling') "
            "AND m.review_count + (SELECT COUNT(*) FROM collect_tasks k WHERE k.target_id = m.id "
            f"AND k.kind = ? AND {LIVE}) < ?" + extra +
            " ORDER BY m.review_count DESC, m.n LIMIT ?")
        return sql, [
            "initial_prompt_review" if prompt else "growing", role, False, user_id, user_id,
            user_id, kind, now, s.reviews_needed(prompt)] + params + [limit]

    def _to_extend(self, kind, user_id, langs, s, now, target, limit):
        parent_role = "prompter" if kind == "assistant_reply" else "assistant"
        extra, params = self._filters(langs, target, "p.id")
        live_replies = f"k.kind IN ('assistant_reply', 'prompter_reply') AND {LIVE}"
        sql = (
            "SELECT * FROM (SELECT p.id AS target_id, p.tree_id, t.tags, t.lang, p.n, "
            "t.goal_size, "
            "CASE WHEN p.role = 'prompter' THEN t.max_children ELSE ? END AS cap, "
            "(SELECT COUNT(*) FROM collect_messages c WHERE c.parent_id = p.id AND "
            "c.deleted = ? AND (c.review_result = ? OR c.review_result IS NULL)) AS children, "
            "(SELECT COUNT(*) FROM collect_messages x WHERE x.tree_id = t.id AND x.deleted = ? "
            "AND (x.review_result = ? OR x.review_result IS NULL)) + (SELECT COUNT(*) FROM "
            f"collect_tasks k WHERE k.tree_id = t.id AND {live_replies}) AS size "
            "FROM collect_messages p JOIN collect_trees t ON t.id = p.tree_id "
            "WHERE t.state = 'growing' AND p.role = ? AND p.deleted = ? AND p.review_result = ? "
            "AND p.depth < t.max_depth "
            "AND NOT EXISTS (SELECT 1 FROM collect_messages c WHERE c.parent_id = p.id AND "
            "c.user_id = ? AND c.deleted = ?) "
            "AND NOT EXISTS (SELECT 1 FROM collect_emojis e WHERE e.message_id = p.id AND "
            "e.user_id = ? AND e.emoji = '_skip_reply') "
            f"AND NOT EXISTS (SELECT 1 FROM collect_tasks k WHERE k.target_id = p.id AND "
            f"{live_replies})" + extra +
            ") q WHERE q.children < q.cap AND q.size < q.goal_size ORDER BY q.n LIMIT ?")
        return sql, [s.num_prompter_replies, False, True, False, True, now, parent_role,
                     False, True, user_id, False, user_id, now] + params + [limit]

    def _to_rank(self, kind, user_id, langs, s, now, target, limit):
        role = RANK_ROLE[kind]
        extra, params = self._filters(langs, target, "p.id")
        ranked = "c.parent_id = p.id AND c.deleted = ? AND c.review_result = ? AND c.role = ?"
        sql = (
            "SELECT * FROM (SELECT p.id AS target_id, p.tree_id, t.tags, t.lang, p.n, "
            f"(SELECT COUNT(*) FROM collect_messages c WHERE {ranked}) AS replies, "
            f"(SELECT COUNT(*) FROM collect_messages c WHERE {ranked} AND c.user_id = ?) "
            "AS mine, (SELECT COUNT(*) FROM collect_rankings r WHERE r.parent_id = p.id) + "
            f"(SELECT COUNT(*) FROM collect_tasks k WHERE k.target_id = p.id AND k.kind = ? AND "
            f"{LIVE}) AS taken "
            "FROM collect_messages p JOIN collect_trees t ON t.id = p.tree_id "
            "WHERE t.state = 'ranking' AND p.deleted = ? AND p.review_result = ? "
            "AND NOT EXISTS (SELECT 1 FROM collect_rankings r WHERE r.parent_id = p.id AND "
            "r.user_id = ?) "
            "AND NOT EXISTS (SELECT 1 FROM collect_emojis e WHERE e.message_id = p.id AND "
            "e.user_id = ? AND e.emoji = '_skip_ranking')" + extra +
            ") q WHERE q.replies > 1 AND q.mine = 0 AND q.taken < ? ORDER BY q.n LIMIT ?")
        return sql, [False, True, role, False, True, role, user_id, kind, now, False, True,
                     user_id, user_id] + params + [s.num_required_rankings, limit]

    def _edits(self, user_id, langs, s, now, target, limit):
        extra, params = self._filters(langs, target, "e.id")
        sql = (
            "SELECT e.id AS target_id, e.tree_id, t.tags, t.lang, e.n FROM collect_edits e "
            "JOIN collect_trees t ON t.id = e.tree_id JOIN collect_messages m ON "
            "m.id = e.message_id WHERE e.status = 'pending' AND m.deleted = ? "
            "AND t.state IN ('initial_prompt_review', 'growing', 'ranking', "
            "'ready_for_export') AND (e.user_id IS NULL OR e.user_id <> ?) "
            "AND NOT EXISTS (SELECT 1 FROM collect_edit_votes v WHERE v.edit_id = e.id AND "
            "v.user_id = ?) AND e.approvals + e.rejections + (SELECT COUNT(*) FROM "
            f"collect_tasks k WHERE k.target_id = e.id AND k.kind = 'review_edit' AND {LIVE}) "
            "< ?" + extra + " ORDER BY e.n LIMIT ?")
        return sql, [False, user_id, user_id, now, s.num_reviews_edit] + params + [limit]

    def _prompts(self, user_id, langs, limit):
        extra, params = self._filters(langs, None, "m.id")
        return (
            "SELECT m.id AS target_id, m.tree_id, t.tags, t.lang, m.n FROM collect_messages m "
            "JOIN collect_trees t ON t.id = m.id WHERE m.parent_id IS NULL AND m.deleted = ? "
            "AND m.review_result = ? AND t.state IN ('growing', 'ranking', 'ready_for_export') "
            "AND (m.user_id IS NULL OR m.user_id <> ?)" + extra + " ORDER BY m.n DESC LIMIT ?",
            [False, True, user_id] + params + [limit])
