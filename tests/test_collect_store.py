"""The collection's store under a volunteer's requests (issue 15's speed target): how many SQL
statements (SQLite) and round trips (PostgreSQL) a next-task and a submit take, the indexes
the candidate queries use, and the reads that replaced loops (a conversation's path, a
review's row, ranking counts), with the same results as before, on SQLite and PostgreSQL.

The counts are exact (not timings): on PostgreSQL a round trip is an answer waited for
(Database.round_trips; statements queued in a batched transaction go out together), and the
counts are what benchmarks/collect_bench.py's `direct` scenario reports.
"""
from __future__ import annotations

import random

import pytest
from pg_server import pg_server, pg_url  # noqa: F401  (fixtures)

from homellm.collect import CollectError, CollectSettings, TreeManager
from homellm.collect import tasks as K
from homellm.store import AuthConfig, open_store
from homellm.store import collect_trees as CT
from homellm.store.db import now

FAST = AuthConfig(argon2_time_cost=1, argon2_memory_kib=8192, argon2_parallelism=1)
SMALL = dict(goal_tree_size=3, max_tree_depth=2, num_reviews_initial_prompt=2,
             num_reviews_reply=2, num_required_rankings=2, max_active_trees=2,
             p_full_labeling_review_reply_prompter=1.0)
OK = {"spam": 0, "lang_mismatch": 0, "not_appropriate": 0, "pii": 0, "hate_speech": 0,
      "sexual_content": 0, "quality": 1}


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "collect.db")
    return request.getfixturevalue("pg_url")


class Counted:
    """A store and tree manager whose SQL statements are counted (BEGIN/COMMIT aside), and
    on PostgreSQL its round trips (Database.round_trips: BEGIN and COMMIT included)."""

    def __init__(self, url, **settings):
        self.store = open_store(url, auth=FAST)
        self.pg = self.store.db.dialect.name == "postgresql"
        self.tm = TreeManager(self.store.db, CollectSettings(**{**SMALL, **settings}),
                              random.Random(3))
        self.u = {n: self.store.create_user(n) for n in ("ann", "bob", "cat", "dan")}
        self.n = 0
        execute = self.store.db._execute

        def counted(sql, params=(), *rest):
            self.n += 1
            return execute(sql, params, *rest)
        self.store.db._execute = counted

    def statements(self, fn, *args):
        n0 = self.n
        out = fn(*args)
        return out, self.n - n0

    def trips(self, fn, *args):
        """fn(*args) and what it cost: round trips on PostgreSQL, statements on SQLite (in
        the process: no round trips)."""
        if not self.pg:
            return self.statements(fn, *args)
        n0 = self.store.db.round_trips
        out = fn(*args)
        return out, self.store.db.round_trips - n0

    def do(self, who, kind, body):
        t = self.tm.next_task(self.u[who], kind)["task"]
        assert t is not None, f"{who}: no {kind}"
        return t, self.tm.submit(self.u[who], t["id"], body)


def labels_for(task):
    return {k: v for k, v in OK.items() if k in task["valid_labels"]}


