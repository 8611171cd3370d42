"""Arena votes out: as DPO pairs, and as battles in Chatbot Arena's public format.

    pairs = dpo_pairs(battles)          # {"prompt", "chosen", "rejected"}, as oasst.dpo_pairs
    lines = battle_records(battles, usernames)

A vote for A or B is one preference pair: the prompt, the voted reply as "chosen", the other
as "rejected", in the same shape as the pairs that `homellm data export --dpo` makes from
rated branches (so `homellm tune dpo` reads both). A tie or "both bad" prefers neither and
gives no pair; neither does a battle whose replies did not both finish (stopped by the user
or failed), as incomplete replies are left out of every training export.

A battle record has the fields of LMSYS's released arena data (chatbot_arena_conversations:
model_a, model_b, winner in "model_a" | "model_b" | "tie" | "tie (bothbad)", judge,
conversation_a / conversation_b as OpenAI messages, turn, anony, tstamp), plus homellm's own
(battle_id, vote, finish reasons and token counts, sampling, times).
"""
from __future__ import annotations

from datetime import datetime
from typing import Iterable

WINNER = {"a": "model_a", "b": "model_b", "tie": "tie", "both_bad": "tie (bothbad)"}
INCOMPLETE = ("stopped", "error")


def _complete(finish_reason: str | None, text: str) -> bool:
    return finish_reason is not None and finish_reason not in INCOMPLETE and bool(text.strip())


def dpo_pairs(battles: Iterable) -> list[dict]:
    """One {"prompt", "chosen", "rejected"} per battle voted A or B whose replies both
    finished (homellm.store.arena.Battle records, in order)."""
    out = []
    for b in battles:
        if b.vote not in ("a", "b"):
            continue
        if not (_complete(b.finish_a, b.reply_a) and _complete(b.finish_b, b.reply_b)):
            continue
        chosen, rejected = (b.reply_a, b.reply_b) if b.vote == "a" else (b.reply_b, b.reply_a)
        out.append({"prompt": [{"role": "user", "content": b.prompt}],
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}]})
    return out


def _epoch(stamp: str | None) -> float | None:
    return datetime.fromisoformat(stamp).timestamp() if stamp else None


def battle_records(battles: Iterable, usernames: dict[str, str] | None = None) -> list[dict]:
    """Voted battles as records of LMSYS's arena data format plus homellm's fields."""
    usernames = usernames or {}
    out = []
    for b in battles:
        if b.vote is None:
            continue  # the models of an unvoted battle stay hidden
        out.append({
            "battle_id": b.id, "model_a": b.model_a, "model_b": b.model_b,
            "winner": WINNER[b.vote], "vote": b.vote,
            "judge": usernames.get(b.user_id, b.user_id),
            "conversation_a": [{"role": "user", "content": b.prompt},
                               {"role": "assistant", "content": b.reply_a}],
            "conversation_b": [{"role": "user", "content": b.prompt},
                               {"role": "assistant", "content": b.reply_b}],
            "turn": 1, "anony": True, "tstamp": _epoch(b.voted_at),
            "finish_a": b.finish_a, "finish_b": b.finish_b,
            "tokens_a": b.tokens_a, "tokens_b": b.tokens_b, "sampling": b.sampling,
            "created_at": b.created_at, "voted_at": b.voted_at})
    return out
