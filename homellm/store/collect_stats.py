"""What each volunteer did in a time frame, counted from the collection's tables: the inputs
of the leaderboard and the trollboard (homellm/collect/points.py turns them into points).

    stats = CollectStats(store.db)
    stats.contributions(since)     # {user_id: {"prompts": 3, "labels_full": 7, ...}}
    stats.troll_counts(since)      # {user_id: {"red_flags": 1, "spam": 2, ...}}

`since`: an ISO time as the store writes them, or None for all time. Deleted messages do
not count; synthetic ones (a model's) have no user. Banned users are left out.
"""
from __future__ import annotations

import json
from collections import defaultdict

FLAG_LABELS = ("spam", "lang_mismatch", "not_appropriate", "pii", "hate_speech",
               "sexual_content", "political_content")
MEAN_LABELS = ("quality", "humor", "toxicity", "violence", "helpfulness")


class CollectStats:
    def __init__(self, db):
        self.db = db

    def _since(self, column: str, since: str | None) -> tuple[str, list]:
        return (f" AND {column} >= ?", [since]) if since else ("", [])

    def banned(self) -> set[str]:
        return {r["id"] for r in self.db.all("SELECT id FROM users WHERE banned = ?", (True,))}

    def contributions(self, since: str | None) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        when, p = self._since("created_at", since)
        for r in self.db.all(
                "SELECT user_id, parent_id IS NULL AS is_prompt, role, review_result, "
                "COUNT(*) AS n FROM collect_messages WHERE user_id IS NOT NULL AND deleted = ? "
                "AND synthetic = ?" + when + " GROUP BY user_id, parent_id IS NULL, role, "
                "review_result", [False, False] + p):
            d = out[r["user_id"]]
            name = "prompts" if r["is_prompt"] else f"replies_{r['role']}"
            d[name] += r["n"]
            if r["review_result"]:
                d[f"accepted_{name}"] += r["n"]
        for r in self.db.all("SELECT user_id, mode, COUNT(*) AS n FROM collect_reviews WHERE "
                             "user_id IS NOT NULL" + when + " GROUP BY user_id, mode", p):
            out[r["user_id"]][f"labels_{r['mode']}"] += r["n"]
        rankings = self.db.all("SELECT user_id, ranked_ids FROM collect_rankings WHERE "
                               "user_id IS NOT NULL" + when, p)
        places = [json.loads(r["ranked_ids"]) for r in rankings]
        authors = self._authors({i for ids in places for i in ids[:3]})
        for r, ids in zip(rankings, places):
            d = out[r["user_id"]]
            d["rankings_total"] += 1
            if ids and authors.get(ids[0], (None, None))[1] == 0:
                d["rankings_good"] += 1   # its first choice is the merged first
            for place, mid in enumerate(ids[:3], 1):
                author = authors.get(mid, (None, None))[0]
                if author:
                    out[author][f"reply_ranked_{place}"] += 1
        banned = self.banned()
        return {u: dict(d) for u, d in out.items() if u not in banned}

    def _authors(self, ids: set[str]) -> dict[str, tuple[str | None, int | None]]:
        """message id -> (its user, its merged rank)."""
        ids, out = sorted(ids), {}
        for i in range(0, len(ids), 500):
            part = ids[i:i + 500]
            for r in self.db.all("SELECT id, user_id, rank FROM collect_messages WHERE id IN "
                                 f"({', '.join('?' * len(part))})", part):
                out[r["id"]] = (r["user_id"], r["rank"])
        return out

    def troll_counts(self, since: str | None) -> dict[str, dict]:
        out: dict[str, dict] = defaultdict(lambda: defaultdict(int))
        when, p = self._since("m.created_at", since)
        emoji_name = {"+1": "upvotes", "-1": "downvotes", "red_flag": "red_flags"}
        for r in self.db.all(
                "SELECT m.user_id, e.emoji, COUNT(*) AS n FROM collect_emojis e JOIN "
                "collect_messages m ON m.id = e.message_id WHERE m.user_id IS NOT NULL AND "
                "e.emoji IN ('+1', '-1', 'red_flag')" + when + " GROUP BY m.user_id, e.emoji",
                p):
            out[r["user_id"]][emoji_name[r["emoji"]]] += r["n"]
        for r in self.db.all(
                "SELECT m.user_id, COUNT(*) AS n FROM collect_trees t JOIN collect_messages m "
                "ON m.id = t.id WHERE t.state = 'aborted_low_grade' AND m.user_id IS NOT NULL"
                + when + " GROUP BY m.user_id", p):
            out[r["user_id"]]["spam_prompts"] += r["n"]
        sums: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for r in self.db.all(
                "SELECT m.user_id, r.labels FROM collect_reviews r JOIN collect_messages m ON "
                "m.id = r.message_id WHERE m.user_id IS NOT NULL AND m.deleted = ?" + when,
                [False] + p):
            d = out[r["user_id"]]
            for k, v in json.loads(r["labels"]).items():
                if k in FLAG_LABELS and v >= 0.5:
                    d[k] += 1
                elif k in MEAN_LABELS:
                    sums[r["user_id"]][k].append(v)
        for u, per in sums.items():
            for k, vs in per.items():
                out[u][k] = sum(vs) / len(vs)
        return {u: dict(d) for u, d in out.items()}