def test_next_task_and_submit_take_few_statements(db_url):
    """SQLite, statements: a reservation: the user with their live tasks, the kind's
    candidates, the conversation, the tree's lock and the insert-if-still-free (5; it was 9
    to 11); a submission: the user with the task, the lock, the claim, the write and the
    state check (6; it was 10 to 12), more where it decides a review or moves the tree.

    PostgreSQL, round trips: a reservation 3 (the user, their live tasks and the first
    kind's candidates in one statement; the conversation; BEGIN, the tree's lock, the
    insert-if-still-free and COMMIT in one batch); a submission 4 (the user, the task, its
    lock and the claim with the BEGIN; the write with the state check; COMMIT); nothing to
    do 1. Before: 7, 8 and 2 (and a request over HTTP one more: its session)."""
    c = Counted(db_url)
    tm, u = c.tm, c.u
    seen = []

    def step(who, kind, body=None):
        r, n = c.trips(tm.next_task, u[who], kind)
        t = r["task"]
        seen.append(n)
        if t is None:
            return None, None
        if body is None:
            body = {"labels": labels_for(t)}
        r, n = c.trips(tm.submit, u[who], t["id"], body)
        seen.append(n)
        return t, r

    t, r = step("ann", "initial_prompt", {"text": "Why is ice slippery?"})
    tree = r["tree"]["id"]
    for who in ("bob", "cat"):   # the second review decides: the tree grows
        t, r = step(who, "label_initial_prompt")
        assert t["conversation"][0]["text"] == "Why is ice slippery?"
    assert r["tree"] == {"id": tree, "state": "growing"}
    t, r = step("bob", "assistant_reply", {"text": "A thin film of water."})
    assert [m["text"] for m in t["conversation"]] == ["Why is ice slippery?"]
    assert (t["lang"], t["tags"]) == ("en", [])
    assert r["tree"] == {"id": tree, "state": "growing"}
    reply = r["message_id"]
    for who in ("ann", "cat"):
        t, r = step(who, "label_assistant_reply")
        assert [m["message_id"] for m in t["conversation"]] == [tree, reply]
    assert tm.trees.message(reply)["review_result"] is True
    assert step("bob", "label_assistant_reply") == (None, None)   # nothing left for bob
    if c.pg:   # (was [7, 9,  7, 8,  7, 12,  7, 8,  7, 8,  7, 10,  2])
        assert seen == [3, 5,  3, 4,  3, 6,  3, 4,  3, 4,  3, 5,  1]
    else:
        limits = [5, 7,  5, 6,  5, 10,  5, 7,  5, 6,  5, 8,  2]
        assert len(seen) == len(limits) and all(n <= m for n, m in zip(seen, limits)), seen
    c.store.close()


def test_path_and_reviews_read_as_before(db_url, monkeypatch):
    """path() is the walk up from a message (one query now), [] for an unknown one; a review
    returns the message as it is after it, with UPDATE ... RETURNING or without (SQLite
    before 3.35)."""
    c = Counted(db_url)
    trees = c.tm.trees
    trees.insert_tree("t1", "growing", "en", [], "homellm", 12, 3, 3)
    ids = ["t1"]
    for depth in range(4):
        ids.append(trees.insert_message(
            tree_id="t1", parent_id=ids[-1] if depth else None, depth=depth,
            role="prompter" if depth % 2 == 0 else "assistant", text=f"m{depth}", lang="en",
            user_id=None, author=None, message_id=None if depth else "t1"))
    ids = ids[1:]
    for i, mid in enumerate(ids):
        assert trees.path(mid) == [trees.message(x) for x in ids[:i + 1]]
    assert trees.path("nope") == []
    for returning in (True, False):
        monkeypatch.setattr(CT, "_RETURNING", returning)
        before = trees.message(ids[1])
        who = c.u["ann" if returning else "bob"]
        m = trees.add_review(None, ids[1], who.id, {"quality": 1}, "simple")
        assert m == {**trees.message(ids[1]), "updated_at": m["updated_at"]}
        assert m["review_count"] == before["review_count"] + 1
    assert trees.ranking_counts([ids[0], ids[2]]) == {ids[0]: 0, ids[2]: 0}
    trees.add_ranking(None, ids[0], c.u["ann"].id, [ids[1]], [0], False)
    trees.add_ranking(None, ids[0], c.u["bob"].id, [ids[1]], [0], False)
    assert trees.ranking_counts([ids[0], ids[2]]) == {ids[0]: 2, ids[2]: 0}
    c.store.close()


def test_a_reservation_is_not_made_for_a_target_taken_meanwhile(db_url):
    """reserve() inserts only while the target is still a candidate: the last review slot
    of a prompt taken by another volunteer after the candidates were read is not handed
    out again."""
    c = Counted(db_url, num_reviews_initial_prompt=1)
    tm = c.tm
    t = tm.next_task(c.u["ann"], "initial_prompt")["task"]
    tree = tm.submit(c.u["ann"], t["id"], {"text": "Name a prime."})["tree"]["id"]
    s, langs = tm.s, []
    stamp = now()
    cands = tm.tasks.candidates("label_initial_prompt", c.u["bob"].id, langs, s, stamp)
    assert [x["target_id"] for x in cands] == [tree]
    assert (cands[0]["lang"], cands[0]["tags"]) == ("en", "[]")
    held = tm.next_task(c.u["cat"], "label_initial_prompt")["task"]   # the one slot
    assert held["message_id"] == tree
    later = "9999-01-01T00:00:00.000000+00:00"
    assert tm.tasks.reserve("label_initial_prompt", c.u["bob"].id, langs, s, tree, tree,
                            {}, now(), later) is None
    assert tm.next_task(c.u["bob"], "label_initial_prompt")["task"] is None
    tm.skip(c.u["cat"], held["id"])   # the slot is free again
    tid = tm.tasks.reserve("label_initial_prompt", c.u["bob"].id, langs, s, tree, tree, {},
                           now(), later)
    assert tm.tasks.get(tid)["status"] == "reserved"
    c.store.close()


