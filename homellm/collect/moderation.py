"""What volunteers do beside tasks (reports, emojis, edit proposals) and what moderators do
(halt trees, delete messages, ban users, see a user's history, add a model's reply), plus
the leaderboards. A mixin of TreeManager (tree_manager.py), which has the state rules.

- Report: a reason and OA's red flag on the message; `auto_mod_red_flags` flags delete a
  reply with everything below it, or abort a tree whose prompt they flag (OA's auto-mod).
- Emojis: OA's codes (+1, -1, 100, rofl, clap, diamond, heart_eyes, disappointed, poop,
  skull), toggled per volunteer; they are exported as the messages' `emojis` counts.
- Edit proposal: a new text for a message, voted on by `num_reviews_edit` other volunteers
  (task review_edit); more than `acceptance_threshold_edit` approvals apply it, keeping the
  old text as a revision.
- Roles: volunteer < moderator < admin. Moderators halt and resume trees, delete messages,
  ban and unban volunteers (not moderators or admins), see a user's history, the trees, the
  reports and the trollboard, and add a model's reply; only an admin sets roles.
"""
from __future__ import annotations

from homellm.collect import points
from homellm.collect.errors import CollectError, not_found
from homellm.store.collect_stats import CollectStats
from homellm.store.collect_trees import ROLES

ROLE_RANK = {"volunteer": 0, "moderator": 1, "admin": 2}
EMOJIS = ("+1", "-1", "100", "rofl", "clap", "diamond", "heart_eyes", "disappointed", "poop",
          "skull")
MAX_REASON = 2000


