"""Writing a reply while it streams: created incomplete, saved as it grows, finalized at the end.

    writer = store.start_reply(user, conversation_id, parent_id, model="smollm2:135m",
                               sampling={...}, seed=1)
    with writer:
        for step in model.chat(...):
            writer.append(step.text)           # saved every `flush_tokens` pieces or `flush_s`
        writer.finish(finish_reason="stop", prompt_tokens=.., completion_tokens=.., timings=..)

The row exists (content '', incomplete) from the start, in the same transaction that makes it
the conversation's current leaf. Each save is one small UPDATE of its content, committed on
its own; a process killed mid-reply leaves the text of the last save, still marked
incomplete. Leaving the `with` block without finish() (an exception, a closed client) saves
what there is and keeps it incomplete. `ReplyWriter.resume(store, message)` continues a reply
that has text (store.continue_reply).
"""
from __future__ import annotations

import time

from homellm.store.db import now
from homellm.store.records import Message


class ReplyWriter:
    def __init__(self, store, message: Message, flush_tokens: int = 16, flush_s: float = 0.5):
        self.store, self.message = store, message
        self.flush_tokens, self.flush_s = flush_tokens, flush_s
        self.parts: list[str] = []
        self._unsaved = 0
        self._saved_at = time.monotonic()
        self.finished = False

    @classmethod
    def resume(cls, store, message: Message, **kw) -> "ReplyWriter":
        """A writer that continues `message` (a reply cut by max tokens): its text stays and
        more is appended; it is incomplete again until finish()."""
        store.db.run("UPDATE messages SET incomplete = ?, finish_reason = NULL, updated_at = ? "
                     "WHERE id = ?", (True, now(), message.id))
        writer = cls(store, message, **kw)
        writer.parts = [message.content] if message.content else []
        return writer

    @property
    def id(self) -> str:
        return self.message.id

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def append(self, piece: str) -> None:
        """Add streamed text (one token's worth, typically); saves when enough has gathered."""
        if not piece:
            return
        self.parts.append(piece)
        self._unsaved += 1
        if self._unsaved >= self.flush_tokens or \
                time.monotonic() - self._saved_at >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        """Save the text so far (one UPDATE, committed)."""
        self.store.db.run("UPDATE messages SET content = ?, updated_at = ? WHERE id = ?",
                          (self.text, now(), self.message.id))
        self._unsaved, self._saved_at = 0, time.monotonic()

    def finish(self, *, finish_reason: str | None = None, prompt_tokens: int | None = None,
               completion_tokens: int | None = None, timings: dict | None = None,
               incomplete: bool = False) -> Message:
        """Save the final text and statistics in one transaction; the reply is complete."""
        import json
        with self.store.db.transaction():
            self.store.db.run(
                "UPDATE messages SET content = ?, finish_reason = ?, prompt_tokens = ?, "
                "completion_tokens = ?, timings = ?, incomplete = ?, updated_at = ? WHERE id = ?",
                (self.text, finish_reason, prompt_tokens, completion_tokens,
                 json.dumps(timings, sort_keys=True) if timings is not None else None,
                 bool(incomplete), now(), self.message.id))
            self.store.db.run("UPDATE conversations SET updated_at = ? WHERE id = ?",
                              (now(), self.message.conversation_id))
        self.finished = True
        self.message = Message.from_row(
            self.store.db.one("SELECT * FROM messages WHERE id = ?", (self.message.id,)))
        return self.message

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if not self.finished:
            self.flush()  # keep what was streamed; it stays incomplete
        return False
