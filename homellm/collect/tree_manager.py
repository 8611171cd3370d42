"""The tree manager: which task a volunteer gets, what a submission does, and how a tree moves
through its states (Open Assistant's `TreeManager`, backend/oasst_backend/tree_manager.py).

    tm = TreeManager(store.db, CollectSettings())
    r = tm.next_task(alice)                      # {"task": {...}, "resumed": False}
    tm.submit(alice, r["task"]["id"], {"text": "How do rainbows form?", "lang": "en"})
    tm.skip(bob, task_id)                        # not for me (he is not handed it again)

States of a tree:

    initial_prompt_review --(its reviews accept the prompt)--> growing
    initial_prompt_review --(they reject it)--> aborted_low_grade
    growing --(goal_tree_size accepted messages, none in review)--> ranking
    ranking --(every set of >= 2 sibling replies has num_required_rankings rankings;
               the ranks are merged, ranking.py)--> ready_for_export
    any --(a moderator halts it, or auto-moderation)--> halted_by_moderator

Only the first three hand out tasks. A reply is reviewed by `num_reviews_reply` volunteers
(not its author); below the acceptance threshold it is rejected and leaves the tree: it is
not counted, not extended, not ranked, and a new reply may take its place. Nobody reviews,
ranks or replies to their own message twice, or ranks replies among which one is theirs.

Reservations: a task is reserved for its volunteer for `task_timeout_s`; a volunteer holds
one live task at a time (asking again returns it, or, for another kind, releases it), and
skipping it records OA's skip mark so it is not offered to them again. See
store/collect_tasks.py for why no slot is handed out twice and no submission counted twice.
"""
from __future__ import annotations

import itertools
import json
import random
import re
import threading
import uuid
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone

from homellm.collect import labels as L
from homellm.collect import tasks as K
from homellm.collect.errors import CollectError, not_found
from homellm.collect.errors import user_id as _uid
from homellm.collect.moderation import ROLE_RANK, Moderation
from homellm.collect.ranking import ranked_pairs
from homellm.collect.settings import CollectSettings
from homellm.store.collect_tasks import CollectTasks
from homellm.store.collect_trees import CollectTrees, tree_row
from homellm.store.db import now

_WRITERS: dict[str, threading.RLock] = {}   # SQLite file -> this process's writer lock
_WRITERS_LOCK = threading.Lock()

STATES = ("initial_prompt_review", "growing", "ranking", "ready_for_export",
          "aborted_low_grade", "halted_by_moderator")
ACTIVE = STATES[:3]
MAX_TAGS, MAX_TAG_CHARS = 5, 32


def _later(stamp: str, seconds: float) -> str:
    return (datetime.fromisoformat(stamp) + timedelta(seconds=seconds)).astimezone(
        timezone.utc).isoformat(timespec="microseconds")


def message_json(m: dict, reveal: bool = False) -> dict:
    out = {"message_id": m["id"], "role": m["role"], "text": m["text"], "lang": m["lang"]}
    if reveal:
        out.update(synthetic=m["synthetic"], model_name=m["model_name"])
    return out


def task_json(t: dict) -> dict:
    return {"id": t["id"], "type": t["kind"], "title": K.TITLES[t["kind"]],
            "status": t["status"], "created_at": t["created_at"],
            "expires_at": t["expires_at"], **t["payload"]}