class Moderation:
    # ---------------------------------------------------------------- volunteers
    def _live_message(self, message_id: str) -> dict:
        m = self.trees.message(message_id)
        if m is None or m["deleted"]:
            raise not_found(f"message {message_id}")
        return m

    def report(self, user, message_id: str, reason: str) -> dict:
        """Report a message (red flag + reason); auto-moderation may remove it."""
        uid = self._active(user)
        if not isinstance(reason, str) or not reason.strip() or len(reason) > MAX_REASON:
            raise CollectError(f"reason: expected a text of 1 to {MAX_REASON} characters",
                               param="reason")
        m = self._live_message(message_id)
        with self._tx():
            self.trees.lock_tree(m["tree_id"])
            rid = self.trees.add_report(message_id, uid, reason.strip())
            self.trees.add_emoji(message_id, uid, "red_flag")
            flags = self.trees.emoji_count(message_id, "red_flag")
            removed = flags >= self.s.auto_mod_red_flags
            if removed:
                if m["parent_id"] is None:
                    self._enter(m["tree_id"], "aborted_low_grade")
                else:
                    self._delete(m)
                self.trees.log(None, "auto_moderation", message_id, {"red_flags": flags})
        return {"report_id": rid, "red_flags": flags, "removed": removed}

    def emoji(self, user, message_id: str, emoji: str, op: str = "toggle") -> dict:
        uid = self._active(user)
        if emoji not in EMOJIS:
            raise CollectError(f"emoji {emoji!r}: expected one of {', '.join(EMOJIS)} (report "
                               "a message to flag it)", param="emoji")
        if op not in ("toggle", "add", "remove"):
            raise CollectError(f"op {op!r}: expected toggle, add or remove", param="op")
        self._live_message(message_id)
        on = op == "add" or (op == "toggle" and not self.trees.remove_emoji(message_id, uid,
                                                                              emoji))
        if on:
            self.trees.add_emoji(message_id, uid, emoji)
        elif op == "remove":
            self.trees.remove_emoji(message_id, uid, emoji)
        return {"emoji": emoji, "on": on,
                "emojis": self.trees.emoji_counts([message_id]).get(message_id, {})}

    def propose_edit(self, user, message_id: str, text: str) -> dict:
        uid = self._active(user)
        text = self.check_text(text, "text")
        m = self._live_message(message_id)
        tree = self.trees.tree(m["tree_id"])
        if tree["state"] in ("aborted_low_grade", "halted_by_moderator"):
            raise CollectError(f"the tree of message {message_id} is {tree['state']}: no edits",
                               status=409, code="tree_closed")
        if text == m["text"]:
            raise CollectError("text: the proposal is the message's text unchanged",
                               param="text", code="unchanged")
        with self._tx():
            self.trees.lock_tree(m["tree_id"])
            eid = self.trees.add_edit(message_id, m["tree_id"], uid, text)
        return {"edit_id": eid, "status": "pending"}

    # ---------------------------------------------------------------- a model's reply
    def synthetic_context(self, user, parent_id: str) -> list[dict]:
        """The conversation (OpenAI messages) a model's reply to `parent_id` continues;
        CollectError unless a moderator may add one there now."""
        self.require(user, "moderator")
        m = self._live_message(parent_id)
        self._check_synthetic_slot(m)
        return [{"role": "user" if x["role"] == "prompter" else "assistant",
                 "content": x["text"]} for x in self.trees.path(parent_id)]

    def _check_synthetic_slot(self, m: dict) -> dict:
        tree = self.trees.tree(m["tree_id"])
        if tree["state"] != "growing":
            raise CollectError(f"the tree is {tree['state']}; a model's reply joins a growing "
                               "tree", status=409, code="tree_not_growing")
        if m["role"] != "prompter" or not m["review_result"]:
            raise CollectError("a model's reply answers an accepted prompter message",
                               status=409, code="not_a_prompt")
        if m["depth"] >= tree["max_depth"]:
            raise CollectError("the tree is as deep as it may grow there", status=409,
                               code="too_deep")
        if len([c for c in self.trees.children(m["id"]) if c["review_result"] is not False]) \
                >= tree["max_children"]:
            raise CollectError(f"message {m['id']} has its {tree['max_children']} replies",
                               status=409, code="enough_replies")
        return tree

    def add_synthetic(self, user, parent_id: str, text: str, model_name: str) -> dict:
        """Store a model's reply (synthetic, with its model name) under `parent_id`; it is
        reviewed and ranked like everyone's."""
        uid = self.require(user, "moderator")
        text = self.check_text(text, "text")
        m = self._live_message(parent_id)
        with self._tx():
            self.trees.lock_tree(m["tree_id"])
            tree = self._check_synthetic_slot(self.trees.message(parent_id))
            mid = self.trees.insert_message(
                tree_id=m["tree_id"], parent_id=parent_id, depth=m["depth"] + 1,
                role="assistant", text=text, lang=m["lang"] or tree["lang"], user_id=None,
                author=None, synthetic=True, model_name=model_name)
            self.trees.log(uid, "synthetic_reply", mid, {"model": model_name})
        return {"message_id": mid, "model_name": model_name}

    # ---------------------------------------------------------------- moderators
    def halt(self, user, tree_id: str, halt: bool = True) -> dict:
        uid = self.require(user, "moderator")
        with self._tx():
            tree = self.trees.lock_tree(tree_id)
            if tree is None:
                raise not_found(f"tree {tree_id}")
            if halt:
                self._enter(tree_id, "halted_by_moderator")
            elif tree["state"] == "halted_by_moderator":
                root = self.trees.message(tree_id)
                self._enter(tree_id, "growing" if root and root["review_result"] else
                            "initial_prompt_review")
                self._update_state(tree_id)
            self.trees.log(uid, "halt" if halt else "resume", tree_id)
            return {"tree_id": tree_id, "state": self.trees.tree(tree_id)["state"]}

    def delete_message(self, user, message_id: str) -> dict:
        uid = self.require(user, "moderator")
        m = self.trees.message(message_id)
        if m is None:
            raise not_found(f"message {message_id}")
        with self._tx():
            self.trees.lock_tree(m["tree_id"])
            ids = self._delete(m)
            self.trees.resolve_reports(message_id, uid)
            self.trees.log(uid, "delete", message_id, {"messages": len(ids)})
        return {"deleted": ids, "tree": {"id": m["tree_id"],
                                         "state": self.trees.tree(m["tree_id"])["state"]}}

    def _delete(self, m: dict) -> list[str]:
        """Delete a message and its subtree (tree locked): their tasks are withdrawn, the
        tree moves on (a deleted prompt halts it), ranks are merged again."""
        ids = self.trees.delete_subtree(m["id"])
        self.tasks.cancel_tree(m["tree_id"], ids)
        if m["parent_id"] is None:
            self._enter(m["tree_id"], "halted_by_moderator")
        else:
            self._update_state(m["tree_id"])
            if self.trees.tree(m["tree_id"])["state"] == "ready_for_export":
                self.merge_ranks(m["tree_id"])
        return ids

    def _target_user(self, username: str) -> dict:
        u = self.trees.user(username)
        if u is None:
            raise not_found(f"user {username!r}")
        return u

    def ban(self, user, username: str, banned: bool = True) -> dict:
        uid = self.require(user, "moderator")
        target = self._target_user(username)
        mine = self.role(uid)
        if ROLE_RANK[target["role"]] >= ROLE_RANK[mine] and target["id"] != uid:
            raise CollectError(f"{username!r} is a{'n' if target['role'] == 'admin' else ''} "
                               f"{target['role']}: a {mine} cannot ban them", status=403,
                               code="not_allowed")
        if target["id"] == uid:
            raise CollectError("you cannot ban yourself", status=403, code="not_allowed")
        with self._tx():
            self.trees.set_banned(target["id"], banned)
            cancelled = self.tasks.cancel_user(target["id"]) if banned else 0
            self.trees.log(uid, "ban" if banned else "unban", target["id"])
        return {"username": username, "banned": banned, "tasks_cancelled": cancelled}

    def set_role(self, user, username: str, role: str) -> dict:
        uid = self.require(user, "admin")
        if role not in ROLES:
            raise CollectError(f"role {role!r}: expected one of {', '.join(ROLES)}",
                               param="role")
        target = self._target_user(username)
        if target["id"] == uid and role != "admin":
            raise CollectError("you cannot take your own admin role", status=403,
                               code="not_allowed")
        self.trees.set_role(target["id"], role)
        self.trees.log(uid, "role", target["id"], {"role": role})
        return {"username": username, "role": self.role(target["id"])}

    def history(self, user, username: str) -> dict:
        self.require(user, "moderator")
        target = self._target_user(username)
        uid = target["id"]
        return {"user": target,
                "messages": [{k: m[k] for k in ("id", "tree_id", "parent_id", "role", "text",
                                                 "lang", "review_count", "review_result",
                                                 "deleted", "rank", "created_at")}
                             for m in self.trees.messages_of_user(uid)],
                "reviews": self.trees.reviews_by_user(uid),
                "rankings": self.trees.rankings_by_user(uid),
                "edits": self.trees.edits(user_id=uid),
                "reports_about": [r for r in self.trees.reports(open_only=False, limit=1000)
                                  if self.trees.message(r["message_id"])["user_id"] == uid],
                "tasks": {k: v for k, v in self.db.one(
                    "SELECT COUNT(CASE WHEN status = 'done' THEN 1 END) AS done, "
                    "COUNT(CASE WHEN status = 'skipped' THEN 1 END) AS skipped FROM "
                    "collect_tasks WHERE user_id = ?", (uid,)).items()}}

    def tree_list(self, user, state: str | None = None, limit: int = 100,
                  offset: int = 0) -> list[dict]:
        self.require(user, "moderator")
        return self.trees.trees([state] if state else None, limit=limit, offset=offset)

    def tree_view(self, user, tree_id: str) -> dict:
        """A tree with every message (deleted ones too), its reviews' labels, emojis,
        rankings and edit proposals, for moderators."""
        from homellm.data.oasst_collect import aggregate
        self.require(user, "moderator")
        tree = self.trees.tree(tree_id)
        if tree is None:
            raise not_found(f"tree {tree_id}")
        ms = self.trees.tree_messages(tree_id)
        ids = [m["id"] for m in ms]
        reviews, emojis = self.trees.reviews(ids), self.trees.emoji_counts(ids)
        rankings, names = self.trees.rankings_in(ids), self.trees.usernames()
        return {"tree": tree, "messages": [
            {**{k: m[k] for k in ("id", "parent_id", "depth", "role", "text", "lang",
                                  "review_count", "review_result", "deleted", "rank",
                                  "ranking_count", "synthetic", "model_name", "created_at")},
             "username": names.get(m["user_id"]), "labels": aggregate(reviews.get(m["id"], [])),
             "emojis": emojis.get(m["id"], {}), "rankings": len(rankings.get(m["id"], [])),
             "edits": self.trees.edits(message_id=m["id"])} for m in ms]}

    def reports(self, user, open_only: bool = True) -> list[dict]:
        self.require(user, "moderator")
        return self.trees.reports(open_only=open_only)

    # ---------------------------------------------------------------- boards
    def leaderboard(self, time_frame: str = "total", limit: int = 100) -> list[dict]:
        since = self._frame(time_frame)
        names = self.trees.usernames()
        scores = [points.UserScore(u, names.get(u, "?"), **d) for u, d in
                  CollectStats(self.db).contributions(since).items()]
        return points.ranked(scores, "leader_score")[:limit]

    def trollboard(self, user, time_frame: str = "total", limit: int = 100) -> list[dict]:
        self.require(user, "moderator")
        since = self._frame(time_frame)
        names = self.trees.usernames()
        scores = [points.TrollScore(u, names.get(u, "?"), **d) for u, d in
                  CollectStats(self.db).troll_counts(since).items()]
        return points.ranked(scores, "troll_score")[:limit]

    @staticmethod
    def _frame(time_frame: str) -> str | None:
        try:
            return points.since(time_frame)
        except ValueError as e:
            raise CollectError(str(e), param="time_frame") from None

