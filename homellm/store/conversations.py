"""Conversations as message trees, ratings and search (the Store's conversation half).

Every method takes the user first and sees only that user's rows: another user's id gives
None (or False, or []), exactly as a missing one does, so the HTTP layer answers 404.
Nothing is overwritten: `edit_message` and regenerating (a new reply under the same parent)
add siblings. Conversation settings (title, model, system prompt, sampling) and ratings are
the only things that change in place.
"""
from __future__ import annotations

import json
import uuid

from homellm.errors import HomellmError
from homellm.store.db import now
from homellm.store.dialect import query_words
from homellm.store.people import _uid
from homellm.store.records import (Conversation, ConversationDump, Message, Rating, SearchHit,
                                   Turn, User)

ROLES = ("user", "assistant")
SETTINGS = ("title", "model", "system_prompt", "sampling")
REPLY_FIELDS = ("model", "sampling", "seed", "prompt_tokens", "completion_tokens", "timings",
                "finish_reason", "incomplete", "meta")
_JSON = ("sampling", "timings", "meta")


def _dumps(value):
    return json.dumps(value, sort_keys=True) if value is not None else None


def new_id() -> str:
    return uuid.uuid4().hex


class Conversations:
    """Mixin of Store: needs `self.db`."""

    # -- conversations
    def create_conversation(self, user: User | str, *, title: str = "", model: str | None = None,
                            system_prompt: str | None = None,
                            sampling: dict | None = None,
                            first_message: str | None = None) -> Conversation:
        """A new conversation; with `first_message`, its first user message too, in the same
        transaction (the message is the new conversation's `current_leaf_id`)."""
        cid, t = new_id(), now()
        with self.db.transaction():
            self.db.run("INSERT INTO conversations (id, user_id, title, model, system_prompt, "
                        "sampling, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (cid, _uid(user), title or "", model, system_prompt, _dumps(sampling),
                         t, t))
            if first_message is not None:
                self.add_message(user, cid, "user", first_message, parent_id=None)
        return self.get_conversation(user, cid)

    def get_conversation(self, user: User | str, conversation_id: str) -> Conversation | None:
        r = self.db.one("SELECT * FROM conversations WHERE id = ? AND user_id = ?",
                        (conversation_id, _uid(user)))
        return Conversation.from_row(r) if r else None

    def list_conversations(self, user: User | str, *, limit: int = 100,
                           offset: int = 0) -> list[Conversation]:
        """Newest activity first."""
        rows = self.db.all("SELECT * FROM conversations WHERE user_id = ? "
                           "ORDER BY updated_at DESC, n DESC LIMIT ? OFFSET ?",
                           (_uid(user), int(limit), int(offset)))
        return [Conversation.from_row(r) for r in rows]

    def update_conversation(self, user: User | str, conversation_id: str,
                            **settings) -> Conversation | None:
        """Change title / model / system_prompt / sampling; None if not this user's."""
        bad = set(settings) - set(SETTINGS)
        if bad:
            raise HomellmError(f"cannot change {', '.join(sorted(bad))} of a conversation "
                               f"(only {', '.join(SETTINGS)})")
        if settings:
            values = [(_dumps(v) if k == "sampling" else (v or "") if k == "title" else v)
                      for k, v in settings.items()]
            sets = ", ".join(f"{k} = ?" for k in settings)
            self.db.run(f"UPDATE conversations SET {sets}, updated_at = ? "
                        "WHERE id = ? AND user_id = ?",
                        (*values, now(), conversation_id, _uid(user)))
        return self.get_conversation(user, conversation_id)

    def delete_conversation(self, user: User | str, conversation_id: str) -> bool:
        """Delete it with its messages and ratings; False if not this user's."""
        return self.db.run("DELETE FROM conversations WHERE id = ? AND user_id = ?",
                           (conversation_id, _uid(user))) > 0

    # -- messages
    def messages(self, user: User | str, conversation_id: str) -> list[Message]:
        """Every message of the conversation, oldest first ([] if not this user's)."""
        rows = self.db.all("SELECT m.* FROM messages m JOIN conversations c "
                           "ON c.id = m.conversation_id WHERE c.id = ? AND c.user_id = ? "
                           "ORDER BY m.n", (conversation_id, _uid(user)))
        return [Message.from_row(r) for r in rows]

    def get_message(self, user: User | str, message_id: str) -> Message | None:
        r = self.db.one("SELECT m.* FROM messages m JOIN conversations c "
                        "ON c.id = m.conversation_id WHERE m.id = ? AND c.user_id = ?",
                        (message_id, _uid(user)))
        return Message.from_row(r) if r else None

    def add_message(self, user: User | str, conversation_id: str, role: str, content: str, *,
                    parent_id: str | None, **reply) -> Message | None:
        """Append a message under `parent_id` (None: a new root) and make it the current leaf.

        `reply`: model, sampling, seed, prompt_tokens, completion_tokens, timings,
        finish_reason, incomplete (assistant messages). Roles alternate from a user root.
        None if the conversation is not this user's.
        """
        bad = set(reply) - set(REPLY_FIELDS)
        if bad:
            raise HomellmError(f"unknown message field(s): {', '.join(sorted(bad))}")
        if role not in ROLES:
            raise HomellmError(f"message role {role!r}: expected 'user' or 'assistant'")
        if not isinstance(content, str):
            raise HomellmError("message content: expected a string")
        with self.db.transaction():
            if self.get_conversation(user, conversation_id) is None:
                return None
            if parent_id is None:
                if role != "user":
                    raise HomellmError("a conversation starts with a user message")
            else:
                parent = self.db.one("SELECT role FROM messages WHERE id = ? AND "
                                     "conversation_id = ?", (parent_id, conversation_id))
                if parent is None:
                    raise HomellmError(f"parent message {parent_id} is not in conversation "
                                       f"{conversation_id}")
                if parent["role"] == role:
                    raise HomellmError(f"a {role} message cannot follow a {role} message "
                                       "(roles alternate)")
            return self._insert_message(conversation_id, new_id(), parent_id, role, content,
                                        reply)

    def _insert_message(self, conversation_id, mid, parent_id, role, content, reply,
                        created_at: str | None = None, set_leaf: bool = True) -> Message:
        t = now()
        values = {k: (_dumps(reply.get(k)) if k in _JSON else reply.get(k)) for k in REPLY_FIELDS}
        values["incomplete"] = bool(values["incomplete"])
        cols = ", ".join(values)
        self.db.run(f"INSERT INTO messages (id, conversation_id, parent_id, role, content, "
                    f"{cols}, created_at, updated_at) VALUES "
                    f"(?, ?, ?, ?, ?, {', '.join('?' * len(values))}, ?, ?)",
                    (mid, conversation_id, parent_id, role, content, *values.values(),
                     created_at or t, t))
        if set_leaf:
            self.db.run("UPDATE conversations SET current_leaf_id = ?, updated_at = ? "
                        "WHERE id = ?", (mid, t, conversation_id))
        return Message.from_row(self.db.one("SELECT * FROM messages WHERE id = ?", (mid,)))

    def edit_message(self, user: User | str, message_id: str, content: str) -> Message | None:
        """The edit as a new sibling (same parent and role); the original stays."""
        m = self.get_message(user, message_id)
        if m is None:
            return None
        return self.add_message(user, m.conversation_id, m.role, content, parent_id=m.parent_id)

    # -- the tree
    def children(self, user: User | str, message_id: str) -> list[Message]:
        rows = self.db.all("SELECT m.* FROM messages m JOIN conversations c "
                           "ON c.id = m.conversation_id WHERE m.parent_id = ? AND c.user_id = ? "
                           "ORDER BY m.n", (message_id, _uid(user)))
        return [Message.from_row(r) for r in rows]

    def siblings(self, user: User | str, message_id: str) -> list[Message]:
        """The message and its siblings (same parent, or the conversation's roots), oldest first."""
        m = self.get_message(user, message_id)
        if m is None:
            return []
        return [x for x in self.messages(user, m.conversation_id) if x.parent_id == m.parent_id]

    def path(self, user: User | str, message_id: str) -> list[Message]:
        """Root ... message_id ([] if not this user's)."""
        m = self.get_message(user, message_id)
        if m is None:
            return []
        by_id = {x.id: x for x in self.messages(user, m.conversation_id)}
        out = [by_id[message_id]]
        while out[-1].parent_id is not None:
            out.append(by_id[out[-1].parent_id])
        return out[::-1]

    def leaf_below(self, user: User | str, message_id: str) -> str | None:
        """The leaf reached from a message by always taking its newest reply."""
        m = self.get_message(user, message_id)
        if m is None:
            return None
        kids: dict[str | None, list[Message]] = {}
        for x in self.messages(user, m.conversation_id):
            kids.setdefault(x.parent_id, []).append(x)
        while kids.get(m.id):
            m = kids[m.id][-1]
        return m.id

    def branch(self, user: User | str, conversation_id: str,
               leaf_id: str | None = None) -> list[Turn]:
        """The branch to show: root ... leaf (default the current leaf), with sibling info and
        this user's ratings. [] for an empty conversation or another user's."""
        conv = self.get_conversation(user, conversation_id)
        if conv is None:
            return []
        msgs = self.messages(user, conversation_id)
        if not msgs:
            return []
        by_id = {m.id: m for m in msgs}
        leaf = leaf_id or conv.current_leaf_id
        if leaf not in by_id:
            if leaf_id is not None:
                raise HomellmError(f"message {leaf_id} is not in conversation {conversation_id}")
            leaf = msgs[-1].id
        kids: dict[str | None, list[str]] = {}
        for m in msgs:
            kids.setdefault(m.parent_id, []).append(m.id)
        mine = self.ratings(user, conversation_id)
        turns, cur = [], by_id[leaf]
        while True:
            sib = kids[cur.parent_id]
            turns.append(Turn(cur, sib, sib.index(cur.id), mine.get(cur.id)))
            if cur.parent_id is None:
                break
            cur = by_id[cur.parent_id]
        return turns[::-1]

    def select(self, user: User | str, message_id: str) -> list[Turn]:
        """Show the branch through `message_id` (its newest replies below): what `< 2/3 >` does.
        The leaf is remembered for the next load. [] if not this user's."""
        leaf = self.leaf_below(user, message_id)
        if leaf is None:
            return []
        m = self.get_message(user, leaf)
        self.db.run("UPDATE conversations SET current_leaf_id = ? WHERE id = ? AND user_id = ?",
                    (leaf, m.conversation_id, _uid(user)))
        return self.branch(user, m.conversation_id, leaf)

    def branch_size(self, user: User | str, message_id: str) -> int | None:
        """How many messages `delete_branch` would remove (the message and all below it)."""
        m = self.get_message(user, message_id)
        if m is None:
            return None
        kids: dict[str | None, list[str]] = {}
        for x in self.messages(user, m.conversation_id):
            kids.setdefault(x.parent_id, []).append(x.id)
        n, todo = 0, [m.id]
        while todo:
            n += 1
            todo.extend(kids.get(todo.pop(), []))
        return n

    def delete_branch(self, user: User | str, message_id: str) -> int | None:
        """Delete a message with everything below it (its ratings too); how many messages went,
        None if not this user's. A shown branch inside it moves to the nearest sibling's newest
        leaf (the one before, else after), else to the parent."""
        m = self.get_message(user, message_id)
        if m is None:
            return None
        n = self.branch_size(user, message_id)
        siblings = [x.id for x in self.siblings(user, message_id)]
        at = siblings.index(m.id)
        others = siblings[:at][::-1] + siblings[at + 1:]
        with self.db.transaction():
            conv = self.get_conversation(user, m.conversation_id)
            inside = conv.current_leaf_id is not None and (
                conv.current_leaf_id == m.id or m.id in [x.id for x in
                                                         self.path(user, conv.current_leaf_id)])
            self.db.run("DELETE FROM messages WHERE id = ?", (m.id,))  # children: ON DELETE CASCADE
            if inside:
                leaf = self.leaf_below(user, others[0]) if others else m.parent_id
                self.db.run("UPDATE conversations SET current_leaf_id = ?, updated_at = ? "
                            "WHERE id = ?", (leaf, now(), m.conversation_id))
        return n

    # -- ratings
    def rate(self, user: User | str, message_id: str, value: int | None,
             comment: str | None = None) -> Rating | None:
        """Thumbs up (+1) or down (-1) with an optional comment; 0 or None removes the vote,
        keeping a comment on its own (a Rating with value 0). The user rates messages of their
        own conversations. None if not found (or nothing is left)."""
        if value not in (1, -1, 0, None):
            raise HomellmError(f"rating {value!r}: expected +1, -1, or 0 to remove it")
        m = self.get_message(user, message_id)
        if m is None:
            return None
        if m.role != "assistant":
            raise HomellmError("only assistant messages can be rated")
        uid, t = _uid(user), now()
        if not value:
            with self.db.transaction():
                self.db.run("DELETE FROM ratings WHERE message_id = ? AND user_id = ?",
                            (message_id, uid))
                self.db.run("DELETE FROM message_comments WHERE message_id = ? AND user_id = ?",
                            (message_id, uid))
                if comment:
                    self.db.run("INSERT INTO message_comments (message_id, user_id, comment, "
                                "created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
                                (message_id, uid, comment, t, t))
            return Rating(message_id, uid, 0, comment, t, t) if comment else None
        with self.db.transaction():
            self.db.run("DELETE FROM message_comments WHERE message_id = ? AND user_id = ?",
                        (message_id, uid))
            if self.db.run("UPDATE ratings SET value = ?, comment = ?, updated_at = ? "
                           "WHERE message_id = ? AND user_id = ?",
                           (value, comment or None, t, message_id, uid)) == 0:
                self.db.run("INSERT INTO ratings (message_id, user_id, value, comment, "
                            "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                            (message_id, uid, value, comment or None, t, t))
        r = self.db.one("SELECT * FROM ratings WHERE message_id = ? AND user_id = ?",
                        (message_id, uid))
        return Rating.from_row(r)

    def ratings(self, user: User | str, conversation_id: str) -> dict[str, Rating]:
        """This user's ratings in a conversation, by message id."""
        rows = self.db.all("SELECT r.* FROM ratings r JOIN messages m ON m.id = r.message_id "
                           "JOIN conversations c ON c.id = m.conversation_id "
                           "WHERE c.id = ? AND c.user_id = ? AND r.user_id = ? ORDER BY r.n",
                           (conversation_id, _uid(user), _uid(user)))
        out = {r["message_id"]: Rating.from_row(r) for r in rows}
        notes = self.db.all("SELECT k.* FROM message_comments k JOIN messages m "
                            "ON m.id = k.message_id WHERE m.conversation_id = ? AND k.user_id = ?",
                            (conversation_id, _uid(user)))
        for r in notes:  # a comment without a vote: value 0
            out.setdefault(r["message_id"], Rating(r["message_id"], r["user_id"], 0, r["comment"],
                                                   r["created_at"], r["updated_at"]))
        return out

    # -- search
    def search(self, user: User | str, query: str, *, limit: int = 20) -> list[SearchHit]:
        """Conversations whose title or a message has every query word (as a word prefix, any
        case), newest first; one hit per conversation (the title, else its first message)."""
        words = query_words(query)
        if not words:
            return []
        d, uid = self.db.dialect, _uid(user)
        param = d.match_param(words)
        titles = self.db.all(f"SELECT c.id, c.title, c.updated_at FROM conversations c "
                             f"WHERE c.user_id = ? AND {d.match_sql('title')}", (uid, param))
        texts = self.db.all(f"SELECT c.id, c.title, c.updated_at, m.id AS message_id, m.content "
                            f"FROM messages m JOIN conversations c ON c.id = m.conversation_id "
                            f"WHERE c.user_id = ? AND {d.match_sql('message')} ORDER BY m.n",
                            (uid, param))
        hits: dict[str, SearchHit] = {}
        for r in titles:
            hits[r["id"]] = SearchHit(r["id"], r["title"], None, r["title"], r["updated_at"])
        for r in texts:
            if r["id"] not in hits:
                hits[r["id"]] = SearchHit(r["id"], r["title"], r["message_id"],
                                          _snippet(r["content"], words), r["updated_at"])
        return sorted(hits.values(), key=lambda h: h.updated_at, reverse=True)[:limit]

    # -- whole conversations (export, import, the admin's feedback export)
    def dump_conversation(self, user: User | str, conversation_id: str) -> ConversationDump | None:
        conv = self.get_conversation(user, conversation_id)
        if conv is None:
            return None
        rows = self.db.all("SELECT r.* FROM ratings r JOIN messages m ON m.id = r.message_id "
                           "WHERE m.conversation_id = ? ORDER BY r.n", (conversation_id,))
        return ConversationDump(conv, self.get_user(conv.user_id),
                                self.messages(user, conversation_id),
                                [Rating.from_row(r) for r in rows])

    def shared_feedback(self, admin: User) -> list[ConversationDump]:
        """Every rated conversation of the users who opted in to share feedback (admins only)."""
        if not (isinstance(admin, User) and admin.is_admin):
            raise HomellmError("only an admin can export everyone's shared feedback")
        rows = self.db.all("SELECT DISTINCT c.id, c.user_id, c.n FROM conversations c "
                           "JOIN users u ON u.id = c.user_id "
                           "JOIN messages m ON m.conversation_id = c.id "
                           "JOIN ratings r ON r.message_id = m.id "
                           "WHERE u.share_feedback = ? ORDER BY c.n", (True,))
        return [self.dump_conversation(r["user_id"], r["id"]) for r in rows]

    def restore_conversation(self, user: User | str, conversation: dict, messages: list[dict],
                             ratings: list[dict]) -> Conversation:
        """Insert a whole conversation in one transaction (an import): all of it or nothing.

        `conversation`: title, model, system_prompt, sampling, current_leaf_id, created_at.
        `messages`: dicts with id, parent_id, role, content, created_at and REPLY_FIELDS,
        parents before children. `ratings`: message_id, user_id (None: anonymous), value,
        comment. Ids already in the database are replaced by new ones (consistently).
        """
        uid = _uid(user)
        with self.db.transaction():
            ids = [m["id"] for m in messages]
            taken = set()
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                taken |= {r["id"] for r in self.db.all(
                    f"SELECT id FROM messages WHERE id IN ({', '.join('?' * len(chunk))})",
                    tuple(chunk))}
            remap = {i: (new_id() if i in taken else i) for i in ids}
            conv = self.create_conversation(uid, **{k: conversation.get(k) for k in SETTINGS})
            for m in messages:
                if m["parent_id"] is not None and m["parent_id"] not in remap:
                    raise HomellmError(f"message {m['id']}: parent {m['parent_id']} is missing")
                self._insert_message(conv.id, remap[m["id"]], remap.get(m["parent_id"]),
                                     m["role"], m["content"], m, created_at=m.get("created_at"),
                                     set_leaf=False)
            for r in ratings:
                t = now()
                self.db.run("INSERT INTO ratings (message_id, user_id, value, comment, "
                            "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                            (remap[r["message_id"]], r.get("user_id"), r["value"],
                             r.get("comment"), t, t))
            leaf = remap.get(conversation.get("current_leaf_id")) or (remap[ids[-1]] if ids
                                                                     else None)
            self.db.run("UPDATE conversations SET current_leaf_id = ?, created_at = ?, "
                        "updated_at = ? WHERE id = ?",
                        (leaf, conversation.get("created_at") or conv.created_at,
                         conversation.get("updated_at") or conv.updated_at, conv.id))
        return self.get_conversation(uid, conv.id)


def _snippet(text: str, words: list[str], width: int = 80) -> str:
    """About `width` characters of `text` around the first query word."""
    low = text.lower()
    hits = [i for i in (low.find(w) for w in words) if i >= 0]
    at = min(hits) if hits else 0
    start = max(0, at - width // 3)
    piece = text[start:start + width].replace("\n", " ")
    return ("…" if start else "") + piece + ("…" if start + width < len(text) else "")
