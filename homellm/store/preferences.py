"""What a user prefers: their defaults for new chats, and "which reply is better?" (the Store's
preferences part; migration 009_web_preferences).

    store.set_user_settings(me, {"model": "smollm2:135m", "system_prompt": "Be brief.",
                                 "sampling": {"temperature": 0.7}})
    store.user_settings(me)                     # {} until set
    store.prefer(me, chosen_id, rejected_id)    # two sibling replies: one is better
    store.preferences(me, conversation_id)      # [(chosen_id, rejected_id), ...]
    store.preference_pairs(me)                  # DPO pairs {"prompt", "chosen", "rejected"}

A preference is between two replies to the same user message, stored once per user and pair;
choosing the other one of the same two replaces it. Like every store method, another user's
message ids give None / [] as missing ones do.
"""
from __future__ import annotations

import json

from homellm.errors import HomellmError
from homellm.store.db import now
from homellm.store.people import _uid
from homellm.store.records import User

SETTING_KEYS = ("model", "system_prompt", "sampling")


class Preferences:
    """Mixin of Store: needs `self.db` and the Conversations mixin."""

    # -- defaults for new chats
    def user_settings(self, user: User | str) -> dict:
        r = self.db.one("SELECT settings FROM user_settings WHERE user_id = ?", (_uid(user),))
        return json.loads(r["settings"]) if r else {}

    def set_user_settings(self, user: User | str, settings: dict) -> dict:
        """Replace the user's defaults ({} clears them); keys from SETTING_KEYS only."""
        bad = set(settings) - set(SETTING_KEYS)
        if bad:
            raise HomellmError(f"unknown setting(s) {', '.join(sorted(bad))} (expected "
                               f"{', '.join(SETTING_KEYS)})")
        uid, text, t = _uid(user), json.dumps(settings, sort_keys=True), now()
        with self.db.transaction():
            if self.db.run("UPDATE user_settings SET settings = ?, updated_at = ? "
                           "WHERE user_id = ?", (text, t, uid)) == 0:
                self.db.run("INSERT INTO user_settings (user_id, settings, updated_at) "
                            "VALUES (?, ?, ?)", (uid, text, t))
        return self.user_settings(uid)

    def last_used_model(self, user: User | str) -> str | None:
        """The model of the user's most recently active conversation that names one."""
        r = self.db.one("SELECT model FROM conversations WHERE user_id = ? AND model IS NOT NULL "
                        "ORDER BY updated_at DESC, n DESC LIMIT 1", (_uid(user),))
        return r["model"] if r else None

    # -- "which is better?"
    def prefer(self, user: User | str, chosen_id: str, rejected_id: str) -> tuple[str, str] | None:
        """`chosen_id` is better than `rejected_id` (two replies to one user message); the
        reverse choice, if made before, goes. None if either is not this user's."""
        chosen, rejected = self.get_message(user, chosen_id), self.get_message(user, rejected_id)
        if chosen is None or rejected is None:
            return None
        if chosen.id == rejected.id:
            raise HomellmError("a reply cannot be preferred to itself")
        if chosen.role != "assistant" or rejected.role != "assistant" or \
                chosen.parent_id != rejected.parent_id:
            raise HomellmError("a preference is between two replies to the same message")
        uid = _uid(user)
        with self.db.transaction():
            self.db.run("DELETE FROM preferences WHERE user_id = ? AND ((chosen_id = ? AND "
                        "rejected_id = ?) OR (chosen_id = ? AND rejected_id = ?))",
                        (uid, chosen.id, rejected.id, rejected.id, chosen.id))
            self.db.run("INSERT INTO preferences (user_id, parent_id, chosen_id, rejected_id, "
                        "created_at) VALUES (?, ?, ?, ?, ?)",
                        (uid, chosen.parent_id, chosen.id, rejected.id, now()))
        return chosen.id, rejected.id

    def preferences(self, user: User | str, conversation_id: str) -> list[tuple[str, str]]:
        """This user's (chosen_id, rejected_id) pairs in a conversation, oldest first."""
        rows = self.db.all("SELECT p.chosen_id, p.rejected_id FROM preferences p JOIN messages m "
                           "ON m.id = p.chosen_id JOIN conversations c ON c.id = m.conversation_id "
                           "WHERE c.id = ? AND c.user_id = ? AND p.user_id = ? ORDER BY p.n",
                           (conversation_id, _uid(user), _uid(user)))
        return [(r["chosen_id"], r["rejected_id"]) for r in rows]

    def preference_pairs(self, user: User | str) -> list[dict]:
        """Every preference of the user as a DPO pair (homellm.data.pairs' format): the system
        prompt and the path to the user message, then the chosen and the rejected reply."""
        uid = _uid(user)
        rows = self.db.all("SELECT p.chosen_id, p.rejected_id, c.id AS cid, c.system_prompt "
                           "FROM preferences p JOIN messages m ON m.id = p.chosen_id "
                           "JOIN conversations c ON c.id = m.conversation_id "
                           "WHERE p.user_id = ? AND c.user_id = ? ORDER BY p.n", (uid, uid))
        out = []
        for r in rows:
            chosen = self.get_message(uid, r["chosen_id"])
            rejected = self.get_message(uid, r["rejected_id"])
            prompt = ([{"role": "system", "content": r["system_prompt"]}]
                      if r["system_prompt"] else [])
            prompt += [{"role": m.role, "content": m.content}
                       for m in self.path(uid, chosen.parent_id)]
            out.append({"prompt": prompt,
                        "chosen": [{"role": "assistant", "content": chosen.content}],
                        "rejected": [{"role": "assistant", "content": rejected.content}]})
        return out
