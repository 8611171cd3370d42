"""The volunteer collection (issue 15): Open Assistant's tasks, review, ranking, labels and
moderation, on SQLite and PostgreSQL.

- Ranked pairs against references: Wikipedia's Tennessee example, a cycle worked out by
  hand, and a brute-force search (the order that agrees with the strongest majorities,
  lexicographically) over random rankings.
- Settings are OA's defaults; labels, acceptance and points follow OA's formulas.
- A tree driven through the tree manager by five users, state by state: prompt review, a
  reply that fails review leaving the tree, ranking merged, ready_for_export, and every
  user's points counted by hand; a rejected prompt, a halted tree, skips, expiry and bad
  input; edit proposals, reports with auto-moderation and the moderators' actions.
- Concurrency: volunteers in threads (one connection each) through the store: no task
  handed out twice, no slot over its limit, every submission counted once.
- Over HTTP (a live server, --auth): roles (403), another volunteer's task (404), the
  errors' shapes; 50 simulated volunteers at once on PostgreSQL (slow); a served model's
  synthetic reply (slow).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import random
import threading
import time
from collections import Counter

import pytest
from pg_server import new_database, pg_server, pg_url  # noqa: F401  (fixtures)

from homellm.collect import CollectError, CollectSettings, TreeManager
from homellm.collect import labels as L
from homellm.collect import points
from homellm.collect.ranking import ranked_pairs
from homellm.store import AuthConfig, open_store

FAST = AuthConfig(argon2_time_cost=1, argon2_memory_kib=8192, argon2_parallelism=1)
SMALL = dict(goal_tree_size=3, max_tree_depth=1, num_reviews_initial_prompt=2,
             num_reviews_reply=2, num_required_rankings=2, max_active_trees=2,
             p_full_labeling_review_reply_prompter=1.0)


# ---------------------------------------------------------------- ranked pairs

def brute_force(rankings):
    """The order of the common items that agrees with the ranked-pairs list of majorities
    (strongest first, ties by sorted ids) lexicographically best: Tideman's lock-in, found
    by trying every permutation."""
    items = sorted(set(rankings[0]).intersection(*map(set, rankings[1:])), key=str)
    wins = Counter()
    for r in rankings:
        order = [x for x in r if x in items]
        for i, a in enumerate(order):
            for b in order[i + 1:]:
                wins[a, b] += 1
    idx = {x: i for i, x in enumerate(items)}
    pairs = sorted(((wins[a, b] - wins[b, a], idx[a], idx[b], a, b) for a in items for b in items
                    if a != b and wins[a, b] >= wins[b, a]), key=lambda p: p[:3])
    pairs = [(a, b) for m, i, j, a, b in sorted(pairs, key=lambda p: (-p[0], p[1], p[2]))]

    def agreement(perm):
        pos = {x: i for i, x in enumerate(perm)}
        return tuple(pos[a] < pos[b] for a, b in pairs)
    return list(max(itertools.permutations(items), key=agreement))


def test_ranked_pairs_tennessee():
    # Wikipedia, "Ranked pairs": the capital of Tennessee; the answer is Nashville,
    # Chattanooga, Knoxville, Memphis
    votes = [["Memphis", "Nashville", "Chattanooga", "Knoxville"]] * 42 + \
        [["Nashville", "Chattanooga", "Knoxville", "Memphis"]] * 26 + \
        [["Chattanooga", "Knoxville", "Nashville", "Memphis"]] * 15 + \
        [["Knoxville", "Chattanooga", "Nashville", "Memphis"]] * 17
    assert ranked_pairs(votes) == ["Nashville", "Chattanooga", "Knoxville", "Memphis"]


def test_ranked_pairs_breaks_a_cycle_at_its_weakest_majority():
    # A>B>C x4, B>C>A x3, C>A>B x2: A over B by 3, B over C by 5, C over A by 1 (a cycle);
    # B>C and A>B lock in, C>A would close the cycle: A, B, C
    votes = [["A", "B", "C"]] * 4 + [["B", "C", "A"]] * 3 + [["C", "A", "B"]] * 2
    assert ranked_pairs(votes) == ["A", "B", "C"]
    assert ranked_pairs([["x", "y", "z"]] * 3) == ["x", "y", "z"]   # unanimous: unchanged
    # a Condorcet winner comes first even when most put it second
    assert ranked_pairs([["a", "w", "b"], ["b", "w", "a"], ["w", "a", "b"]])[0] == "w"


def test_ranked_pairs_equals_a_brute_force_search():
    rng = random.Random(5)
    for trial in range(150):
        n = rng.randint(2, 5)
        items = [f"m{i}" for i in range(n)]
        votes = [rng.sample(items, n) for _ in range(rng.randint(1, 7))]
        assert ranked_pairs(votes) == brute_force(votes), votes


def test_ranked_pairs_uses_the_items_every_ranking_has():
    assert ranked_pairs([["a", "b", "c"], ["c", "b"], ["b", "c", "d"]]) == ["b", "c"]
    assert ranked_pairs([["a", "b"], ["c", "d"]]) == []
    assert ranked_pairs([]) == []


# ---------------------------------------------------------------- settings, labels, points

def test_settings_are_open_assistants_defaults():
    s = CollectSettings()
    # backend/oasst_backend/config.py, TreeManagerConfiguration
    assert (s.max_tree_depth, s.max_children_count, s.goal_tree_size, s.max_active_trees,
            s.num_reviews_initial_prompt, s.num_reviews_reply,
            s.acceptance_threshold_initial_prompt, s.acceptance_threshold_reply,
            s.num_required_rankings, s.num_prompter_replies, s.auto_mod_red_flags,
            s.auto_mod_max_skip_reply, s.max_message_chars) == \
        (3, 3, 12, 10, 3, 3, 0.6, 0.6, 3, 1, 4, 25, 2000)
    with pytest.raises(Exception, match="goal_tree_size: expected an integer >= 1"):
        CollectSettings(goal_tree_size=0)
    with pytest.raises(Exception, match="acceptance_threshold_reply: expected a number"):
        CollectSettings(acceptance_threshold_reply=1.5)


def test_labels_are_checked_against_the_task():
    valid = L.valid_labels("assistant", "full")
    assert valid == ["spam", "lang_mismatch", "fails_task", "quality", "helpfulness",
                     "creativity", "humor", "toxicity", "violence", "not_appropriate", "pii",
                     "hate_speech", "sexual_content"]
    assert L.valid_labels("prompter", "simple") == ["spam", "lang_mismatch", "quality"]
    assert "fails_task" not in L.valid_labels("initial_prompt", "full")
    assert L.check({"spam": 0, "quality": 0.75}, valid, ["spam"]) == {"spam": 0.0,
                                                                       "quality": 0.75}
    for bad, msg in (({"spam": 1.5}, "labels.spam: expected a number from 0 to 1"),
                     ({"spam": True}, "labels.spam: expected a number"),
                     ({"spam": "no"}, "labels.spam: expected a number"),
                     ({"quality": 1}, "the mandatory label spam must be set"),
                     ({"spam": 0, "fails_task": 1}, "labels.fails_task: not a label this task"),
                     ({"spam": 0, "nice": 1}, "labels.nice: not a known label"),
                     ([0, 1], "labels: expected an object")):
        with pytest.raises(L.LabelError, match=msg):
            L.check(bad, L.valid_labels("prompter", "full"), ["spam"])


def test_acceptance_is_open_assistants_formula():
    # 1 - (mean spam + mean lang_mismatch); a review without lang_mismatch counts 0
    assert L.acceptance([{"spam": 0}, {"spam": 0}, {"spam": 1}]) == pytest.approx(2 / 3)
    assert L.acceptance([{"spam": 0, "lang_mismatch": 1}, {"spam": 0}, {"spam": 0}]) == \
        pytest.approx(2 / 3)
    assert L.acceptance([{"spam": 0}, {"spam": 1}, {"spam": 1}]) == pytest.approx(1 / 3)


def test_points_are_open_assistants_formula():
    s = points.UserScore("u", "ann", prompts=25, replies_assistant=2, replies_prompter=3,
                         labels_simple=4, labels_full=5, rankings_total=6, rankings_good=1,
                         accepted_prompts=19, accepted_replies_assistant=1,
                         accepted_replies_prompter=2, reply_ranked_1=1, reply_ranked_2=2,
                         reply_ranked_3=3)
    assert s.leader_score == 2 + 8 + 3 + 4 + 10 + 6 + 1 + 1 + 4 + 2 + 9 + 6 + 3
    # OA's level thresholds: round(cumsum(1.1521 k + 3)), k = 1, 2, ...
    total, want = 0.0, [0]
    for k in range(1, 6):
        total += 1.1521 * k + 3
        want.append(round(total))
    assert points.THRESHOLDS[:6] == want == [0, 4, 9, 16, 24, 32]
    assert [points.level(x) for x in (0, 3, 4, 16, 31, 32)] == [1, 1, 2, 4, 5, 6]
    t = points.TrollScore("u", "x", red_flags=2, upvotes=5, downvotes=1, spam_prompts=1, pii=2,
                          spam=9)
    assert t.troll_score == 6 - 5 + 1 + 1 + 2    # spam is counted, not scored (as OA)
    assert points.since("total") is None
    with pytest.raises(ValueError, match="time_frame 'year'"):
        points.since("year")


# ---------------------------------------------------------------- the store, both databases

@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "collect.db")
    return request.getfixturevalue("pg_url")


class Crowd:
    """Users and a tree manager on one store; `act` does one task of a kind."""

    def __init__(self, url, names=("ann", "bob", "cat", "dan"), seed=1, **settings):
        self.store = open_store(url, auth=FAST)
        self.u = {n: self.store.create_user(n) for n in names}
        self.mod = self.store.create_user("mod")
        self.tm = TreeManager(self.store.db, CollectSettings(**{**SMALL, **settings}),
                              random.Random(seed))
        self.tm.trees.set_role(self.mod.id, "moderator")

    def take(self, who, kind):
        user = self.mod if who == "mod" else self.u[who]
        r = self.tm.next_task(user, kind)
        return r["task"]

    def act(self, who, kind, body=None, **fields):
        t = self.take(who, kind)
        assert t is not None, f"{who} got no {kind}"
        user = self.mod if who == "mod" else self.u[who]
        if kind.startswith("label"):
            body = {"labels": fields}
        elif kind.startswith("rank"):
            ids = [r["message_id"] for r in t["replies"]]
            body = {"ranking": [ids.index(m) for m in fields["order"]]}
        return t, self.tm.submit(user, t["id"], body or fields)

    def state(self, tree_id):
        return self.tm.trees.tree(tree_id)["state"]

    def close(self):
        self.store.close()


def test_a_tree_from_prompt_to_ready_for_export(db_url):
    c = Crowd(db_url)
    tm = c.tm
    t, r = c.act("ann", "initial_prompt", text="  Why is the sky blue?  ", lang="en",
                 tags=["Science"])
    tree = r["tree"]["id"]
    assert r["tree"] == {"id": tree, "state": "initial_prompt_review"} and r["message_id"] == tree
    assert tm.trees.message(tree)["text"] == "Why is the sky blue?"
    assert tm.trees.tree(tree)["tags"] == ["science"]
    assert c.take("ann", "label_initial_prompt") is None          # not her own prompt
    # two review slots: bob and cat hold them, dan gets none until one frees up
    tb, tc = c.take("bob", "label_initial_prompt"), c.take("cat", "label_initial_prompt")
    assert tb["message_id"] == tc["message_id"] == tree and tb["id"] != tc["id"]
    assert tb["mode"] == "full" and tb["valid_labels"] == list(L.VALID["initial_prompt"])
    assert c.take("dan", "label_initial_prompt") is None
    tm.submit(c.u["bob"], tb["id"], {"labels": {"spam": 0, "quality": 1}})
    assert c.state(tree) == "initial_prompt_review"
    r = tm.submit(c.u["cat"], tc["id"], {"labels": {"spam": 0, "lang_mismatch": 0}})
    assert r["tree"]["state"] == "growing" and tm.trees.message(tree)["review_result"] is True

    # a reply slot is exclusive: dan writes, bob waits
    td = c.take("dan", "assistant_reply")
    assert td["conversation"] == [{"message_id": tree, "role": "prompter",
                                   "text": "Why is the sky blue?", "lang": "en"}]
    assert c.take("bob", "assistant_reply") is None
    spam = tm.submit(c.u["dan"], td["id"], {"text": "BUY CHEAP WATCHES"})["message_id"]
    _, r = c.act("bob", "assistant_reply", text="Rayleigh scattering of sunlight.")
    good_a = r["message_id"]
    assert c.take("cat", "assistant_reply") is None   # root + 2 in review: the goal of 3
    c.act("ann", "label_assistant_reply", spam=1)
    c.act("bob", "label_assistant_reply", spam=1)     # dan's reply, bob can't review his own
    assert tm.trees.message(spam)["review_result"] is False    # it leaves the tree
    assert tm.trees.message(good_a)["review_count"] == 0
    _, r = c.act("cat", "assistant_reply", text="Blue light scatters more.")
    good_b = r["message_id"]
    for who in ("ann", "dan"):
        for _ in range(2):
            c.act(who, "label_assistant_reply", spam=0, quality=0.75)
    assert c.state(tree) == "ranking"
    assert c.take("bob", "rank_assistant_replies") is None    # one of the replies is his
    assert c.take("cat", "rank_assistant_replies") is None
    t, r = c.act("ann", "rank_assistant_replies", order=[good_a, good_b])
    assert {m["message_id"] for m in t["replies"]} == {good_a, good_b}   # not the spam
    assert r["tree"]["state"] == "ranking"
    _, r = c.act("dan", "rank_assistant_replies", order=[good_a, good_b])
    assert r["tree"]["state"] == "ready_for_export"
    assert [tm.trees.message(m)["rank"] for m in (good_a, good_b, spam)] == [0, 1, None]
    assert c.take("mod", "rank_assistant_replies") is None     # nothing left to do here
    assert tm.next_task(c.mod)["task"]["type"] == "initial_prompt"   # a new tree may start

    # OA's points, counted by hand (module docstring of homellm/collect/points.py)
    board = {x["username"]: x for x in tm.leaderboard("day")}
    want = {"bob": 2 + 2 + 4 + 4 + 2 * 9,     # 2 reviews, a reply accepted, ranked first twice
            "cat": 2 + 4 + 4 + 2 * 3,         # 1 review, a reply accepted, ranked second twice
            "dan": 4 + 2 * 2 + 1 + 1,         # a rejected reply, 2 reviews, a good ranking
            "ann": 3 * 2 + 1 + 1}             # a prompt (0.1 -> 0), 3 reviews, a good ranking
    assert {n: board[n]["leader_score"] for n in want} == want
    assert [x["username"] for x in tm.leaderboard("total")] == ["bob", "cat", "dan", "ann"]
    assert board["bob"]["reply_ranked_1"] == 2 and board["cat"]["reply_ranked_2"] == 2
    assert board["bob"]["level"] == points.level(30) == 5
    assert board["ann"]["rank"] == 4 and board["ann"]["accepted_prompts"] == 1
    assert tm.leaderboard("week") == tm.leaderboard("month") == tm.leaderboard("total")
    c.store.db.run("UPDATE collect_reviews SET created_at = '2020-01-01T00:00:00+00:00'")
    day = {x["username"]: x for x in tm.leaderboard("day")}
    assert day["ann"]["labels_full"] == 0 and day["ann"]["leader_score"] == 2
    c.close()


def test_rejected_prompt_halted_tree_skip_and_expiry(db_url):
    c = Crowd(db_url, task_timeout_s=60)
    tm = c.tm
    _, r = c.act("ann", "initial_prompt", text="asdf", lang="en")
    bad = r["tree"]["id"]
    c.act("bob", "label_initial_prompt", spam=1)
    c.act("cat", "label_initial_prompt", spam=0, lang_mismatch=1)
    assert c.state(bad) == "aborted_low_grade"
    troll = {x["username"]: x for x in tm.trollboard(c.mod)}
    assert troll["ann"]["spam_prompts"] == 1 and troll["ann"]["spam"] == 1
    assert troll["ann"]["lang_mismatch"] == 1 and troll["ann"]["troll_score"] == 2

    _, r = c.act("ann", "initial_prompt", text="Name three rivers.", lang="en")
    tree = r["tree"]["id"]
    # a skip: that volunteer is not handed the same message again, the next one is
    t = c.take("bob", "label_initial_prompt")
    assert tm.skip(c.u["bob"], t["id"])["status"] == "skipped"
    assert c.take("bob", "label_initial_prompt") is None
    with pytest.raises(CollectError, match="was skipped") as e:
        tm.submit(c.u["bob"], t["id"], {"labels": {"spam": 0}})
    assert (e.value.status, e.value.code) == (409, "task_skipped")
    # a task not answered in time is released for others, and its late answer refused
    t = c.take("cat", "label_initial_prompt")
    assert c.take("cat", "label_initial_prompt")["id"] == t["id"]   # asked again: the same
    c.store.db.run("UPDATE collect_tasks SET expires_at = '2000-01-01T00:00:00+00:00' "
                   "WHERE id = ?", (t["id"],))
    assert c.take("dan", "label_initial_prompt")["message_id"] == tree
    with pytest.raises(CollectError, match="expired") as e:
        tm.submit(c.u["cat"], t["id"], {"labels": {"spam": 0}})
    assert e.value.code == "task_expired" and tm.trees.message(tree)["review_count"] == 0
    # halted by a moderator: its reservations are withdrawn and it hands out nothing
    held = c.take("mod", "label_initial_prompt")
    assert tm.halt(c.mod, tree)["state"] == "halted_by_moderator"
    with pytest.raises(CollectError, match="withdrawn"):
        tm.submit(c.mod, held["id"], {"labels": {"spam": 0}})
    for n in c.u:
        assert tm.next_task(c.u[n], "label_initial_prompt")["task"] is None
    assert tm.available(c.u["cat"])["label_initial_prompt"] == 0
    assert tm.halt(c.mod, tree, halt=False)["state"] == "initial_prompt_review"
    assert c.take("cat", "label_initial_prompt")["message_id"] == tree
    c.close()


def test_bad_input_gets_clear_errors(db_url):
    c = Crowd(db_url, max_message_chars=50)
    tm = c.tm
    t = c.take("ann", "initial_prompt")
    for body, code, param in (({"text": "   "}, "empty_text", "text"),
                              ({"text": "x" * 51}, "text_too_long", "text"),
                              ({"text": "ok", "lang": "english language"}, "invalid_lang",
                               "lang"),
                              ({"text": "ok", "tags": ["t"] * 6}, "invalid_value", "tags")):
        with pytest.raises(CollectError) as e:
            tm.submit(c.u["ann"], t["id"], body)
        assert (e.value.status, e.value.code, e.value.param) == (400, code, param), body
    r = tm.submit(c.u["ann"], t["id"], {"text": "What is 2 + 2?"})   # the task was kept
    with pytest.raises(CollectError, match="answered already") as e:
        tm.submit(c.u["ann"], t["id"], {"text": "again"})
    assert e.value.status == 409
    tree = r["tree"]["id"]
    t = c.take("bob", "label_initial_prompt")
    with pytest.raises(CollectError, match="not found") as e:   # not bob's task for cat
        tm.submit(c.u["cat"], t["id"], {"labels": {"spam": 0}})
    assert e.value.status == 404
    with pytest.raises(CollectError, match="not found"):
        tm.task(c.u["cat"], t["id"])
    for labels, param in (({"spam": 2}, "labels.spam"), ({"quality": 1}, "labels.spam"),
                          ({"spam": 0, "fails_task": 0}, "labels.fails_task")):
        with pytest.raises(CollectError) as e:
            tm.submit(c.u["bob"], t["id"], {"labels": labels})
        assert e.value.param == param and e.value.status == 400
    tm.submit(c.u["bob"], t["id"], {"labels": {"spam": 0}})
    c.act("cat", "label_initial_prompt", spam=0)
    for who in ("bob", "cat"):
        c.act(who, "assistant_reply", text=f"Four, says {who}.")
    for who in ("ann", "dan"):
        for _ in range(2):
            c.act(who, "label_assistant_reply", spam=0)
    assert c.state(tree) == "ranking"
    t = c.take("ann", "rank_assistant_replies")
    for ranking in ([0], [0, 0], [0, 2], [1, "0"], "01", [True, False]):
        with pytest.raises(CollectError, match="permutation of 0..1") as e:
            tm.submit(c.u["ann"], t["id"], {"ranking": ranking})
        assert (e.value.code, e.value.param) == ("invalid_ranking", "ranking")
    # "all replies are bad": without an order; a majority of them gives no ranks
    tm.submit(c.u["ann"], t["id"], {"not_rankable": True})
    c.act("dan", "rank_assistant_replies", order=[t["replies"][1]["message_id"],
                                                 t["replies"][0]["message_id"]])
    assert c.state(tree) == "ready_for_export"
    assert [tm.trees.message(r["message_id"])["rank"] for r in t["replies"]] == [1, 0]
    # roles: a volunteer cannot moderate
    for call in (lambda: tm.halt(c.u["ann"], tree), lambda: tm.delete_message(c.u["ann"], tree),
                 lambda: tm.ban(c.u["ann"], "bob"), lambda: tm.history(c.u["ann"], "bob"),
                 lambda: tm.trollboard(c.u["ann"]), lambda: tm.set_role(c.mod, "ann", "admin")):
        with pytest.raises(CollectError, match="only a") as e:
            call()
        assert e.value.status == 403
    with pytest.raises(CollectError, match="type 'dance'"):
        tm.next_task(c.u["ann"], "dance")
    c.close()


def test_edits_reports_and_moderation(db_url):
    c = Crowd(db_url, num_reviews_edit=2, auto_mod_red_flags=2)
    tm = c.tm
    _, r = c.act("ann", "initial_prompt", text="Wht is the capitol of France?", lang="en")
    tree = r["tree"]["id"]
    c.act("bob", "label_initial_prompt", spam=0)
    c.act("cat", "label_initial_prompt", spam=0)
    # an edit proposal, voted on by two others, then applied (the old text kept)
    e = tm.propose_edit(c.u["dan"], tree, "What is the capital of France?")
    with pytest.raises(CollectError, match="unchanged"):
        tm.propose_edit(c.u["dan"], tree, "Wht is the capitol of France?")
    assert c.take("dan", "review_edit") is None                    # not on his own
    t, _ = c.act("bob", "review_edit", approve=True)
    assert t["edit"] == {"edit_id": e["edit_id"], "original": "Wht is the capitol of France?",
                         "proposed": "What is the capital of France?"}
    c.act("cat", "review_edit", approve=True)
    assert tm.trees.message(tree)["text"] == "What is the capital of France?"
    assert c.store.db.one("SELECT text FROM collect_revisions")["text"].startswith("Wht")
    e2 = tm.propose_edit(c.u["bob"], tree, "Paris?")
    c.act("ann", "review_edit", approve=False)
    c.act("dan", "review_edit", approve=True)                      # 1 of 2: not above 0.6
    assert tm.trees.edit(e2["edit_id"])["status"] == "rejected"
    # reports: OA's red flag; two delete a reply with what is below it (auto-moderation)
    _, r = c.act("bob", "assistant_reply", text="Paris, obviously, you fool.")
    reply = r["message_id"]
    assert tm.report(c.u["ann"], reply, "rude")["removed"] is False
    with pytest.raises(CollectError, match="reason"):
        tm.report(c.u["cat"], reply, " ")
    assert tm.report(c.u["cat"], reply, "insulting")["removed"] is True
    assert tm.trees.message(reply)["deleted"] is True
    assert tm.emoji(c.u["ann"], tree, "+1")["emojis"] == {"+1": 1}
    assert tm.emoji(c.u["ann"], tree, "+1")["on"] is False        # toggled off
    with pytest.raises(CollectError, match="emoji 'red_flag'"):
        tm.emoji(c.u["ann"], tree, "red_flag")
    # moderators: history, delete, ban (not of a moderator), roles by an admin only
    h = tm.history(c.mod, "bob")
    assert [m["id"] for m in h["messages"]] == [reply] and len(h["reviews"]) == 1
    assert [r["reason"] for r in h["reports_about"]] == ["insulting", "rude"]
    assert {x["username"] for x in tm.trollboard(c.mod)} >= {"bob"}
    assert {x["username"]: x["red_flags"] for x in tm.trollboard(c.mod)}["bob"] == 2
    held = c.take("bob", "assistant_reply")
    assert tm.ban(c.mod, "bob")["tasks_cancelled"] == 1
    with pytest.raises(CollectError, match="banned") as e:
        tm.next_task(c.u["bob"])
    assert e.value.status == 403
    with pytest.raises(CollectError, match="banned"):
        tm.submit(c.u["bob"], held["id"], {"text": "x"})
    assert "bob" not in {x["username"] for x in tm.leaderboard()}
    tm.ban(c.mod, "bob", False)
    tm.trees.set_role(c.store.create_user("mod2").id, "moderator")
    with pytest.raises(CollectError, match="'mod2' is a moderator: a moderator cannot ban") \
            as e:
        tm.ban(c.mod, "mod2")
    assert e.value.status == 403
    admin = c.store.create_user("boss", is_admin=True)
    assert tm.set_role(admin, "ann", "moderator") == {"username": "ann", "role": "moderator"}
    assert tm.role(c.u["ann"]) == "moderator"
    with pytest.raises(CollectError, match="role 'king'"):
        tm.set_role(admin, "ann", "king")
    d = tm.delete_message(c.mod, tree)
    assert d["tree"]["state"] == "halted_by_moderator" and tree in d["deleted"]
    c.close()


def test_preferences_steer_tasks_prompt_rankings_and_skips(db_url):
    c = Crowd(db_url, max_active_trees=4, auto_mod_max_skip_reply=2)
    tm = c.tm
    trees = {}
    for who, text, lang, tags in (("ann", "How do I boil an egg?", "en", ["cooking"]),
                                  ("bob", "Was ist eine Primzahl?", "de", ["maths"]),
                                  ("cat", "What is a prime number?", "en", ["Maths"])):
        trees[who] = c.act(who, "initial_prompt", text=text, lang=lang, tags=tags)[1]["tree"]["id"]
    # languages are a filter: a German speaker is handed the German prompt only
    assert tm.set_prefs(c.u["dan"], ["de"], []) == {"langs": ["de"], "tags": []}
    assert tm.available(c.u["dan"])["label_initial_prompt"] == 1
    t = c.take("dan", "label_initial_prompt")
    assert t["message_id"] == trees["bob"] and t["lang"] == "de"
    tm.skip(c.u["dan"], t["id"])
    assert c.take("dan", "label_initial_prompt") is None
    assert tm.next_task(c.u["dan"], "label_initial_prompt", lang="en")["task"]["message_id"] \
        == trees["ann"]
    # topics come first: the oldest prompt about maths, then cooking when asked for
    tm.set_prefs(c.mod, [], ["maths"])
    t = c.take("mod", "label_initial_prompt")
    assert t["message_id"] == trees["bob"] and t["tags"] == ["maths"]
    tm.skip(c.mod, t["id"])
    t = c.take("mod", "label_initial_prompt")
    assert t["message_id"] == trees["cat"]
    tm.set_prefs(c.mod, [], ["cooking"])
    assert c.take("mod", "label_initial_prompt")["id"] == t["id"]   # held: handed back
    tm.skip(c.mod, t["id"])
    assert c.take("mod", "label_initial_prompt")["message_id"] == trees["ann"]
    for langs, tags, param in ((["english!"], [], "langs"), ([], ["x"] * 6, "tags"),
                               ([], ["y" * 33], "tags")):
        with pytest.raises(CollectError) as e:
            tm.set_prefs(c.u["ann"], langs, tags)
        assert e.value.param == param and e.value.status == 400
    # ranking prompts: only when asked for, never one's own
    tm.set_prefs(c.u["dan"], [], [])
    for who in ("dan", "mod"):   # the held reviews of ann's prompt, then two of cat's
        c.act(who, "label_initial_prompt", spam=0)
    for who in ("bob", "dan"):
        c.act(who, "label_initial_prompt", spam=0)
    assert c.state(trees["ann"]) == c.state(trees["cat"]) == "growing"
    assert c.take("ann", "rank_initial_prompts") is None     # one prompt not hers: too few
    t = c.take("dan", "rank_initial_prompts")
    assert {p["message_id"] for p in t["prompts"]} == {trees["ann"], trees["cat"]}
    with pytest.raises(CollectError, match="permutation of 0..1"):
        tm.submit(c.u["dan"], t["id"], {"ranking": [1]})
    tm.submit(c.u["dan"], t["id"], {"ranking": [1, 0]})
    row = c.store.db.one("SELECT * FROM collect_rankings WHERE user_id = ?", (c.u["dan"].id,))
    assert row["parent_id"] is None and json.loads(row["ranked_ids"]) == \
        [t["prompts"][1]["message_id"], t["prompts"][0]["message_id"]]
    # skipped by auto_mod_max_skip_reply volunteers, a reply task halts its tree (OA)
    tm.set_prefs(c.u["dan"], [], ["cooking"])
    for user in (c.u["dan"], c.mod):
        t = tm.next_task(user, "assistant_reply")["task"]
        assert t["message_id"] == trees["ann"]   # their topic first
        tm.skip(user, t["id"])
    assert c.state(trees["ann"]) == "halted_by_moderator" and c.state(trees["cat"]) == "growing"
    assert c.store.db.one("SELECT action FROM collect_log")["action"] == "auto_halt"
    c.close()


def test_concurrent_volunteers_through_the_store(db_url):
    """Sixteen volunteers in threads ask, skip and submit at once: no task is handed out
    twice, no message gets more reviews (no parent more rankings or replies) than its
    limit, and every submission is stored exactly once."""
    c = Crowd(db_url, names=tuple(f"v{i}" for i in range(16)), goal_tree_size=5,
              max_tree_depth=2, max_active_trees=3)
    tm, s = c.tm, c.tm.s
    handed, done, errors = [], Counter(), []
    lock = threading.Lock()

    def volunteer(i):
        rng = random.Random(i)
        user = c.u[f"v{i}"]
        try:
            for _ in range(40):
                t = tm.next_task(user)["task"]
                if t is None:
                    time.sleep(0.01)
                    continue
                with lock:
                    handed.append((t["id"], user.id))
                if rng.random() < 0.1:
                    tm.skip(user, t["id"])
                    continue
                body = _answer(t, rng)
                tm.submit(user, t["id"], body)
                with lock:
                    done[t["type"]] += 1
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(repr(e))
    threads = [threading.Thread(target=volunteer, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sum(done.values()) >= 200 and len(done) >= 5, done
    _check_invariants(c.store.db, s, handed, done)
    c.close()


def _answer(t: dict, rng: random.Random) -> dict:
    k = t["type"]
    if k in ("initial_prompt", "assistant_reply", "prompter_reply"):
        return {"text": f"{k} {rng.random():.6f}", "lang": "en"}
    if k.startswith("label"):
        return {"labels": {"spam": 1 if rng.random() < 0.15 else 0, "quality": 0.5}}
    if k.startswith("rank"):
        n = len(t.get("replies") or t.get("prompts"))
        return {"ranking": rng.sample(range(n), n)}
    return {"approve": rng.random() < 0.7}


def _check_invariants(db, s, handed, done):
    ids = [tid for tid, _ in handed]
    resumed = Counter(ids)   # a volunteer asking again is handed the task it holds
    owners = {}
    for tid, uid in handed:
        assert owners.setdefault(tid, uid) == uid, f"task {tid} handed to two volunteers"
    rows = {r["id"]: r for r in db.all("SELECT id, user_id, status, kind FROM collect_tasks")}
    assert set(rows) >= set(resumed)
    for tid, uid in owners.items():
        assert rows[tid]["user_id"] == uid
    n_done = Counter(r["kind"] for r in rows.values() if r["status"] == "done")
    assert n_done == done, (n_done, done)
    labels = sum(v for k, v in done.items() if k.startswith("label"))
    ranks = sum(v for k, v in done.items() if k.startswith("rank"))
    texts = sum(v for k, v in done.items() if k in ("initial_prompt", "assistant_reply",
                                                     "prompter_reply"))
    assert db.one("SELECT COUNT(*) AS n FROM collect_reviews")["n"] == labels
    assert db.one("SELECT COUNT(*) AS n FROM collect_rankings")["n"] == ranks
    assert db.one("SELECT COUNT(*) AS n FROM collect_messages")["n"] == texts
    assert db.one("SELECT COUNT(*) AS n FROM collect_trees")["n"] == done["initial_prompt"]
    for m in db.all("SELECT m.id, m.parent_id, m.review_count, m.ranking_count, "
                    "(SELECT COUNT(*) FROM collect_reviews r WHERE r.message_id = m.id) AS rv "
                    "FROM collect_messages m"):
        assert m["review_count"] == m["rv"]
        assert m["rv"] <= s.reviews_needed(m["parent_id"] is None), m
    for p in db.all("SELECT parent_id, COUNT(*) AS n FROM collect_rankings WHERE parent_id IS "
                    "NOT NULL GROUP BY parent_id"):
        assert p["n"] <= s.num_required_rankings, p
    for p in db.all("SELECT p.role, COUNT(c.id) AS n FROM collect_messages p JOIN "
                    "collect_messages c ON c.parent_id = p.id WHERE c.review_result IS NULL "
                    "OR c.review_result = ? GROUP BY p.id, p.role", (True,)):
        assert p["n"] <= (s.max_children_count if p["role"] == "prompter"
                          else s.num_prompter_replies), p
    for t in db.all("SELECT t.id, (SELECT COUNT(*) FROM collect_messages m WHERE m.tree_id = "
                    "t.id AND (m.review_result IS NULL OR m.review_result = ?)) AS size FROM "
                    "collect_trees t", (True,)):
        assert t["size"] <= s.goal_tree_size, t
    # the ranking count of each message is the rankings that include it
    counted = Counter()
    for r in db.all("SELECT ranked_ids FROM collect_rankings"):
        counted.update(json.loads(r["ranked_ids"]))
    for m in db.all("SELECT id, ranking_count FROM collect_messages"):
        assert m["ranking_count"] == counted[m["id"]]


# ---------------------------------------------------------------- over HTTP

class CollectServer:
    """create_app + web_router (--auth, collect settings) on a free port, in a thread."""

    def __init__(self, db_url, gguf, settings: CollectSettings, users=()):
        import uvicorn

        from homellm.serve import ModelRegistry, ServeConfig, create_app
        from homellm.serve.connections import server_config
        from homellm.serve.web import web_router
        from test_web_api import free_port
        self.store = open_store(db_url, auth=FAST)
        for name, password, role in users:
            u = self.store.create_user(name, password, is_admin=role == "admin")
            if role == "moderator":
                self.store.db.run("UPDATE users SET role = 'moderator' WHERE id = ?", (u.id,))
        registry = ModelRegistry({"smollm2:135m": gguf}, ServeConfig(
            ctx=512, max_batch=2, prefix_cache_bytes=0, keep_alive_s=-1))
        self.web = web_router(self.store, auth=True, collect=settings)
        self.app = create_app(registry, extra_routers=[self.web])
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(server_config(self.app, "127.0.0.1", self.port))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if time.monotonic() - t0 > 30 or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def login(self, name, password):
        from test_web_api import Client
        c = Client(self.url)
        r = c.post("/api/login", json={"username": name, "password": password})
        assert r.status_code == 200, r.text
        c.csrf = r.json()["csrf_token"]
        return c

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.store.close()


PEOPLE = [("ann", "ann-pass-123", "volunteer"), ("bob", "bob-pass-123", "volunteer"),
          ("cat", "cat-pass-123", "volunteer"), ("mo", "mo-pass-1234", "moderator"),
          ("root", "root-pass-12", "admin")]


@pytest.fixture
def http(tmp_path, default_gguf):
    s = CollectServer(str(tmp_path / "web.db"), default_gguf, CollectSettings(**SMALL), PEOPLE)
    yield s
    s.close()


def test_http_roles_privacy_and_errors(http):
    ann, bob = http.login("ann", "ann-pass-123"), http.login("bob", "bob-pass-123")
    mo, root = http.login("mo", "mo-pass-1234"), http.login("root", "root-pass-12")
    info = ann.get("/api/collect").json()
    assert info["role"] == "volunteer" and info["available"]["initial_prompt"] == 1
    assert info["settings"]["goal_tree_size"] == 3
    assert [k["type"] for k in info["kinds"]][:3] == ["initial_prompt", "assistant_reply",
                                                      "prompter_reply"]
    assert root.get("/api/collect").json()["role"] == "admin"
    assert ann.put("/api/collect/prefs", json={"langs": ["en"], "tags": ["Maths"]}).json() == \
        {"langs": ["en"], "tags": ["maths"]}
    r = ann.post("/api/collect/tasks", json={"type": "initial_prompt"})
    task = r.json()["task"]
    assert r.status_code == 200 and task["type"] == "initial_prompt" and task["lang"] == "en"
    # another volunteer: 404 on every route of it, like a missing task
    for method, path, body in (("GET", f"/api/collect/tasks/{task['id']}", None),
                               ("POST", f"/api/collect/tasks/{task['id']}/submit",
                                {"text": "mine now"}),
                               ("POST", f"/api/collect/tasks/{task['id']}/skip", None)):
        r = bob.request(method, path, json=body)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", r.text
    assert ann.get(f"/api/collect/tasks/{task['id']}").json()["id"] == task["id"]
    for body, status, code, param in (
            ({"text": ""}, 400, "empty_text", "text"),
            ({"text": "x" * 2001}, 400, "text_too_long", "text"),
            ({"text": "ok", "bogus": 1}, 400, "invalid_value", "bogus"),
            ({"text": 5}, 400, "invalid_value", "text")):
        r = ann.post(f"/api/collect/tasks/{task['id']}/submit", json=body)
        assert (r.status_code, r.json()["error"]["code"], r.json()["error"]["param"]) == \
            (status, code, param), r.text
    r = ann.post(f"/api/collect/tasks/{task['id']}/submit", json={"text": "What is pi?",
                                                                   "tags": ["maths"]})
    assert r.status_code == 200, r.text
    tree = r.json()["tree"]["id"]
    again = ann.post(f"/api/collect/tasks/{task['id']}/submit", json={"text": "x"})
    assert again.status_code == 409 and again.json()["error"]["code"] == "task_done"
    # a volunteer cannot moderate: 403 on every moderator route
    for method, path, body in (("GET", "/api/collect/trees", None),
                               ("GET", f"/api/collect/trees/{tree}", None),
                               ("POST", f"/api/collect/trees/{tree}/halt", {"halt": True}),
                               ("POST", f"/api/collect/messages/{tree}/delete", None),
                               ("POST", f"/api/collect/messages/{tree}/synthetic", {}),
                               ("GET", "/api/collect/reports", None),
                               ("GET", "/api/collect/trollboard", None),
                               ("GET", "/api/collect/users/bob", None),
                               ("POST", "/api/collect/users/bob/ban", {"banned": True}),
                               ("PUT", "/api/collect/users/bob/role", {"role": "moderator"}),
                               ("GET", "/api/collect/export", None)):
        r = bob.request(method, path, json=body)
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error", \
            (path, r.text)
    r = mo.put("/api/collect/users/bob/role", json={"role": "moderator"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "not_admin"
    assert mo.get("/api/collect/trees").json()["trees"][0]["id"] == tree
    view = mo.get(f"/api/collect/trees/{tree}").json()
    assert view["tree"]["state"] == "initial_prompt_review"
    assert view["messages"][0]["username"] == "ann" and view["tree"]["tags"] == ["maths"]
    assert root.put("/api/collect/users/bob/role", json={"role": "moderator"}).json() == \
        {"username": "bob", "role": "moderator"}
    assert bob.get("/api/collect/trees").status_code == 200
    # labels out of range and rankings that are not permutations: 400 naming the field
    t = mo.post("/api/collect/tasks", json={"type": "label_initial_prompt"}).json()["task"]
    r = mo.post(f"/api/collect/tasks/{t['id']}/submit", json={"labels": {"spam": 3}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "labels.spam"
    assert mo.post(f"/api/collect/tasks/{t['id']}/submit",
                   json={"labels": {"spam": 0}}).status_code == 200
    assert ann.post("/api/collect/tasks", json={"type": "nope"}).status_code == 400
    r = mo.post(f"/api/collect/trees/{tree}/halt", json={"halt": True})
    assert r.json() == {"tree_id": tree, "state": "halted_by_moderator"}
    t = bob.post("/api/collect/tasks", json={"type": "label_initial_prompt"}).json()
    assert t["task"] is None and t["reason"].startswith("no 'label_initial_prompt' tasks")
    assert mo.post("/api/collect/users/root/ban", json={}).status_code == 403
    r = mo.post("/api/collect/users/ann/ban", json={"banned": True})
    assert r.json()["banned"] is True
    r = ann.post("/api/collect/tasks", json={})
    assert r.status_code == 403 and r.json()["error"]["code"] == "banned"
    board = ann.get("/api/collect/leaderboard?time_frame=week").json()
    assert board["time_frame"] == "week" and "ann" not in {x["username"]
                                                           for x in board["leaderboard"]}
    assert ann.get("/api/collect/leaderboard?time_frame=year").status_code == 400
    for page in ("/contribute", "/contributors", "/moderate"):
        r = ann.get(page)
        assert r.status_code == 200 and "text/html" in r.headers["content-type"]


def _http_volunteer(server, name, password, rounds, record, errors):
    rng = random.Random(name)
    try:
        c = server.login(name, password)
        answered, waiting_since = 0, time.monotonic()
        while answered < rounds:   # `rounds` tasks, or nothing for 2 s (however fast the
            # server answers "nothing now": the others' answers unlock the next tasks)
            r = c.post("/api/collect/tasks", json={"type": "random"})
            assert r.status_code == 200, r.text
            t = r.json()["task"]
            if t is None:
                if time.monotonic() - waiting_since > 2.0:
                    break
                time.sleep(0.05)
                continue
            record("handed", (t["id"], name))
            r = c.post(f"/api/collect/tasks/{t['id']}/submit", json=_answer(t, rng))
            assert r.status_code == 200, r.text
            record("done", t["type"])
            answered, waiting_since = answered + 1, time.monotonic()
        c.close()
    except Exception as e:  # noqa: BLE001  (reported by the test)
        errors.append(f"{name}: {e!r}")


def test_collect_requests_run_on_the_apps_own_database_threads(http):
    """The collection's routes (the caller's session lookup too) run on the web app's few
    database threads, each on the connection it opened when the app was made: requests at
    once open no connection (FastAPI's pool gave each of up to 40 threads its own, left open
    when the thread was dropped); and while the server runs, Python's full collections skip
    what existed when it started (gc.freeze)."""
    import gc
    for i in range(12):
        http.store.create_user(f"w{i:02d}", "worker-pass-1")
    users = [http.login(f"w{i:02d}", "worker-pass-1") for i in range(12)]
    db = http.store.db
    threads = http.web.web_state.threads
    assert threads.n >= 1 and gc.get_freeze_count() > 0
    opened = len(db._all)
    errors = []

    def ask(c):
        try:
            for _ in range(6):
                r = c.post("/api/collect/tasks", json={"type": "random"})
                assert r.status_code == 200, r.text
                t = r.json()["task"]
                if t is not None:
                    r = c.post(f"/api/collect/tasks/{t['id']}/skip")
                    assert r.status_code == 200, r.text
                assert c.get("/api/collect?brief=true").status_code == 200
        except Exception as e:  # noqa: BLE001  (reported by the test)
            errors.append(repr(e))
    workers = [threading.Thread(target=ask, args=(c,)) for c in users]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert errors == []
    assert len(db._all) == opened


def test_the_database_threads_reconnect_after_postgresql_drops_them(pg_server,  # noqa: F811
                                                                    default_gguf):
    """The web app's database threads live as long as the server (they end with it): when
    PostgreSQL drops their connections (a restart), each request that finds its connection
    gone fails (500), and the thread's next one connects again; from then on every request
    works."""
    import httpx
    import psycopg
    url = new_database(pg_server)
    server = CollectServer(url, default_gguf, CollectSettings(**SMALL), PEOPLE[:1])
    try:
        ann = server.login("ann", "ann-pass-123")
        assert ann.post("/api/collect/tasks", json={"type": "random"}).status_code == 200
        with psycopg.connect(url, autocommit=True) as con:
            killed = con.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                                 "datname = current_database() AND pid <> pg_backend_pid()"
                                 ).fetchall()
        n = server.web.web_state.threads.n
        assert len(killed) >= n
        cookie = {"homellm_session": ann.cookies["homellm_session"]}

        def ask() -> int:   # a connection each (a failed request may close its own)
            try:
                return httpx.get(server.url + "/api/collect?brief=true", cookies=cookie,
                                 timeout=30).status_code
            except httpx.HTTPError:
                return 0
        codes = [ask() for _ in range(3 * n + 6)]
        failed = [i for i, c in enumerate(codes) if c != 200]
        assert len(failed) <= 2 * n and all(c == 200 for c in codes[-n - 2:]), codes
        threads = list(server.web.web_state.threads._pool._threads)
    finally:
        server.close()
    for t in threads:   # the app's shutdown ends them
        t.join(timeout=10)
    assert len(threads) == n and not any(t.is_alive() for t in threads)


def test_task_answers_are_the_json_fastapi_writes(http):
    """next-task and submit answer with the bytes and content type FastAPI's JSONResponse
    gives (they skip its jsonable_encoder walk): UTF-8 as is, no spaces."""
    from fastapi.responses import JSONResponse
    ann, bob = http.login("ann", "ann-pass-123"), http.login("bob", "bob-pass-123")
    text = "Warum ist der Himmel blau? \u2600 \u00e9\u2028\"quoted\""
    r = ann.post("/api/collect/tasks", json={"type": "initial_prompt"})
    answers = [r]
    answers.append(ann.post(f"/api/collect/tasks/{r.json()['task']['id']}/submit",
                            json={"text": text, "lang": "de"}))
    answers.append(bob.post("/api/collect/tasks", json={"type": "label_initial_prompt"}))
    answers.append(bob.post("/api/collect/tasks", json={"type": "random"}))   # resumed
    for r in answers:
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/json"
        assert r.content == JSONResponse(r.json()).body
    assert answers[2].json()["task"]["conversation"][0]["text"] == text
    assert "\u2600".encode() in answers[2].content and answers[3].json()["resumed"] is True


@pytest.mark.slow
def test_fifty_volunteers_at_once_over_http_on_postgresql(pg_server, default_gguf):  # noqa: F811
    users = [(f"vol{i:02d}", f"password-{i:02d}", "volunteer") for i in range(50)]
    settings = CollectSettings(goal_tree_size=6, max_tree_depth=2, num_reviews_initial_prompt=2,
                               num_reviews_reply=2, num_required_rankings=2, max_active_trees=4)
    server = CollectServer(new_database(pg_server), default_gguf, settings, users)
    handed, done, errors = [], Counter(), []
    lock = threading.Lock()

    def record(kind, value):
        with lock:
            if kind == "handed":
                handed.append(value)
            else:
                done[value] += 1
    threads = [threading.Thread(target=_http_volunteer, args=(server, n, p, 12, record, errors))
               for n, p, _ in users]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert errors == [] and not any(t.is_alive() for t in threads)
        ids = {u.username: u.id for u in server.store.list_users()}
        _check_invariants(server.store.db, settings, [(t, ids[n]) for t, n in handed], done)
        assert sum(done.values()) >= 150 and len(set(t for t, _ in handed)) == \
            sum(done.values())
        assert server.store.db.one("SELECT COUNT(*) AS n FROM collect_trees WHERE state = "
                                   "'ready_for_export'")["n"] >= 1
    finally:
        server.close()


@pytest.mark.slow
def test_a_served_models_reply_joins_a_tree_as_synthetic(http):
    ann, bob = http.login("ann", "ann-pass-123"), http.login("bob", "bob-pass-123")
    cat, mo = http.login("cat", "cat-pass-123"), http.login("mo", "mo-pass-1234")

    def do(c, kind, body):
        t = c.post("/api/collect/tasks", json={"type": kind}).json()["task"]
        assert t is not None, kind
        r = c.post(f"/api/collect/tasks/{t['id']}/submit", json=body)
        assert r.status_code == 200, r.text
        return t, r.json()
    _, r = do(ann, "initial_prompt", {"text": "Name a color.", "lang": "en"})
    tree = r["tree"]["id"]
    r = mo.post(f"/api/collect/messages/{tree}/synthetic", json={})
    assert r.status_code == 409 and r.json()["error"]["code"] == "tree_not_growing"
    do(bob, "label_initial_prompt", {"labels": {"spam": 0}})
    do(cat, "label_initial_prompt", {"labels": {"spam": 0}})
    r = mo.post(f"/api/collect/messages/{tree}/synthetic",
                json={"max_tokens": 8, "temperature": 0})
    assert r.status_code == 201, r.text
    mid = r.json()["message_id"]
    assert r.json()["model_name"] == "smollm2:135m"
    m = TreeManager(http.store.db).trees.message(mid)
    assert m["synthetic"] is True and m["model_name"] == "smollm2:135m" and m["user_id"] is None
    assert m["text"].strip() and m["review_result"] is None
    # it is reviewed like everyone's (by anyone: no author), then exported as synthetic
    t, _ = do(ann, "label_assistant_reply", {"labels": {"spam": 0}})
    assert t["message_id"] == mid
    do(bob, "label_assistant_reply", {"labels": {"spam": 0}})
    do(cat, "assistant_reply", {"text": "Blue."})
    for c in (ann, bob):
        do(c, "label_assistant_reply", {"labels": {"spam": 0}})
    t, r = do(ann, "rank_assistant_replies", {"ranking": [0, 1]})
    assert t["reveal_synthetic"] is False and "synthetic" not in t["replies"][0]
    do(bob, "rank_assistant_replies", {"ranking": [1, 0]})
    export = mo.get("/api/collect/export").text.splitlines()
    tree_json = json.loads(export[0])
    models = {r["message_id"]: (r["synthetic"], r.get("model_name"))
              for r in tree_json["prompt"]["replies"]}
    assert models[mid] == (True, "smollm2:135m") and len(models) == 2
    assert tree_json["tree_state"] == "ready_for_export"
    r = mo.post(f"/api/collect/messages/{tree}/synthetic", json={})
    assert r.status_code == 409 and r.json()["error"]["code"] == "tree_not_growing"


def test_settings_dataclass_round_trip():
    s = CollectSettings(**SMALL)
    assert CollectSettings(**s.as_dict()) == s
    assert dataclasses.asdict(s) == s.as_dict()
