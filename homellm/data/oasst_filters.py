"""Which messages of Open Assistant trees go into training data, and reward-model pairs.

    f = TreeFilter(langs=("en",), min_reviews=3, drop_flagged=True, drop_synthetic=True)
    trees = f.apply(trees)              # pruned copies; a tree whose prompt fails is dropped
    pairs = rm_pairs(tree)              # {"chosen": [...], "rejected": [...], "margin": n}

A message that fails the filter is removed with every reply below it (a conversation cannot
go on from a message that is not there). The filters:

- langs: the tree's prompt is in one of these languages (OA filters trees by their prompt);
- min_reviews: the message has at least this many reviews (`review_count`);
- drop_deleted: the message is not deleted;
- drop_flagged: the message is not flagged: not rejected in review (`review_result` false),
  no red flag (`emojis["red_flag"]`), and none of the labels spam, lang_mismatch, pii,
  not_appropriate, hate_speech, sexual_content at 0.5 or more on average;
- drop_synthetic: the message was written by a person (`synthetic` is not true).

Reward-model pairs (`rm_pairs`) are the DPO pairs of data/oasst.py (the same siblings, the
same preference: the lower rank, else the higher vote score) in the implicit-prompt form that
reward-model trainers take (TRL's RewardTrainer): `chosen` and `rejected` are each the whole
conversation ending in that reply, and `margin` is how far apart the two replies are (rank
difference, or vote score difference when they have no ranks).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

from homellm.data.oasst import Message, Tree, _openai, _path_to, prefer

FLAG_LABELS = ("spam", "lang_mismatch", "pii", "not_appropriate", "hate_speech",
               "sexual_content")


def flagged(m: Message) -> bool:
    if m.review_result is False or (m.emojis or {}).get("red_flag", 0) > 0:
        return True
    for name in FLAG_LABELS:
        v = ((m.labels or {}).get(name) or {}).get("value")
        if v is not None and v >= 0.5:
            return True
    return False


@dataclass
class TreeFilter:
    langs: tuple[str, ...] = ()
    min_reviews: int = 0
    drop_deleted: bool = False
    drop_flagged: bool = False
    drop_synthetic: bool = False

    def active(self) -> bool:
        return bool(self.langs or self.min_reviews or self.drop_deleted or self.drop_flagged
                    or self.drop_synthetic)

    def keeps(self, m: Message) -> bool:
        return not ((m.review_count or 0) < self.min_reviews
                    or (self.drop_deleted and m.deleted)
                    or (self.drop_flagged and flagged(m))
                    or (self.drop_synthetic and m.synthetic))

    def apply(self, trees: list[Tree]) -> list[Tree]:
        """The trees that pass, each with the failing messages (and what is below them)
        removed; the input is left as it was."""
        if not self.active():
            return list(trees)
        out = []
        for t in trees:
            if self.langs and t.prompt.lang not in self.langs:
                continue
            if not self.keeps(t.prompt):
                continue
            t = copy.copy(t)
            t.prompt = self._pruned(t.prompt)
            out.append(t)
        return out

    def _pruned(self, root: Message) -> Message:
        new_root = copy.copy(root)
        pending = [(root, new_root)]
        while pending:   # a loop, not recursion: trees may be deep
            old, new = pending.pop()
            new.replies = []
            for r in old.replies:
                if self.keeps(r):
                    c = copy.copy(r)
                    new.replies.append(c)
                    pending.append((r, c))
        return new_root


def rm_pairs(tree: Tree) -> list[dict]:
    """Reward-model pairs of a tree (module docstring), in the order of dpo_pairs."""
    out = []
    before: dict[int, Message] = {}
    pending = [tree.prompt]
    while pending:
        m = pending.pop()
        if m.role == "prompter":
            replies = [r for r in m.replies if r.complete()]
            pairs = [(a, b) for a in replies for b in replies if a is not b and prefer(a, b)]
            prompt = _openai(_path_to(m, before), tree.system_prompt) if pairs else None
            for a, b in pairs:
                margin = (b.rank - a.rank) if a.rank is not None and b.rank is not None else \
                    a.score() - b.score()
                out.append({"chosen": prompt + [{"role": "assistant", "content": a.text}],
                            "rejected": prompt + [{"role": "assistant", "content": b.text}],
                            "margin": float(margin)})
        for r in m.replies:
            before[id(r)] = m
        pending.extend(reversed(m.replies))
    return out
