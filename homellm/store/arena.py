"""The arena's battles: one prompt, two served models answering it blind, one vote.

    battles = Battles(store.db)
    b = battles.create(user, "Why is the sky blue?", "smollm2:135m", "tiny", seeds=(1, 2),
                       sampling={"temperature": 0.7, "max_tokens": 256})
    battles.finish(user, b.id, "a", "Rayleigh...", "stop", 41)
    battles.finish(user, b.id, "b", "Because...", "length", 256)
    battles.vote(user, b.id, "a")              # "a" | "b" | "tie" | "both_bad"
    battles.voted()                            # every user's votes, for the leaderboard

A battle belongs to the user who started it: another user's id gives None, as a missing one
does. Its models are stored from the start but the web layer shows them only once the
battle has its vote (serve/web/arena.py). One vote per battle: the vote is set by one UPDATE
that only matches an unvoted battle whose two replies have finished, so of two concurrent
votes exactly one is kept (AlreadyVoted for the other), on SQLite and PostgreSQL alike.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from homellm.errors import HomellmError
from homellm.store.db import now
from homellm.store.people import _uid
from homellm.store.records import User

SIDES = ("a", "b")
VOTES = ("a", "b", "tie", "both_bad")


class AlreadyVoted(HomellmError):
    """The battle has its vote."""


class StillRunning(HomellmError):
    """A reply of the battle has not finished (a vote waits for both)."""


@dataclass
class Battle:
    id: str
    user_id: str
    prompt: str
    model_a: str
    model_b: str
    reply_a: str
    reply_b: str
    finish_a: str | None          # the reply's finish_reason ("stop", "length", "stopped",
    finish_b: str | None          # "error"); None while it streams
    tokens_a: int | None
    tokens_b: int | None
    seed_a: int | None
    seed_b: int | None
    sampling: dict | None
    vote: str | None              # VOTES, or None before the vote
    created_at: str
    updated_at: str
    voted_at: str | None

    @classmethod
    def from_row(cls, r: dict) -> "Battle":
        return cls(**{k: r[k] for k in cls.__dataclass_fields__ if k != "sampling"},
                   sampling=json.loads(r["sampling"]) if r["sampling"] else None)

    @property
    def finished(self) -> bool:
        return self.finish_a is not None and self.finish_b is not None

    def side(self, side: str) -> tuple[str, str, str | None, int | None]:
        """(model, reply, finish_reason, completion tokens) of side "a" or "b"."""
        return (getattr(self, f"model_{side}"), getattr(self, f"reply_{side}"),
                getattr(self, f"finish_{side}"), getattr(self, f"tokens_{side}"))


def _side(side: str) -> str:
    if side not in SIDES:
        raise HomellmError(f"battle side {side!r}: expected 'a' or 'b'")
    return side


class Battles:
    """The battles table of one database (homellm.store.db.Database)."""

    def __init__(self, db):
        self.db = db

    def create(self, user: User | str, prompt: str, model_a: str, model_b: str, *,
               seeds: tuple[int | None, int | None] = (None, None),
               sampling: dict | None = None) -> Battle:
        if not isinstance(prompt, str) or not prompt.strip():
            raise HomellmError("battle prompt: expected a non-empty text")
        if model_a == model_b:
            raise HomellmError(f"a battle needs two different models, got {model_a!r} twice")
        bid, t = uuid.uuid4().hex, now()
        self.db.run("INSERT INTO battles (id, user_id, prompt, model_a, model_b, seed_a, seed_b, "
                    "sampling, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (bid, _uid(user), prompt, model_a, model_b, seeds[0], seeds[1],
                     json.dumps(sampling, sort_keys=True) if sampling is not None else None,
                     t, t))
        return self.get(user, bid)

    def get(self, user: User | str, battle_id: str) -> Battle | None:
        r = self.db.one("SELECT * FROM battles WHERE id = ? AND user_id = ?",
                        (battle_id, _uid(user)))
        return Battle.from_row(r) if r else None

    def recent(self, user: User | str, *, limit: int = 50, offset: int = 0) -> list[Battle]:
        """This user's battles, newest first."""
        rows = self.db.all("SELECT * FROM battles WHERE user_id = ? ORDER BY n DESC "
                           "LIMIT ? OFFSET ?", (_uid(user), int(limit), int(offset)))
        return [Battle.from_row(r) for r in rows]

    def finish(self, user: User | str, battle_id: str, side: str, text: str,
               finish_reason: str, completion_tokens: int | None) -> bool:
        """Save one side's whole reply; False if the battle is not this user's."""
        s = _side(side)
        return self.db.run(f"UPDATE battles SET reply_{s} = ?, finish_{s} = ?, tokens_{s} = ?, "
                           "updated_at = ? WHERE id = ? AND user_id = ?",
                           (text, finish_reason, completion_tokens, now(), battle_id,
                            _uid(user))) > 0

    def vote(self, user: User | str, battle_id: str, vote: str) -> Battle | None:
        """Set the battle's one vote. None if not this user's; AlreadyVoted if it has one;
        StillRunning while a reply streams."""
        if vote not in VOTES:
            raise HomellmError(f"vote {vote!r}: expected one of {', '.join(VOTES)}")
        t = now()
        changed = self.db.run("UPDATE battles SET vote = ?, voted_at = ?, updated_at = ? "
                              "WHERE id = ? AND user_id = ? AND vote IS NULL "
                              "AND finish_a IS NOT NULL AND finish_b IS NOT NULL",
                              (vote, t, t, battle_id, _uid(user)))
        b = self.get(user, battle_id)
        if changed or b is None:
            return b
        if b.vote is not None:
            raise AlreadyVoted(f"battle {battle_id} has its vote already ({b.vote}); "
                               "one vote per battle")
        raise StillRunning(f"battle {battle_id}: the replies are still streaming; vote once "
                           "both have finished")

    def voted(self, user: User | str | None = None, *, shared: bool = False) -> list[Battle]:
        """Voted battles, oldest first: every user's (None), one user's, or (shared) those of
        the users who opted in to share their feedback."""
        if shared:
            rows = self.db.all("SELECT b.* FROM battles b JOIN users u ON u.id = b.user_id "
                               "WHERE b.vote IS NOT NULL AND u.share_feedback = ? ORDER BY b.n",
                               (True,))
        elif user is None:
            rows = self.db.all("SELECT * FROM battles WHERE vote IS NOT NULL ORDER BY n")
        else:
            rows = self.db.all("SELECT * FROM battles WHERE vote IS NOT NULL AND user_id = ? "
                               "ORDER BY n", (_uid(user),))
        return [Battle.from_row(r) for r in rows]

    def outcomes(self) -> list[tuple[str, str, str]]:
        """(model_a, model_b, vote) of every voted battle, oldest first (the leaderboard's
        input: only what it needs, not the texts)."""
        rows = self.db.all("SELECT model_a, model_b, vote FROM battles WHERE vote IS NOT NULL "
                           "ORDER BY n")
        return [(r["model_a"], r["model_b"], r["vote"]) for r in rows]
