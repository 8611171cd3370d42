"""What the store returns: plain typed records, made from rows of either database."""
from __future__ import annotations

import json
from dataclasses import dataclass, field


def _json(text):
    return json.loads(text) if text else None


@dataclass
class User:
    id: str
    username: str
    is_admin: bool
    share_feedback: bool
    created_at: str
    has_password: bool = False

    @classmethod
    def from_row(cls, r: dict) -> "User":
        return cls(id=r["id"], username=r["username"], is_admin=bool(r["is_admin"]),
                   share_feedback=bool(r["share_feedback"]), created_at=r["created_at"],
                   has_password=r.get("password_hash") is not None)


@dataclass
class Session:
    token: str          # give this to the client (cookie); the store keeps only its hash
    user: User
    csrf_token: str     # echo in a header/form field on every state change
    expires_at: str


@dataclass
class Conversation:
    id: str
    user_id: str
    title: str
    model: str | None
    system_prompt: str | None
    sampling: dict | None
    current_leaf_id: str | None
    created_at: str
    updated_at: str

    @classmethod
    def from_row(cls, r: dict) -> "Conversation":
        return cls(id=r["id"], user_id=r["user_id"], title=r["title"], model=r["model"],
                   system_prompt=r["system_prompt"], sampling=_json(r["sampling"]),
                   current_leaf_id=r["current_leaf_id"], created_at=r["created_at"],
                   updated_at=r["updated_at"])


@dataclass
class Message:
    id: str
    conversation_id: str
    parent_id: str | None
    role: str                       # "user" | "assistant"
    content: str
    created_at: str
    updated_at: str
    model: str | None = None
    sampling: dict | None = None
    seed: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    timings: dict | None = None     # e.g. {"prefill_s", "decode_s", "decode_tps", ...}
    finish_reason: str | None = None
    incomplete: bool = False        # True while streaming, and forever if the writer died
    meta: dict | None = None        # oasst fields kept from an import
    n: int = field(default=0, repr=False)  # insertion order

    @classmethod
    def from_row(cls, r: dict) -> "Message":
        return cls(id=r["id"], conversation_id=r["conversation_id"], parent_id=r["parent_id"],
                   role=r["role"], content=r["content"], created_at=r["created_at"],
                   updated_at=r["updated_at"], model=r["model"], sampling=_json(r["sampling"]),
                   seed=r["seed"], prompt_tokens=r["prompt_tokens"],
                   completion_tokens=r["completion_tokens"], timings=_json(r["timings"]),
                   finish_reason=r["finish_reason"], incomplete=bool(r["incomplete"]),
                   meta=_json(r["meta"]), n=r["n"])


@dataclass
class Rating:
    message_id: str
    user_id: str | None             # None: a vote imported from a file
    value: int                      # +1 or -1
    comment: str | None
    created_at: str
    updated_at: str

    @classmethod
    def from_row(cls, r: dict) -> "Rating":
        return cls(message_id=r["message_id"], user_id=r["user_id"], value=r["value"],
                   comment=r["comment"], created_at=r["created_at"], updated_at=r["updated_at"])


@dataclass
class Turn:
    """One message of a branch, with what the `< 2/3 >` arrows need."""
    message: Message
    sibling_ids: list[str]          # this message and its siblings, oldest first
    index: int                      # this message's place among them (0-based)
    rating: Rating | None = None    # the viewing user's rating (assistant messages)


@dataclass
class SearchHit:
    conversation_id: str
    title: str
    message_id: str | None          # None when the title matched
    snippet: str                    # the matching text around the first query word
    updated_at: str


@dataclass
class ConversationDump:
    """A whole conversation, for export: every message (tree order by `n`) and every rating."""
    conversation: Conversation
    owner: User
    messages: list[Message]
    ratings: list[Rating]
