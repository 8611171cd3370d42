"""Open Assistant's points: the leaderboard's score and level, and the trollboard's score.

The formulas are OA's `UserStats.compute_leader_score` and `TrollStats.compute_troll_score`
(backend/oasst_backend/models/), counted over a time frame (`since`):

    leader score = int(0.1 prompts) + 4 assistant replies + prompter replies
                 + simple labels + 2 full labels + rankings + good rankings
                 + int(0.1 accepted prompts) + 4 accepted assistant replies
                 + accepted prompter replies + 9 ranked first + 3 ranked second + ranked third

"ranked first/second/third" counts the rankings that put one of the user's replies at that
place; a "good ranking" is one whose first choice is the reply the merged ranking put first
(OA keeps the field but never fills it). The level is OA's: the number of thresholds
round(cumsum(1.1521 k + 3)), k = 1..99, that the score reaches (0 to 100).

    troll score = 3 red flags - upvotes + downvotes + spam prompts + lang_mismatch
                + not_appropriate + pii + hate_speech + sexual_content + political_content

where the label terms count the reviews of the user's messages that set the label (a value of
0.5 or more), and spam prompts are the user's prompts whose tree was aborted as low grade.

Time frames (OA's `update_stats`): day = the last 24 hours, week = since midnight UTC 7 days
ago, month = since midnight UTC 30 days ago, total = everything.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime, timedelta, timezone

TIME_FRAMES = ("day", "week", "month", "total")


def since(time_frame: str, now: datetime | None = None) -> str | None:
    """The first moment of a time frame, as stored times are written (None: all time)."""
    now = now or datetime.now(timezone.utc)
    if time_frame == "day":
        start = now - timedelta(days=1)
    elif time_frame in ("week", "month"):
        d = now.date() - timedelta(days=7 if time_frame == "week" else 30)
        start = datetime(d.year, d.month, d.day, tzinfo=timezone.utc)
    elif time_frame == "total":
        return None
    else:
        raise ValueError(f"time_frame {time_frame!r}: expected one of {', '.join(TIME_FRAMES)}")
    return start.isoformat(timespec="microseconds")


def _thresholds(baseline: float = 3, alpha: float = 1.1521, max_level: int = 100) -> list[int]:
    out, total = [0], 0.0
    for k in range(1, max_level):
        total += k * alpha + baseline
        out.append(int(round(total)))
    return out


THRESHOLDS = _thresholds()


def level(score: int) -> int:
    return sum(1 for t in THRESHOLDS if t <= score)


@dataclass
class UserScore:
    user_id: str
    username: str
    prompts: int = 0
    replies_assistant: int = 0
    replies_prompter: int = 0
    labels_simple: int = 0
    labels_full: int = 0
    rankings_total: int = 0
    rankings_good: int = 0
    accepted_prompts: int = 0
    accepted_replies_assistant: int = 0
    accepted_replies_prompter: int = 0
    reply_ranked_1: int = 0
    reply_ranked_2: int = 0
    reply_ranked_3: int = 0

    @property
    def leader_score(self) -> int:
        return (int(self.prompts * 0.1) + self.replies_assistant * 4 + self.replies_prompter
                + self.labels_simple + self.labels_full * 2 + self.rankings_total
                + self.rankings_good + int(self.accepted_prompts * 0.1)
                + self.accepted_replies_assistant * 4 + self.accepted_replies_prompter
                + self.reply_ranked_1 * 9 + self.reply_ranked_2 * 3 + self.reply_ranked_3)

    def json(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        return {**d, "leader_score": self.leader_score, "level": level(self.leader_score)}


@dataclass
class TrollScore:
    user_id: str
    username: str
    red_flags: int = 0
    upvotes: int = 0
    downvotes: int = 0
    spam_prompts: int = 0
    spam: int = 0
    lang_mismatch: int = 0
    not_appropriate: int = 0
    pii: int = 0
    hate_speech: int = 0
    sexual_content: int = 0
    political_content: int = 0
    quality: float | None = None      # mean label values of the user's messages
    humor: float | None = None
    toxicity: float | None = None
    violence: float | None = None
    helpfulness: float | None = None

    @property
    def troll_score(self) -> int:
        return (self.red_flags * 3 - self.upvotes + self.downvotes + self.spam_prompts
                + self.lang_mismatch + self.not_appropriate + self.pii + self.hate_speech
                + self.sexual_content + self.political_content)

    def json(self) -> dict:
        return {**{f.name: getattr(self, f.name) for f in fields(self)},
                "troll_score": self.troll_score}


def ranked(scores: list, key: str) -> list[dict]:
    """Scores as JSON, highest `key` first (ties by user id, as OA), with `rank` from 1."""
    rows = sorted((s.json() for s in scores), key=lambda d: (-d[key], d["user_id"]))
    for i, d in enumerate(rows, 1):
        d["rank"] = i
    return rows