class TreeManager(Moderation):
    def __init__(self, db, settings: CollectSettings | None = None,
                 rng: random.Random | None = None):
        self.db = db
        self.s = settings or CollectSettings()
        self.rng = rng or random.Random()
        self.trees = CollectTrees(db)
        self.tasks = CollectTasks(db)
        self._writer = None
        if db.dialect.name == "sqlite":
            with _WRITERS_LOCK:
                self._writer = _WRITERS.setdefault(db.url, threading.RLock())

    @contextmanager
    def _tx(self, batch: bool = False):
        """A transaction (`batch`: Database.transaction's, PostgreSQL's statements queued
        with db.queue go out together). On SQLite this process's writers also queue on a
        lock of their own first: SQLite's busy handler polls with sleeps of up to 100 ms, so
        writers waiting on the database's lock alone would see long, random waits under
        load."""
        if self._writer is None:
            with self.db.transaction(batch):
                yield
            return
        with self._writer, self.db.transaction():   # (re-entrant: nested uses join)
            yield

    # ---------------------------------------------------------------- who may do what
    def role(self, user) -> str:
        return self.trees.role(_uid(user))[0]

    def _active(self, user) -> str:
        """The user's id; 403 if they are banned from contributing."""
        uid = _uid(user)
        if self.trees.role(uid)[1]:
            raise _banned()
        return uid

    def require(self, user, role: str) -> str:
        uid = self._active(user)
        have = self.trees.role(uid)[0]
        if ROLE_RANK[have] < ROLE_RANK[role]:
            raise CollectError(f"only a{'n' if role == 'admin' else ''} {role} can do this "
                               f"(you are a {have})", status=403, code=f"not_{role}")
        return uid

    # ---------------------------------------------------------------- preferences
    def prefs(self, user) -> dict:
        langs, tags = self.trees.prefs(_uid(user))
        return {"langs": langs, "tags": tags}

    def set_prefs(self, user, langs: list[str], tags: list[str]) -> dict:
        langs = [_lang(x, "langs") for x in langs]
        self.trees.set_prefs(_uid(user), list(dict.fromkeys(langs)), _tags(tags, "tags"))
        return self.prefs(user)

    # ---------------------------------------------------------------- handing out tasks
    def available(self, user, lang: str | None = None) -> dict[str, int]:
        """How many targets of each kind this volunteer could be handed now."""
        uid = _uid(user)
        langs = [lang] if lang else self.trees.prefs(uid)[0]
        return {k: len(v) for k, v in self._all_candidates(uid, langs, now()).items()}

    def _all_candidates(self, uid: str, langs: list[str], t: str) -> dict[str, list[dict]]:
        out = {k: self.tasks.candidates(k, uid, langs, self.s, t) for k in K.KINDS
               if k not in (K.INITIAL_PROMPT, K.RANK_INITIAL_PROMPTS)}
        if not self.s.rank_prompter_replies:
            out[K.RANK_PROMPTER_REPLIES] = []
        out[K.INITIAL_PROMPT] = [{}] * min(1, self.tasks.prompt_slots(self.s.max_active_trees,
                                                                       t))
        return out

    def next_task(self, user, kind: str = "random", lang: str | None = None) -> dict:
        """{"task": task JSON, "resumed": bool}, or {"task": None, "reason": "..."}."""
        uid = _uid(user)
        if kind not in K.REQUESTS:
            raise CollectError(f"type {kind!r}: expected one of {', '.join(K.REQUESTS)}",
                               param="type")
        if lang is not None:
            lang = _lang(lang, "lang")
        # "random": groups drawn by OA's weights, each kind's candidates looked up only when
        # its turn comes (the first kind with candidates in such an order is drawn with the
        # weights renormalized over the kinds that have some, as OA draws)
        order = [kind] if kind != "random" else K.random_order(
            {k: 1 for k in K.KINDS if k != K.RANK_PROMPTER_REPLIES or
             self.s.rank_prompter_replies}, self.rng)
        if not self.s.rank_prompter_replies:
            order = [k for k in order if k != K.RANK_PROMPTER_REPLIES]
        t = now()
        pg = self.db.dialect.name == "postgresql"
        if pg:   # one statement: the user, their live tasks, the first kind with candidates
            st = self.tasks.next_state(uid, lang, order, self.s, t, self.s.max_active_trees)
            banned, langs, tags, live = st["banned"], st["langs"], st["tags"], st["live"]
        else:
            _, banned, langs, tags, live = self.tasks.user_and_live(uid, t)
        if banned:
            raise _banned()
        langs = [lang] if lang else langs
        for task in live:
            if kind in ("random", task["kind"]):
                return {"task": task_json(task), "resumed": True}
        for task in live:  # another kind asked for: the one held goes back
            self.tasks.release(task["id"], uid, "cancelled")
        if pg and not live:
            # next_state found the first kind in `order` with candidates (None: no kind
            # has any); the kinds after it are looked up only if none of them is reserved
            found = [] if st["kind"] is None else itertools.chain(
                [(st["kind"], st["candidates"])], self.tasks.candidates_in_order(
                    order[order.index(st["kind"]) + 1:], uid, langs, self.s, now(),
                    self.s.max_active_trees))
        else:   # SQLite (no round trips to save), or a task of another kind was released
            found = self.tasks.candidates_in_order(order, uid, langs, self.s, now(),
                                                   self.s.max_active_trees)
        for k, cands in found:
            task = self._reserve(k, uid, langs, tags, cands)
            if task is not None:
                return {"task": task_json(task), "resumed": False}
        what = "tasks" if kind == "random" else f"'{kind}' tasks"
        where = f" in {', '.join(langs)}" if langs else ""
        return {"task": None, "reason": f"no {what}{where} for you right now; try another kind "
                                        "or come back later"}

    def _reserve(self, kind: str, uid: str, langs: list[str], tags: list[str],
                 cands: list[dict]) -> dict | None:
        """Reserve one of `cands` (what candidates_in_order found for `kind`), checking it
        again under its tree's lock; None if none is left."""
        if not cands:   # (before any draw: the same draws whichever way they were found)
            return None   # (initial_prompt: no slot for a new tree; checked again below)
        if kind == K.INITIAL_PROMPT:
            with self._tx(batch=True):   # (PostgreSQL: 2 round trips)
                self.trees.lock_new_trees()
                t = now()
                if self.tasks.prompt_slots(self.s.max_active_trees, t) <= 0:
                    return None
                return self._insert(kind, uid, None, None, {"conversation": [],
                                                            "lang": langs[0] if langs else None,
                                                            "hint": None}, t)
        if kind == K.RANK_INITIAL_PROMPTS:
            prompts = cands
            if len(prompts) < 2:
                return None
            picked = self.rng.sample(prompts, min(5, len(prompts)))
            payload = {"conversation": [], "prompts": [message_json(self.trees.message(
                p["target_id"])) for p in picked]}
            with self._tx(batch=True):
                return self._insert(kind, uid, None, None, payload, now())
        for c in self._order(kind, cands, tags)[:20]:
            payload = self._payload(kind, c)   # read before the lock: short
            t = now()
            expires = _later(t, self.s.task_timeout_s)
            # BEGIN, the tree's lock, the insert and COMMIT: one round trip on PostgreSQL
            # (the insert reads a snapshot taken once the lock is granted, so it is made
            # only if the target is still a candidate then; a tree gone meanwhile has none)
            with self._tx(batch=True):
                self.tasks.generic_plans()
                self.trees.queue_lock_tree(c["tree_id"])
                tid, added = self.tasks.queue_reserve(kind, uid, langs, self.s, c["tree_id"],
                                                      c["target_id"], payload, t, expires)
            if added.rowcount != 1:
                continue   # taken meanwhile: the next one
            return {"id": tid, "kind": kind, "user_id": uid, "tree_id": c["tree_id"],
                    "target_id": c["target_id"], "payload": payload, "status": "reserved",
                    "created_at": t, "expires_at": expires, "done_at": None}
        return None

    def _order(self, kind: str, cands: list[dict], tags: list[str]) -> list[dict]:
        """Candidates in the order to try: reviews and edits as the query sorted them
        (closest to a decision first); replies with OA's lonely-child rule (a prompt with
        fewer than lonely_children_count replies first, most of the time), rankings at
        random; the volunteer's topics before the rest."""
        cands = list(cands)
        if kind in K.REPLY or kind in K.RANK:
            self.rng.shuffle(cands)
        if kind == K.ASSISTANT_REPLY and self.rng.random() < self.s.p_lonely_child_extension:
            cands.sort(key=lambda c: not 0 < c["children"] < self.s.lonely_children_count)
        if tags:
            want = set(tags)
            cands.sort(key=lambda c: not want & set(_tag_list(c.get("tags"))))
        return cands

    def _insert(self, kind, uid, tree_id, target_id, payload, t) -> dict:
        expires = _later(t, self.s.task_timeout_s)
        tid = self.tasks.insert(kind, uid, tree_id, target_id, payload, t, expires)
        return {"id": tid, "kind": kind, "user_id": uid, "tree_id": tree_id,
                "target_id": target_id, "payload": payload, "status": "reserved",
                "created_at": t, "expires_at": expires, "done_at": None}

    def _payload(self, kind: str, c: dict) -> dict:
        """What the volunteer is shown for candidate `c` (a candidates row: target_id, and
        its tree's lang and tags)."""
        target = c["target_id"]
        if kind == K.REVIEW_EDIT:
            e = self.trees.edit(target)
            path = self.trees.path(e["message_id"])
            return {"conversation": [message_json(m) for m in path],
                    "message_id": e["message_id"],
                    "edit": {"edit_id": e["id"], "original": path[-1]["text"],
                             "proposed": e["text"]}}
        path = self.trees.path(target)
        out = {"conversation": [message_json(m) for m in path], "message_id": target,
               "lang": c["lang"], "tags": _tag_list(c["tags"])}
        if kind in K.LABEL:
            what = K.LABEL[kind]
            p = {"initial_prompt": self.s.p_full_labeling_review_prompt,
                 "assistant": self.s.p_full_labeling_review_reply_assistant,
                 "prompter": self.s.p_full_labeling_review_reply_prompter}[what]
            mode = "full" if self.rng.random() < p or p >= 1 else "simple"
            valid = L.valid_labels(what, mode)
            out.update(mode=mode, valid_labels=valid, mandatory_labels=list(L.MANDATORY),
                       labels=[L.LABELS[x].json() for x in valid])
        elif kind in K.RANK:
            replies = self.trees.children(target, accepted=True, role=K.RANK[kind])
            self.rng.shuffle(replies)
            reveal = all(r["synthetic"] for r in replies)   # OA's reveal_synthetic
            out.update(replies=[message_json(r, reveal) for r in replies],
                       reveal_synthetic=reveal)
        return out

    # ---------------------------------------------------------------- reading a task
    def task(self, user, task_id: str) -> dict:
        t = self.tasks.get(task_id)
        if t is None or t["user_id"] != _uid(user):
            raise _no_task(task_id)
        return task_json(t)

    def skip(self, user, task_id: str) -> dict:
        uid = _uid(user)
        t = self.tasks.get(task_id)
        if t is None or t["user_id"] != uid:
            raise _no_task(task_id)
        with self._tx():
            if t["tree_id"]:
                self.trees.lock_tree(t["tree_id"])
            if not self.tasks.release(task_id, uid, "skipped"):
                raise self._not_live(task_id)
            emoji = K.SKIP_EMOJI.get(t["kind"])
            if emoji and t["target_id"]:
                self.trees.add_emoji(t["target_id"], uid, emoji)
                if emoji == "_skip_reply" and self.s.auto_mod_max_skip_reply and \
                        self.trees.emoji_count(t["target_id"], emoji) >= \
                        self.s.auto_mod_max_skip_reply:
                    self._enter(t["tree_id"], "halted_by_moderator")
                    self.trees.log(None, "auto_halt", t["tree_id"],
                                   {"reason": "skipped too often", "message_id": t["target_id"]})
        return task_json(self.tasks.get(task_id))

    def _not_live(self, task_id: str) -> CollectError:
        t = self.tasks.get(task_id)
        if t["status"] == "done":
            return CollectError(f"task {task_id} is answered already; ask for the next one",
                                status=409, code="task_done")
        if t["status"] == "skipped":
            return CollectError(f"task {task_id} was skipped", status=409, code="task_skipped")
        if t["status"] == "cancelled":
            return CollectError(f"task {task_id} was withdrawn (its tree was halted, its "
                                "message deleted, or you asked for another task)",
                                status=409, code="task_cancelled")
        return CollectError(f"task {task_id} expired at {t['expires_at']} (tasks are kept for "
                            f"{self.s.task_timeout_s} s); ask for the next one",
                            status=409, code="task_expired")

    # ---------------------------------------------------------------- submitting
    def submit(self, user, task_id: str, body: dict) -> dict:
        """Complete a task with `body` (text/lang/tags, labels, ranking/not_rankable, or
        approve). Returns {"task", "tree": {"id", "state"}, "message_id"?}."""
        uid = _uid(user)
        out: dict = {}
        with self._tx(batch=True):
            # the user with the task, the task's lock (its tree's, or for a new prompt the
            # count of new trees'), and the claim: one round trip on PostgreSQL, checked in
            # this order (what fails rolls back: a claim of a banned user's, or with a bad
            # body, is undone)
            read = self.tasks.queue_role_and_task(uid, task_id)
            locked = self.trees.queue_lock_of_task(task_id)
            claimed = self.tasks.queue_claim(task_id, uid, now())
            _, banned, t = self.tasks.role_and_task_of(read)
            if banned:
                raise _banned()
            if t is None or t["user_id"] != uid:
                raise _no_task(task_id)
            clean = self._check_body(t, body if isinstance(body, dict) else {})
            if claimed.rowcount != 1:
                raise self._not_live(task_id)
            tree = tree_row(locked.row) if locked.row else None
            tree_id = self._apply(t, clean, uid, out)
            if tree_id:
                # the locked row is the tree as it is (nothing else writes it meanwhile);
                # a new tree is read
                state = self._update_state(tree_id, tree if tree_id == t["tree_id"] else None)
                out["tree"] = {"id": tree_id, "state": state}
        out["task"] = task_json({**t, "status": "done"})
        return out

    def _check_body(self, t: dict, body: dict) -> dict:
        kind, p = t["kind"], t["payload"]
        if kind in K.TEXT_KINDS:
            out = {"text": self.check_text(body.get("text"), "text"),
                   "lang": _lang(body.get("lang") or p.get("lang") or self.s.default_lang,
                                 "lang")}
            if kind == K.INITIAL_PROMPT:
                out["tags"] = _tags(body.get("tags") or [], "tags")
            return out
        if kind in K.LABEL:
            try:
                return {"labels": L.check(body.get("labels"), p["valid_labels"],
                                          p["mandatory_labels"])}
            except L.LabelError as e:
                raise CollectError(str(e), param=e.param) from None
        if kind in K.RANK_KINDS:
            items = p["replies"] if kind in K.RANK else p["prompts"]
            n = len(items)
            ranking, bad = body.get("ranking"), body.get("not_rankable", False)
            if not isinstance(bad, bool):
                raise CollectError("not_rankable: expected true or false", param="not_rankable")
            if bad and ranking in (None, []):
                return {"ranking": [], "not_rankable": True, "ids": []}
            if not isinstance(ranking, list) or any(
                    isinstance(i, bool) or not isinstance(i, int) for i in ranking) or \
                    sorted(ranking) != list(range(n)):
                raise CollectError(f"ranking: expected a permutation of 0..{n - 1} (each of the "
                                   f"{n} candidates' indices once, best first), got "
                                   f"{str(ranking)[:80]}", param="ranking",
                                   code="invalid_ranking")
            return {"ranking": ranking, "not_rankable": bad,
                    "ids": [items[i]["message_id"] for i in ranking]}
        if kind == K.REVIEW_EDIT:
            if not isinstance(body.get("approve"), bool):
                raise CollectError("approve: expected true or false", param="approve")
            return {"approve": body["approve"]}
        raise CollectError(f"unknown task kind {kind!r}")

    def check_text(self, text, param: str) -> str:
        if not isinstance(text, str) or not text.strip():
            raise CollectError(f"{param}: expected a non-empty text", param=param,
                               code="empty_text")
        text = text.strip()
        if len(text) > self.s.max_message_chars:
            raise CollectError(f"{param}: {len(text)} characters; the most is "
                               f"{self.s.max_message_chars} (collect setting max_message_chars)",
                               param=param, code="text_too_long")
        return text

    def _apply(self, t: dict, c: dict, uid: str, out: dict) -> str | None:
        kind, target = t["kind"], t["target_id"]
        if kind == K.INITIAL_PROMPT:
            tree_id = str(uuid.uuid4())
            self.trees.insert_tree(tree_id, "initial_prompt_review", c["lang"], c["tags"],
                                   "homellm", self.s.goal_tree_size, self.s.max_tree_depth,
                                   self.s.max_children_count)
            out["message_id"] = self.trees.insert_message(
                tree_id=tree_id, parent_id=None, depth=0, role="prompter", text=c["text"],
                lang=c["lang"], user_id=uid, author=uid, message_id=tree_id)
            return tree_id
        if kind in K.REPLY:
            parent = self.trees.message(target)
            if parent is None or parent["deleted"]:
                raise CollectError("the message you replied to was deleted meanwhile",
                                   status=409, code="message_deleted")
            out["message_id"] = self.trees.insert_message(
                tree_id=t["tree_id"], parent_id=target, depth=parent["depth"] + 1,
                role=K.REPLY[kind], text=c["text"], lang=c["lang"], user_id=uid, author=uid)
            return t["tree_id"]
        if kind in K.LABEL:
            self._decide(self.trees.add_review(t["id"], target, uid, c["labels"],
                                               t["payload"]["mode"]))
            return t["tree_id"]
        if kind in K.RANK_KINDS:
            self.trees.add_ranking(t["id"], target, uid, c["ids"], c["ranking"],
                                   c["not_rankable"])
            return t["tree_id"]
        if kind == K.REVIEW_EDIT:
            self.trees.vote_edit(target, uid, t["id"], c["approve"])
            self._decide_edit(target)
            return t["tree_id"]
        raise CollectError(f"unknown task kind {kind!r}")

    # ---------------------------------------------------------------- the rules
    def _decide(self, m: dict) -> None:
        """Accept or reject a message once it has its reviews (OA's acceptance)."""
        prompt = m["parent_id"] is None
        if m["review_result"] is not None or m["review_count"] < self.s.reviews_needed(prompt):
            return
        score = L.acceptance(self.trees.reviews([m["id"]]).get(m["id"], []))
        self.trees.set_review_result(m["id"], score > self.s.threshold(prompt))

    def _decide_edit(self, edit_id: str) -> None:
        e = self.trees.edit(edit_id)
        votes = e["approvals"] + e["rejections"]
        if e["status"] != "pending" or votes < self.s.num_reviews_edit:
            return
        if e["approvals"] / votes > self.s.acceptance_threshold_edit:
            m = self.trees.message(e["message_id"])
            self.trees.add_revision(m["id"], m["text"], edit_id)
            self.trees.set_text(m["id"], e["text"])
            self.trees.decide_edit(edit_id, "accepted")
        else:
            self.trees.decide_edit(edit_id, "rejected")

    def _enter(self, tree_id: str, state: str) -> str:
        """Set a tree's state; the reservations that state has no use for are withdrawn
        (edit reviews go on while a tree is ranked and once it is ready). The state."""
        self.trees.set_state(tree_id, state)
        if state in ("ranking", "ready_for_export"):
            self.tasks.cancel_tree(tree_id, keep_kinds=(K.REVIEW_EDIT,) + (
                tuple(K.RANK) if state == "ranking" else ()))
        elif state not in ACTIVE:
            self.tasks.cancel_tree(tree_id)
        return state

    def _update_state(self, tree_id: str, tree: dict | None = None) -> str:
        """Move a tree (locked by the caller) as far along its states as it may go; its
        state then. `tree`: its row as locked, if the caller has it (not read again)."""
        tree = tree or self.trees.tree(tree_id)
        state = tree["state"]
        if state == "initial_prompt_review":
            root = self.trees.message(tree_id)
            if root is None or root["deleted"]:
                return self._enter(tree_id, "halted_by_moderator")
            if root["review_result"] is None:
                return state
            if not root["review_result"]:
                return self._enter(tree_id, "aborted_low_grade")
            state = self._enter(tree_id, "growing")
        if state == "growing":
            accepted, awaiting = self.trees.sizes(tree_id)
            if accepted == 0:   # everything deleted (OA halts such a tree)
                return self._enter(tree_id, "halted_by_moderator")
            if accepted < tree["goal_size"] or awaiting:
                return state
            state = self._enter(tree_id, "ranking")
        if state == "ranking":
            counts = self.trees.ranking_counts(list(self._rankable(tree_id)))
            if any(n < self.s.num_required_rankings for n in counts.values()):
                return state
            self.merge_ranks(tree_id)
            state = self._enter(tree_id, "ready_for_export")
        return state

    def _rankable(self, tree_id: str) -> dict[str, list[str]]:
        """parent id -> its accepted replies, for the parents that need ranking (two or more
        accepted replies of a ranked role), in tree order."""
        roles = ("assistant", "prompter") if self.s.rank_prompter_replies else ("assistant",)
        kids: dict[str, list[str]] = {}
        for m in self.trees.tree_messages(tree_id):
            if m["parent_id"] and not m["deleted"] and m["review_result"] and \
                    m["role"] in roles:
                kids.setdefault(m["parent_id"], []).append(m["id"])
        return {p: ids for p, ids in kids.items() if len(ids) > 1}

    def merge_ranks(self, tree_id: str) -> None:
        """Set `rank` on every ranked set of siblings from its rankings (ranked pairs over
        the replies all rankings share; a majority of "all replies are bad" gives no ranks)."""
        for parent, ids in self._rankable(tree_id).items():
            rs = self.trees.rankings(parent)
            ranks: dict[str, int | None] = {i: None for i in ids}
            bad = sum(r["not_rankable"] for r in rs)
            orders = [[i for i in r["ranked_ids"] if i in ranks] for r in rs if r["ranked_ids"]]
            if orders and bad * 2 <= len(rs):
                for place, mid in enumerate(ranked_pairs(orders)):
                    ranks[mid] = place
            self.trees.set_ranks(ranks)