def test_role_and_task_read_together_keep_their_answers(db_url):
    """A banned volunteer is told so (403) before anything about the task, even one that
    does not exist; a user id with no account row is a volunteer, not banned."""
    c = Counted(db_url)
    tm = c.tm
    mod = c.store.create_user("mod")
    tm.trees.set_role(mod.id, "moderator")
    tm.ban(mod, "dan")
    for task_id in ("nope", "0" * 32):
        with pytest.raises(CollectError, match="banned") as e:
            tm.submit(c.u["dan"], task_id, {"text": "x"})
        assert e.value.status == 403
    with pytest.raises(CollectError) as e:
        tm.submit(c.u["ann"], "nope", {"text": "x"})
    assert e.value.status == 404
    assert tm.tasks.role_and_task("no-such-user", "nope") == ("volunteer", False, None)
    assert tm.tasks.user_and_live("no-such-user", now()) == ("volunteer", False, [], [], [])
    tm.set_prefs(c.u["ann"], ["en", "de"], ["Maths"])
    t = tm.next_task(c.u["ann"], "initial_prompt")["task"]
    role, banned, langs, tags, live = tm.tasks.user_and_live(c.u["ann"].id, now())
    assert (role, banned, langs, tags) == ("volunteer", False, ["en", "de"], ["maths"])
    assert [x["id"] for x in live] == [t["id"]] and live[0]["payload"]["lang"] == "en"
    assert live == tm.tasks.live_of(c.u["ann"].id, now())
    assert tm.tasks.user_and_live(mod.id, now())[:2] == ("moderator", False)
    c.store.close()


def test_candidate_queries_use_the_live_reservation_indexes(tmp_path):
    """SQLite's plans (EXPLAIN QUERY PLAN): the live reservations of a candidate are counted
    through the partial indexes of migration 010 (by target, by tree), never by scanning
    every live reservation of a kind; prompts to review are found from the trees in review,
    not from every tree's prompt."""
    store = open_store(str(tmp_path / "plans.db"), auth=FAST)
    tm = TreeManager(store.db, CollectSettings())
    me = store.create_user("ann").id
    for kind in ("label_initial_prompt", "label_assistant_reply", "label_prompter_reply",
                 "assistant_reply", "prompter_reply", "rank_assistant_replies",
                 "rank_prompter_replies", "review_edit"):
        sql, params = tm.tasks._candidates_sql(kind, me, ["en"], tm.s, now())
        plan = [r["detail"] for r in store.db.all("EXPLAIN QUERY PLAN " + sql, params)]
        counts = [p for p in plan if p.startswith("SEARCH k ")]
        assert counts and all("collect_tasks_live_target" in p or "collect_tasks_live_tree" in p
                              or "collect_tasks_target" in p for p in counts), (kind, plan)
        if kind == "label_initial_prompt":
            assert plan[0] == "SEARCH t USING INDEX collect_trees_state (state=?)", plan
    store.close()


def _volunteers_at_random(url: str, steps: int = 60, seed: int = 5, **settings
                          ) -> tuple[list[str], list[int]]:
    """Six volunteers taking turns at "random" tasks (seeded), answering each: the kinds
    handed out, and what each request for a task cost (Counted.trips)."""
    c = Counted(url, **settings)
    for n in ("eve", "fay"):
        c.u[n] = c.store.create_user(n)
    rng = random.Random(seed)
    kinds, counts = [], []
    for i in range(steps):
        who = list(c.u)[i % len(c.u)]
        r, n = c.trips(c.tm.next_task, c.u[who])
        counts.append(n)
        t = r["task"]
        kinds.append(t and t["type"])
        if t is None:
            continue
        if t["type"] in ("initial_prompt", "assistant_reply", "prompter_reply"):
            body = {"text": f"{t['type']} {i}", "lang": "en"}
        elif t["type"].startswith("label"):
            body = {"labels": {**labels_for(t), "spam": int(rng.random() < 0.2)}}
        else:
            body = {"ranking": rng.sample(range(len(t["replies"])), len(t["replies"]))}
        c.tm.submit(c.u[who], t["id"], body)
    c.store.close()
    return kinds, counts


