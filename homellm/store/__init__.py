"""The database: conversations as message trees, ratings, users and sessions.

    from homellm.store import open_store
    store = open_store()                        # $HOMELLM_HOME/homellm.db, migrated
    store = open_store("postgresql://me@localhost/homellm")   # the same API on PostgreSQL
    me = store.local_user()                     # no --auth: one local user

    conv = store.create_conversation(me, title="Colors", model="smollm2:135m",
                                     system_prompt="Be brief.", sampling={"temperature": 0.7})
    q = store.add_message(me, conv.id, "user", "Name three colors.", parent_id=None)
    with store.start_reply(me, conv.id, q.id, model="smollm2:135m", seed=1) as w:
        for piece in ("Red", ", green", " and blue."):
            w.append(piece)
        w.finish(finish_reason="stop", prompt_tokens=12, completion_tokens=6)
    again = store.start_reply(me, conv.id, q.id)      # regenerate: a sibling of the first
    edit = store.edit_message(me, q.id, "Name four colors.")   # a new branch
    turns = store.branch(me, conv.id)           # root..current leaf: Turn(message, sibling_ids,
                                                #   index, rating) for the `< 2/3 >` arrows
    store.select(me, sibling_id)                # walk to another branch (remembered)
    store.rate(me, reply_id, +1, "clear")       # -1 down, 0 removes
    store.search(me, "colors")                  # [SearchHit(conversation_id, title, ...)]
    store.delete_branch(me, reply_id)           # a message and all below it
    store.prefer(me, better_id, worse_id)       # sibling replies (preferences.py)

People (for --auth): create_user, login (argon2id, rate limited: LoginLocked), session(token),
logout, set_share_feedback; shared_feedback(admin) for the admin's export. Every
conversation and message method takes the user first and returns None / [] / False for rows
of another user, as for missing ones.

Oasst export/import of whole conversations: homellm.data.oasst.export_trees / import_trees,
over dump_conversation and restore_conversation here.
"""
from __future__ import annotations

from pathlib import Path

from homellm.store.conversations import Conversations
from homellm.store.db import Database, default_url
from homellm.store.people import AuthConfig, LoginLocked, People
from homellm.store.preferences import Preferences
from homellm.store.records import (Conversation, ConversationDump, Message, Rating, SearchHit,
                                   Session, Turn, User)
from homellm.store.streaming import ReplyWriter

__all__ = ["Store", "open_store", "AuthConfig", "LoginLocked", "ReplyWriter", "Conversation",
           "ConversationDump", "Message", "Rating", "SearchHit", "Session", "Turn", "User",
           "default_url"]


class Store(People, Conversations, Preferences):
    """One database (SQLite or PostgreSQL), migrated on open. Safe to share between threads."""

    def __init__(self, url: str | Path | None = None, *, auth: AuthConfig | None = None,
                 migrate: bool = True):
        self.db = Database(url)
        self.auth = auth or AuthConfig()
        if migrate:
            self.db.migrate()

    @property
    def url(self) -> str:
        return self.db.url

    def close(self) -> None:
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def start_reply(self, user: User | str, conversation_id: str, parent_id: str, *,
                    model: str | None = None, sampling: dict | None = None,
                    seed: int | None = None, flush_tokens: int = 16,
                    flush_s: float = 0.5) -> ReplyWriter | None:
        """An assistant reply under the user message `parent_id`, created now (empty and
        incomplete) and saved as it streams; see streaming.py. None if not this user's."""
        m = self.add_message(user, conversation_id, "assistant", "", parent_id=parent_id,
                             model=model, sampling=sampling, seed=seed, incomplete=True)
        if m is None:
            return None
        return ReplyWriter(self, m, flush_tokens=flush_tokens, flush_s=flush_s)


    def continue_reply(self, user: User | str, message_id: str, *, flush_tokens: int = 16,
                       flush_s: float = 0.5) -> ReplyWriter | None:
        """A writer that appends to the assistant reply `message_id` (Continue); None if not
        this user's (HomellmError for a user message)."""
        from homellm.errors import HomellmError
        m = self.get_message(user, message_id)
        if m is None:
            return None
        if m.role != "assistant":
            raise HomellmError("only a reply can be continued")
        return ReplyWriter.resume(self, m, flush_tokens=flush_tokens, flush_s=flush_s)


def open_store(url: str | Path | None = None, **kwargs) -> Store:
    """The store at `url` (default `$HOMELLM_HOME/homellm.db`), migrated to this version."""
    return Store(url, **kwargs)
