"""Open Assistant-style volunteer collection: tasks, review, ranking and moderation.

    from homellm.collect import CollectSettings, TreeManager
    tm = TreeManager(store.db, CollectSettings(goal_tree_size=12))
    task = tm.next_task(alice)["task"]            # or next_task(alice, "assistant_reply")
    tm.submit(alice, task["id"], {"text": "...", "lang": "en"})

Volunteers write prompts, reply as the assistant or as the user, review (label) each other's
messages and rank sibling replies; the tree manager (tree_manager.py) hands out what unblocks
trees first and moves each tree through Open Assistant's states until it is
ready_for_export. The parts:

    settings.py      the thresholds (OA's names and defaults)
    tasks.py         the task kinds and OA's weighted choice among them
    labels.py        OA's label set, the labels each kind of message gets, acceptance
    ranking.py       rankings merged per message (ranked pairs)
    points.py        the leaderboard's and the trollboard's points
    tree_manager.py  next task, skip, submit, and the tree's states
    moderation.py    reports, emojis, edit proposals, a model's reply, moderators' actions

The rows live in the store (store/collect_trees.py, collect_tasks.py, collect_stats.py);
data/oasst_collect.py exports them in Open Assistant's formats and imports oasst1/oasst2;
serve/web/collect.py is the web app's Contribute page, moderator view and leaderboards.
"""
from homellm.collect.errors import CollectError
from homellm.collect.settings import CollectSettings
from homellm.collect.tree_manager import STATES, TreeManager

__all__ = ["CollectError", "CollectSettings", "STATES", "TreeManager"]