def test_random_tasks_are_the_same_on_both_databases(tmp_path, pg_url):
    """PostgreSQL reads the user, their live tasks and the first kind of the drawn order
    that has candidates (with them) in one statement, SQLite looks each kind up in turn:
    with the same seed both hand out the same kinds in the same order. On PostgreSQL a
    request that finds nothing is 1 round trip (it was 2; 9 statements on SQLite), one that
    finds a task 3 (a ranking 4: its replies are read too)."""
    lite, lite_n = _volunteers_at_random(str(tmp_path / "a.db"), max_active_trees=1)
    pg, pg_n = _volunteers_at_random(pg_url, max_active_trees=1)
    assert lite == pg
    assert {"initial_prompt", "assistant_reply", "label_initial_prompt",
            "label_assistant_reply", "rank_assistant_replies", None} <= set(lite), lite
    nothing = [i for i, k in enumerate(pg) if k is None]
    assert nothing and all(pg_n[i] == 1 for i in nothing), pg_n
    assert all(lite_n[i] == 9 for i in nothing), lite_n
    assert all(n == (4 if k.startswith("rank") else 3) for k, n in zip(pg, pg_n) if k), \
        list(zip(pg, pg_n))


def test_a_ranking_and_a_merge_write_in_one_statement_each(db_url):
    """Under the tree's lock a ranking adds one to each ranked reply's ranking_count, and
    merging a tree's rankings sets every reply's rank (None: unranked), each in one UPDATE
    whatever the number of replies (a statement a reply held the lock a round trip each)."""
    c = Counted(db_url)
    trees = c.tm.trees
    trees.insert_tree("t1", "ranking", "en", [], "homellm", 12, 3, 3)
    trees.insert_message(tree_id="t1", parent_id=None, depth=0, role="prompter", text="q",
                         lang="en", user_id=None, author=None, message_id="t1")
    kids = [trees.insert_message(tree_id="t1", parent_id="t1", depth=1, role="assistant",
                                 text=f"a{i}", lang="en", user_id=None, author=None)
            for i in range(4)]
    _, n = c.statements(trees.add_ranking, None, "t1", c.u["ann"].id, kids[::-1],
                        [3, 2, 1, 0], False)
    assert n == 2   # the ranking, then the counts
    _, n = c.statements(trees.add_ranking, None, "t1", c.u["bob"].id, kids[:2], [0, 1],
                        False)
    assert n == 2
    assert [trees.message(k)["ranking_count"] for k in kids] == [2, 2, 1, 1]
    assert trees.message("t1")["ranking_count"] == 0
    ranks = {kids[0]: 1, kids[1]: 0, kids[2]: None, kids[3]: 2}
    _, n = c.statements(trees.set_ranks, ranks)
    assert n == 1
    assert {k: trees.message(k)["rank"] for k in kids} == ranks
    assert trees.message("t1")["rank"] is None
    _, n = c.statements(trees.set_ranks, {kids[3]: None, kids[0]: 0})   # ranks change
    assert n == 1
    assert [trees.message(k)["rank"] for k in kids] == [0, 0, None, None]
    c.store.close()


def test_a_session_is_read_with_its_user_in_one_statement(db_url):
    """Every request of a logged-in page looks its session up: the session and its user are
    one statement (they were two), with the same answers: the session, None for an unknown
    or expired token."""
    c = Counted(db_url)
    s = c.store.create_session(c.u["ann"])
    got, n = c.statements(c.store.session, s.token)
    assert n == 1 and got == s and got.user == c.store.get_user(c.u["ann"].id)
    assert c.statements(c.store.session, "forged") == (None, 1)
    expired = c.store.create_session(c.u["bob"], ttl_s=-1)
    assert c.store.session(expired.token) is None
    assert c.store.session(None) is None and c.store.session("") is None
    c.store.close()