def _banned() -> CollectError:
    return CollectError("you are banned from contributing (ask a moderator)", status=403,
                        code="banned")


def _tag_list(tags) -> list[str]:
    return json.loads(tags) if isinstance(tags, str) and tags else (tags or [])


def _no_task(task_id: str) -> CollectError:
    return not_found(f"task {task_id}")


def _lang(value, param: str) -> str:
    """A BCP 47-like language tag ('en', 'pt-BR', 'zh-Hans'), or 400."""
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8}){0,3}",
                                                      value):
        raise CollectError(f"{param}: expected a language tag like 'en' or 'pt-BR', got "
                           f"{str(value)[:40]!r}", param=param, code="invalid_lang")
    return value


def _tags(values, param: str) -> list[str]:
    if not isinstance(values, list) or len(values) > MAX_TAGS:
        raise CollectError(f"{param}: expected a list of at most {MAX_TAGS} topics",
                           param=param)
    out = []
    for v in values:
        if not isinstance(v, str) or not v.strip() or len(v.strip()) > MAX_TAG_CHARS:
            raise CollectError(f"{param}: each topic is a text of 1 to {MAX_TAG_CHARS} "
                               f"characters, got {str(v)[:40]!r}", param=param)
        out.append(v.strip().lower())
    return list(dict.fromkeys(out))
