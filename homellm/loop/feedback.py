"""What people said, as training data: preference pairs, prompts and counts, from the store.

    fb = gather(store, user)            # or gather(store, admin, shared=True)
    fb.pairs    [(source, {"prompt", "chosen", "rejected"})]   source: chat | arena | volunteers
    fb.prompts  [{"prompt": [messages ending with the user's]}]  every user turn, once
    fb.counts   {"conversations", "thumbs_up", "thumbs_down", "comments", "arena_votes", ...}

Sources (each optional; what the store holds):
- chat: the web app's conversations as trees (data.oasst.export_trees): sibling replies
  (regenerations, edits) whose thumbs differ give pairs (data.oasst.dpo_pairs); thumbs and
  comments on a lone reply are counted but give no pair;
- arena: battles voted A or B (data.arena.dpo_pairs);
- volunteers: the collection's ready_for_export trees (data.oasst_collect.collect_trees),
  ranked siblings as reward-model pairs (data.oasst_filters.rm_pairs). `volunteer_pairs` is
  the one place that reads the collection: a new source of rankings plugs in there.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from homellm.errors import HomellmError


@dataclass
class Feedback:
    pairs: list[tuple[str, dict]] = field(default_factory=list)
    prompts: list[dict] = field(default_factory=list)
    counts: dict = field(default_factory=dict)


def _user_prompts(tree) -> list[list[dict]]:
    """Every path from the root to a user message, as OpenAI messages (system prompt first)."""
    from homellm.data.oasst import OPENAI_ROLE
    head = [{"role": "system", "content": tree.system_prompt}] if tree.system_prompt else []
    out, pending = [], [(tree.prompt, [])]
    while pending:
        m, path = pending.pop()
        path = path + [{"role": OPENAI_ROLE[m.role], "content": m.text}]
        if m.role == "prompter" and m.text.strip() and not m.deleted:
            out.append(head + path)
        pending.extend((r, path) for r in reversed(m.replies))
    return out


def chat_feedback(store, user, shared: bool, fb: Feedback) -> None:
    from homellm.data.oasst import dpo_pairs, export_trees
    trees = export_trees(store, user, shared=shared)
    ups = downs = comments = 0
    for tree in trees:
        for m in tree.messages():
            up, down = m.votes()
            ups, downs = ups + up, downs + down
            comments += sum(1 for e in (m.events or {}).get("rating", []) if e.get("comment"))
        fb.pairs += [("chat", p) for p in dpo_pairs(tree)]
        fb.prompts += [{"prompt": p} for p in _user_prompts(tree)]
    fb.counts.update(conversations=len(trees), thumbs_up=ups, thumbs_down=downs, comments=comments)


def arena_feedback(store, user, shared: bool, fb: Feedback) -> None:
    from homellm.data.arena import dpo_pairs
    from homellm.store.arena import Battles
    voted = Battles(store.db).voted(shared=True) if shared else Battles(store.db).voted(user)
    fb.counts["arena_votes"] = len(voted)
    fb.pairs += [("arena", p) for p in dpo_pairs(voted)]
    seen = {m["prompt"][0]["content"] for m in fb.prompts if len(m["prompt"]) == 1}
    for b in voted:
        if b.prompt.strip() and b.prompt not in seen:
            seen.add(b.prompt)
            fb.prompts.append({"prompt": [{"role": "user", "content": b.prompt}]})


def volunteer_pairs(store) -> list[dict]:
    """The volunteer collection's ranked replies as pairs (ready_for_export trees, no deleted
    or rejected messages); [] where the store has no collection."""
    from homellm.data.oasst_collect import collect_trees
    from homellm.data.oasst_filters import rm_pairs
    from homellm.data.pairs import split_conversations
    try:
        trees = collect_trees(store.db, states=["ready_for_export"])
    except HomellmError:
        return []
    out = []
    for tree in trees:
        for p in rm_pairs(tree):
            try:
                out.append(split_conversations(p["chosen"], p["rejected"]))
            except ValueError:
                continue  # two replies that do not part at the assistant's turn
    return out


def gather(store, user, shared: bool = False, volunteers: bool = True) -> Feedback:
    """Everything the store holds for `user` (or, shared, every user who opted in)."""
    fb = Feedback()
    chat_feedback(store, user, shared, fb)
    arena_feedback(store, user, shared, fb)
    if volunteers:
        found = volunteer_pairs(store)
        fb.counts["volunteer_pairs"] = len(found)
        fb.pairs += [("volunteers", p) for p in found]
    seen, prompts = set(), []
    for p in fb.prompts:  # each prompt once
        key = repr(p["prompt"])
        if key not in seen:
            seen.add(key)
            prompts.append(p)
    fb.prompts = prompts
    return fb