def test_next_state_reads_what_the_lookups_in_turn_find(pg_url):  # noqa: F811
    """PostgreSQL's one statement for a next-task (CollectTasks.next_state) against the reads
    it replaces (user_and_live, then each kind of the drawn order looked up in turn until
    one has candidates): the same user row, live tasks, first kind and candidates (in the
    same order), for every volunteer, drawn orders, a language asked for or the user's
    preferred ones, and nothing while they hold a task."""
    _volunteers_at_random(pg_url, steps=40, max_active_trees=2)
    store = open_store(pg_url, auth=FAST)
    s = CollectSettings(**{**SMALL, "max_active_trees": 3})   # (one new tree may start)
    tm = TreeManager(store.db, s, random.Random(1))
    users = {u["username"]: u["id"] for u in store.db.all("SELECT username, id FROM users")}
    users["(no account)"] = "no-such-user"
    tm.trees.set_prefs(users["eve"], ["de"], ["maths"])
    tm.trees.set_prefs(users["fay"], ["en", "de"], [])
    held = tm.next_task(users["dan"])["task"]
    assert held is not None
    rng = random.Random(2)
    kinds = [k for k in K.KINDS if k != K.RANK_PROMPTER_REPLIES]
    found = set()
    for name, uid in sorted(users.items()):
        for lang in (None, "en", "de"):
            for order in [K.random_order(dict.fromkeys(kinds, 1), rng) for _ in range(6)] + \
                    [[k] for k in K.KINDS]:
                t = now()
                got = tm.tasks.next_state(uid, lang, order, s, t, s.max_active_trees)
                role, banned, langs, tags, live = tm.tasks.user_and_live(uid, t)
                assert (got["role"], got["banned"], got["langs"], got["tags"]) == \
                    (role, banned, langs, tags)
                assert got["live"] == live
                want = (None, [])
                if not live:
                    for k, cands in tm.tasks.candidates_in_order(
                            order, uid, [lang] if lang else langs, s, t, s.max_active_trees):
                        if cands:
                            want = (k, cands)
                            break
                assert (got["kind"], got["candidates"]) == want, (name, lang, order)
                found.add(got["kind"])
    assert {None, "initial_prompt", "label_assistant_reply", "assistant_reply",
            "rank_initial_prompts"} <= found, found
    store.close()


def test_next_task_uses_generic_plans_on_postgresql(pg_url):  # noqa: F811
    """The candidate statements are long: planned for each call's parameters (PostgreSQL's
    custom plans, which it chose on some databases on every call) they cost more than they
    run. They run with the generic plan (made once per connection, pg_prepared_statements
    shows no custom plan once psycopg has prepared them)."""
    c = Counted(pg_url)
    for i in range(12):   # psycopg prepares a statement from its 5th use on a connection
        c.tm.next_task(c.u["bob" if i % 2 else "cat"], "label_initial_prompt")
        c.tm.next_task(c.u["ann"], "initial_prompt")
    plans = c.store.db.all("SELECT generic_plans, custom_plans FROM pg_prepared_statements "
                           "WHERE statement LIKE 'WITH RECURSIVE me AS%'")
    assert plans and all(p["custom_plans"] == 0 and p["generic_plans"] > 0 for p in plans), \
        plans
    c.store.close()


def test_a_submission_failing_in_a_queued_write_leaves_nothing_written(db_url):
    """A submission's claim, review and count go out together (PostgreSQL): when one of the
    writes fails on the server, the whole submission is rolled back: the task is still
    reserved, the message's review count as it was, no review added; the task can then be
    answered."""
    c = Counted(db_url)
    tm, u = c.tm, c.u
    t, r = c.do("ann", "initial_prompt", {"text": "Why is the sea salty?"})
    tree = r["tree"]["id"]
    t = tm.next_task(u["bob"], "label_initial_prompt")["task"]
    # a review of bob's of that prompt, written behind the collection's back: his own
    # review then breaks the one-review-per-volunteer index on the server
    c.store.db.run("INSERT INTO collect_reviews (task_id, message_id, user_id, labels, mode, "
                   "created_at) VALUES (NULL, ?, ?, '{}', 'simple', ?)", (tree, u["bob"].id,
                                                                          now()))
    with pytest.raises(Exception) as e:
        tm.submit(u["bob"], t["id"], {"labels": labels_for(t)})
    assert c.store.db.dialect.is_unique_violation(e.value), e.value
    assert tm.tasks.get(t["id"])["status"] == "reserved"
    assert tm.trees.message(tree)["review_count"] == 0
    assert c.store.db.one("SELECT COUNT(*) AS n FROM collect_reviews")["n"] == 1
    c.store.db.run("DELETE FROM collect_reviews")
    assert tm.submit(u["bob"], t["id"], {"labels": labels_for(t)})["task"]["status"] == "done"
    assert tm.trees.message(tree)["review_count"] == 1
    c.store.close()
