"""homellm.store on SQLite and on a real PostgreSQL server: migrations, trees, people,
isolation, search, streaming killed mid-reply, oasst export/import and SFT/DPO from the db."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from homellm.data.oasst import (dpo_pairs, export_trees, import_trees, sft_examples,
                                tree_to_dict)
from homellm.errors import HomellmError
from homellm.store import AuthConfig, LoginLocked, Store, open_store
from homellm.store.db import Database
from homellm.store.migrations import MIGRATIONS

from pg_server import new_database, pg_server, pg_url  # noqa: F401  (fixtures)

FAST = AuthConfig(argon2_time_cost=1, argon2_memory_kib=1024, argon2_parallelism=1,
                  max_failures=3, lockout_s=60)
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/homellm.db"  # sqlite:////abs/path
    return request.getfixturevalue("pg_url")


@pytest.fixture
def store(url):
    s = open_store(url, auth=FAST)
    yield s
    s.close()


def schema(db: Database) -> list:
    """The schema as comparable rows (tables, columns, indexes, triggers)."""
    if db.dialect.name == "sqlite":
        rows = db.all("SELECT type, name, tbl_name, sql FROM sqlite_master "
                      "WHERE name NOT LIKE 'sqlite_%' ORDER BY type, name")
        return [tuple(r.values()) for r in rows]
    cols = db.all("SELECT table_name, column_name, data_type, is_nullable, column_default "
                  "FROM information_schema.columns WHERE table_schema = 'public' "
                  "ORDER BY table_name, column_name")
    idx = db.all("SELECT tablename, indexname, indexdef FROM pg_indexes "
                 "WHERE schemaname = 'public' ORDER BY indexname")
    return [tuple(r.values()) for r in cols + idx]


def fill(s: Store, version: int):
    """Rows valid at schema `version` (number of migrations applied)."""
    if version >= 1:
        s.db.run("INSERT INTO users (id, username, is_admin, share_feedback, created_at) "
                 "VALUES ('u1', 'old', ?, ?, '2024-01-01T00:00:00+00:00')", (True, False))
    if version >= 2:
        s.db.run("INSERT INTO conversations (id, user_id, title, created_at, updated_at) "
                 "VALUES ('c1', 'u1', 'Old chat about penguins', '2024', '2024')")
        s.db.run("INSERT INTO messages (id, conversation_id, parent_id, role, content, "
                 "created_at, updated_at) VALUES ('m1', 'c1', NULL, 'user', ?, '2024', '2024')",
                 ("Do penguins fly?",))


# ---------------------------------------------------------------- migrations

def test_migrations_from_every_earlier_version(url, request):
    fresh = Store(url, auth=FAST)
    full = schema(fresh.db)
    assert fresh.db.applied() == [m.name for m in MIGRATIONS]
    assert fresh.db.migrate() == []  # idempotent
    fresh.close()
    for k in range(len(MIGRATIONS)):
        # a new empty database for each starting version
        u = url.replace("homellm.db", f"v{k}.db") if url.startswith("sqlite") else \
            new_database(request.getfixturevalue("pg_server"))
        old = Store(u, auth=FAST, migrate=False)
        assert old.db.migrate(upto=k) == [m.name for m in MIGRATIONS[:k]]
        snapshot = schema(old.db)
        assert (snapshot == full) == (k == len(MIGRATIONS))
        fill(old, k)
        old.close()
        s = open_store(u, auth=FAST)  # brings it forward
        assert s.db.applied() == [m.name for m in MIGRATIONS]
        assert schema(s.db) == full
        if k >= 2:  # data from before the search index is found by it
            me = s.user_by_name("old")
            assert [h.conversation_id for h in s.search(me, "penguin")] == ["c1"]
            assert s.search(me, "fly")[0].message_id == "m1"
        s.close()


def test_database_from_a_newer_homellm_is_refused(store):
    store.db.run("INSERT INTO migrations (name, applied_at) VALUES ('999_future', 'x')")
    with pytest.raises(HomellmError, match="newer homellm"):
        open_store(store.url, auth=FAST)


# ---------------------------------------------------------------- the tree

def test_tree_operations(store):
    me = store.local_user()
    c = store.create_conversation(me, title="Sky", model="m", system_prompt="Be brief.",
                                  sampling={"temperature": 0.7})
    q1 = store.add_message(me, c.id, "user", "Why is the sky blue?", parent_id=None)
    a1 = store.add_message(me, c.id, "assistant", "Rayleigh scattering.", parent_id=q1.id,
                           model="m", seed=7, sampling={"temperature": 0.7}, prompt_tokens=9,
                           completion_tokens=4, timings={"decode_tps": 50.0},
                           finish_reason="stop")
    assert (a1.seed, a1.timings, a1.incomplete, a1.finish_reason) == \
        (7, {"decode_tps": 50.0}, False, "stop")
    a2 = store.add_message(me, c.id, "assistant", "Because of air.", parent_id=q1.id)  # regen
    q2 = store.add_message(me, c.id, "user", "And sunsets?", parent_id=a2.id)
    e1 = store.edit_message(me, q1.id, "Why is the sea blue?")  # a new branch at the root
    assert e1.parent_id is None and e1.role == "user"
    assert store.get_message(me, q1.id).content == "Why is the sky blue?"  # never overwritten

    assert [m.id for m in store.siblings(me, a1.id)] == [a1.id, a2.id]
    assert [m.id for m in store.siblings(me, q1.id)] == [q1.id, e1.id]
    assert [m.id for m in store.children(me, q1.id)] == [a1.id, a2.id]
    assert [m.id for m in store.path(me, q2.id)] == [q1.id, a2.id, q2.id]
    # the current branch is the edit; reopening the store shows the same
    assert store.get_conversation(me, c.id).current_leaf_id == e1.id
    store.close()
    s2 = open_store(store.url, auth=FAST)
    turns = s2.branch(me, c.id)
    assert [(t.message.id, t.index, t.sibling_ids) for t in turns] == [(e1.id, 1, [q1.id, e1.id])]
    # walk to the first root: its newest reply (a2) and below
    turns = s2.select(me, q1.id)
    assert [(t.message.id, t.index) for t in turns] == [(q1.id, 0), (a2.id, 1), (q2.id, 0)]
    assert s2.get_conversation(me, c.id).current_leaf_id == q2.id
    turns = s2.select(me, a1.id)
    assert [t.message.id for t in turns] == [q1.id, a1.id]
    assert [t.message.id for t in s2.branch(me, c.id, q2.id)] == [q1.id, a2.id, q2.id]
    s2.close()


def test_tree_rules(store):
    me = store.local_user()
    c = store.create_conversation(me)
    with pytest.raises(HomellmError, match="starts with a user message"):
        store.add_message(me, c.id, "assistant", "hi", parent_id=None)
    q = store.add_message(me, c.id, "user", "hi", parent_id=None)
    with pytest.raises(HomellmError, match="roles alternate"):
        store.add_message(me, c.id, "user", "again", parent_id=q.id)
    with pytest.raises(HomellmError, match="expected 'user' or 'assistant'"):
        store.add_message(me, c.id, "system", "x", parent_id=None)
    other = store.create_conversation(me)
    with pytest.raises(HomellmError, match="not in conversation"):
        store.add_message(me, other.id, "assistant", "x", parent_id=q.id)
    with pytest.raises(HomellmError, match="only assistant"):
        store.rate(me, q.id, 1)
    assert len(store.messages(me, c.id)) == 1 and store.messages(me, other.id) == []


def test_settings_ratings_delete(store):
    me = store.local_user()
    c = store.create_conversation(me, title="t")
    c2 = store.update_conversation(me, c.id, title="Renamed", sampling={"top_k": 5})
    assert (c2.title, c2.sampling) == ("Renamed", {"top_k": 5})
    with pytest.raises(HomellmError, match="cannot change"):
        store.update_conversation(me, c.id, user_id="x")
    q = store.add_message(me, c.id, "user", "q", parent_id=None)
    a = store.add_message(me, c.id, "assistant", "a", parent_id=q.id)
    assert store.rate(me, a.id, 1, "nice").value == 1
    r = store.rate(me, a.id, -1)
    assert (r.value, r.comment) == (-1, None)
    assert store.ratings(me, c.id)[a.id].value == -1
    assert store.branch(me, c.id)[-1].rating.value == -1
    assert store.rate(me, a.id, 0) is None and store.ratings(me, c.id) == {}
    with pytest.raises(HomellmError, match="expected"):
        store.rate(me, a.id, 5)
    assert [x.id for x in store.list_conversations(me)] == [c.id]
    assert store.delete_conversation(me, c.id)
    assert store.get_message(me, a.id) is None and store.list_conversations(me) == []
    assert store.db.one("SELECT COUNT(*) AS n FROM messages")["n"] == 0


# ---------------------------------------------------------------- people

def test_users_sessions_and_rate_limit(store):
    alice = store.create_user("alice", "correct horse", share_feedback=True)
    assert alice.has_password and not alice.is_admin
    with pytest.raises(HomellmError, match="taken"):
        store.create_user("alice", "another pass")
    with pytest.raises(HomellmError, match="invalid username"):
        store.create_user("no spaces", "longenough")
    with pytest.raises(HomellmError, match="too short"):
        store.create_user("bob", "short")
    pw = store.db.one("SELECT password_hash FROM users WHERE id = ?", (alice.id,))["password_hash"]
    assert pw.startswith("$argon2id$") and "correct horse" not in pw
    s = store.login("alice", "correct horse", client="10.0.0.1")
    assert s.user.id == alice.id and len(s.token) > 30 and s.csrf_token
    assert store.db.one("SELECT COUNT(*) AS n FROM sessions WHERE token_hash = ?",
                        (s.token,))["n"] == 0  # only the hash is stored
    assert store.session(s.token).user.username == "alice"
    assert store.session("forged") is None
    assert store.logout(s.token) and store.session(s.token) is None
    expired = store.create_session(alice, ttl_s=-1)
    assert store.session(expired.token) is None and store.purge_expired_sessions() == 1
    # wrong passwords: None, then locked (even with the right password)
    assert store.login("alice", "wrong one") is None
    assert store.login("nobody", "wrong one") is None
    assert store.login("alice", "wrong two") is None
    assert store.login("alice", "wrong three") is None
    with pytest.raises(LoginLocked) as e:
        store.login("alice", "correct horse")
    assert 0 < e.value.retry_after_s <= 60
    store.db.run("UPDATE login_attempts SET locked_until = '2000-01-01T00:00:00+00:00'")
    assert store.login("alice", "correct horse") is not None
    local = store.local_user()
    assert local.is_admin and not local.has_password and store.local_user().id == local.id
    assert store.login("local", "") is None


def test_concurrent_first_setups_make_exactly_one_admin(url):
    """Six setups at once, each through its own Store (as six server processes would):
    one admin, the others SetupDone, on SQLite and PostgreSQL."""
    import threading
    from homellm.store.people import SetupDone
    stores = [open_store(url, auth=FAST) for _ in range(6)]
    assert stores[0].needs_setup()
    barrier, results = threading.Barrier(len(stores)), {}

    def setup(i):
        barrier.wait()
        try:
            results[i] = stores[i].create_first_admin(f"admin{i}", f"password-{i}").username
        except SetupDone:
            results[i] = "refused"

    threads = [threading.Thread(target=setup, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results.values() if r != "refused"]
    assert len(results) == 6 and len(winners) == 1, results
    assert [(u.username, u.is_admin) for u in stores[0].list_users()] == [(winners[0], True)]
    assert not stores[0].needs_setup()
    with pytest.raises(SetupDone):
        stores[1].create_first_admin("late", "password-late")
    with pytest.raises(HomellmError, match="too short"):
        stores[1].create_first_admin("late", "short")
    for s in stores:
        s.close()


def test_login_limits_are_per_user_and_address(store):
    """Failures from one address lock that (user, address) pair only: the same user still
    logs in from another address; the lock grows with each lockout; the admin unlocks."""
    store.create_user("admin", "admin-pass-1", is_admin=True)
    for _ in range(3):  # max_failures
        assert store.login("admin", "guess", client="10.6.6.6") is None
    with pytest.raises(LoginLocked) as e:
        store.login("admin", "admin-pass-1", client="10.6.6.6")
    assert 55 < e.value.retry_after_s <= 60
    assert store.login("admin", "admin-pass-1", client="10.0.0.2") is not None
    assert 55 < store.login_locks()["admin"] <= 60
    # the lock expires; the next lockout at that address lasts twice as long
    from homellm.store.db import now
    store.db.run("UPDATE login_attempts SET locked_until = ? WHERE address = '10.6.6.6' "
                 "AND username = 'admin'", (now(),))
    for _ in range(3):
        assert store.login("admin", "guess", client="10.6.6.6") is None
    with pytest.raises(LoginLocked) as e:
        store.login("admin", "guess", client="10.6.6.6")
    assert 115 < e.value.retry_after_s <= 120
    assert store.unlock_logins("admin") >= 1 and store.login_locks() == {}
    assert store.login("admin", "admin-pass-1", client="10.6.6.6") is not None


def test_successful_logins_never_lock_their_address(store):
    """Only failures count against an address: a class behind one address logs in many times
    (here 3x the address limit), and its failures still lock it."""
    from homellm.store.people import AuthConfig
    store.auth = AuthConfig(argon2_time_cost=1, argon2_memory_kib=1024, argon2_parallelism=1,
                            max_failures=3, max_address_failures=4)
    for i in range(12):
        store.create_user(f"pupil{i}", f"pupil-pass-{i}")
        assert store.login(f"pupil{i}", f"pupil-pass-{i}", client="10.9.9.9") is not None
    for i in range(4):  # four users, one failure each: the address's limit, not a pair's
        assert store.login(f"pupil{i}", "wrong", client="10.9.9.9") is None
    with pytest.raises(LoginLocked):
        store.login("pupil5", "pupil-pass-5", client="10.9.9.9")


def test_concurrent_wrong_passwords_get_no_more_checks_than_the_limit(store):
    import threading
    store.create_user("carol", "carol-pass-1")
    outcomes, barrier = [], threading.Barrier(12)

    def attempt():
        barrier.wait()
        try:
            outcomes.append(store.login("carol", "wrong-pass", client="10.1.1.1"))
        except LoginLocked:
            outcomes.append("locked")

    threads = [threading.Thread(target=attempt) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count(None) == 3 and outcomes.count("locked") == 9, outcomes


def test_each_user_sees_only_their_own(store):
    alice, bob = store.create_user("alice"), store.create_user("bob")
    c = store.create_conversation(alice, title="secret plans")
    q = store.add_message(alice, c.id, "user", "my secret", parent_id=None)
    a = store.add_message(alice, c.id, "assistant", "kept", parent_id=q.id)
    assert store.get_conversation(bob, c.id) is None
    assert store.list_conversations(bob) == []
    assert store.messages(bob, c.id) == [] and store.branch(bob, c.id) == []
    assert store.get_message(bob, q.id) is None and store.path(bob, a.id) == []
    assert store.siblings(bob, a.id) == [] and store.children(bob, q.id) == []
    assert store.select(bob, a.id) == [] and store.leaf_below(bob, q.id) is None
    assert store.add_message(bob, c.id, "user", "intrude", parent_id=None) is None
    assert store.start_reply(bob, c.id, q.id) is None
    assert store.edit_message(bob, q.id, "changed") is None
    assert store.rate(bob, a.id, 1) is None and store.ratings(bob, c.id) == {}
    assert store.update_conversation(bob, c.id, title="mine now") is None
    assert not store.delete_conversation(bob, c.id)
    assert store.search(bob, "secret") == [] and store.dump_conversation(bob, c.id) is None
    assert [m.content for m in store.messages(alice, c.id)] == ["my secret", "kept"]
    assert store.get_conversation(alice, c.id).title == "secret plans"
    assert [h.conversation_id for h in store.search(alice, "secret")] == [c.id]
    with pytest.raises(HomellmError, match="only an admin"):
        store.shared_feedback(bob)


def test_shared_feedback_only_from_opted_in_users(store):
    admin = store.create_user("admin", is_admin=True)
    for name, share in (("yes", True), ("no", False)):
        u = store.create_user(name, share_feedback=share)
        for rated in (True, False):
            c = store.create_conversation(u, title=f"{name} {rated}")
            q = store.add_message(u, c.id, "user", "q", parent_id=None)
            a = store.add_message(u, c.id, "assistant", "a", parent_id=q.id)
            if rated:
                store.rate(u, a.id, -1, "meh")
    dumps = store.shared_feedback(admin)
    assert [d.conversation.title for d in dumps] == ["yes True"]
    assert [(r.value, r.comment) for r in dumps[0].ratings] == [(-1, "meh")]
    trees = export_trees(store, admin, shared=True)
    assert [t.homellm["title"] for t in trees] == ["yes True"]
    assert trees[0].prompt.replies[0].events["rating"][0]["user_id"] == "yes"


# ---------------------------------------------------------------- search

def test_search(store):
    me = store.local_user()
    c1 = store.create_conversation(me, title="Penguins of Antarctica")
    q = store.add_message(me, c1.id, "user", "Tell me about emperor penguins.", parent_id=None)
    c2 = store.create_conversation(me, title="Cooking")
    q2 = store.add_message(me, c2.id, "user", "How long to boil an egg?", parent_id=None)
    a2 = store.add_message(me, c2.id, "assistant", "Boil the EGG for 7 minutes; penguins "
                           "do not cook.", parent_id=q2.id)
    hits = store.search(me, "penguins")
    assert [(h.conversation_id, h.message_id) for h in hits] == [(c2.id, a2.id), (c1.id, None)]
    assert "penguins" in hits[0].snippet
    assert [h.message_id for h in store.search(me, "Emperor PENG")] == [q.id]  # prefix, any case
    assert [h.conversation_id for h in store.search(me, "egg boil")] == [c2.id]  # every word
    assert store.search(me, "egg penguinsx") == []
    assert store.search(me, "  ?! ") == []
    assert [h.conversation_id for h in store.search(me, "antarc")] == [c1.id]
    store.update_conversation(me, c1.id, title="Birds")
    assert store.search(me, "antarc") == [] and store.search(me, "birds")[0].message_id is None
    store.delete_conversation(me, c2.id)
    assert [h.conversation_id for h in store.search(me, "penguins")] == [c1.id]


# ---------------------------------------------------------------- streaming and crashes

def test_stream_reply_finishes(store):
    me = store.local_user()
    c = store.create_conversation(me)
    q = store.add_message(me, c.id, "user", "Count.", parent_id=None)
    with store.start_reply(me, c.id, q.id, model="m", seed=3, flush_tokens=2,
                           flush_s=1e9) as w:
        assert store.get_message(me, w.id).incomplete
        assert store.get_conversation(me, c.id).current_leaf_id == w.id
        for piece in ["one", " two", " three"]:
            w.append(piece)
        assert store.get_message(me, w.id).content == "one two"  # saved every 2 pieces
        m = w.finish(finish_reason="stop", prompt_tokens=4, completion_tokens=3,
                     timings={"decode_tps": 12.5})
    assert (m.content, m.incomplete, m.finish_reason, m.completion_tokens, m.seed) == \
        ("one two three", False, "stop", 3, 3)
    # an exception inside: what was streamed stays, incomplete
    with pytest.raises(RuntimeError):
        with store.start_reply(me, c.id, q.id, flush_s=1e9, flush_tokens=100) as w2:
            w2.append("partial")
            raise RuntimeError("client went away")
    m2 = store.get_message(me, w2.id)
    assert (m2.content, m2.incomplete) == ("partial", True)
    assert [x.id for x in store.siblings(me, m.id)] == [m.id, m2.id]


WRITER = textwrap.dedent("""
    import sys, time
    from homellm.store import open_store
    s = open_store(sys.argv[1])
    me = s.local_user()
    c = s.create_conversation(me, title="killed")
    q = s.add_message(me, c.id, "user", "Tell a long story.", parent_id=None)
    w = s.start_reply(me, c.id, q.id, model="m", flush_tokens=1)
    i = 0
    while True:
        w.append(f"w{i} ")
        i += 1
        if i == 50:
            print(c.id, flush=True)
        time.sleep(0.002)
""")


def test_killed_mid_reply_keeps_streamed_text_marked_incomplete(store, tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen([sys.executable, str(script), store.url], stdout=subprocess.PIPE,
                         env=env, text=True)
    try:
        cid = p.stdout.readline().strip()
        assert cid, "the writer did not start"
        time.sleep(0.2)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    s = open_store(store.url, auth=FAST)
    me = s.local_user()
    msgs = s.messages(me, cid)
    assert [m.role for m in msgs] == ["user", "assistant"]
    reply = msgs[1]
    assert reply.incomplete and reply.finish_reason is None
    words = reply.content.split()
    assert len(words) >= 50 and words == [f"w{i}" for i in range(len(words))]
    assert s.get_conversation(me, cid).current_leaf_id == reply.id
    if s.db.dialect.name == "sqlite":
        assert s.db.one("PRAGMA integrity_check")["integrity_check"] == "ok"
    s.close()


def test_restore_is_all_or_nothing(store):
    me = store.local_user()
    msgs = [{"id": "r1", "parent_id": None, "role": "user", "content": "q"},
            {"id": "r2", "parent_id": "nope", "role": "assistant", "content": "a"}]
    with pytest.raises(HomellmError, match="parent nope is missing"):
        store.restore_conversation(me, {"title": "x"}, msgs, [])
    assert store.list_conversations(me) == []
    assert store.db.one("SELECT COUNT(*) AS n FROM messages")["n"] == 0


# ---------------------------------------------------------------- oasst out and back in

def build_rated_conversation(store, me):
    """The hand-built tree of test_oasst, made through the store's own operations."""
    c = store.create_conversation(me, title="Sums", system_prompt="Be brief.", model="m",
                                  sampling={"temperature": 0.5})
    p1 = store.add_message(me, c.id, "user", "What is 2+2?", parent_id=None)
    a1 = store.add_message(me, c.id, "assistant", "4", parent_id=p1.id, model="m", seed=1,
                           timings={"decode_tps": 9.5}, finish_reason="stop")
    p2 = store.add_message(me, c.id, "user", "And 3+3?", parent_id=a1.id)
    a3 = store.add_message(me, c.id, "assistant", "6", parent_id=p2.id)
    a4 = store.add_message(me, c.id, "assistant", "7", parent_id=p2.id)
    store.add_message(me, c.id, "user", "Thanks", parent_id=a1.id)
    p4 = store.add_message(me, c.id, "user", "Why?", parent_id=a1.id)
    store.add_message(me, c.id, "assistant", "Because.", parent_id=p4.id)
    a2 = store.add_message(me, c.id, "assistant", "5", parent_id=p1.id)
    store.add_message(me, c.id, "assistant", "four", parent_id=p1.id)
    w = store.start_reply(me, c.id, p1.id, model="m")
    w.append("Four, bec")
    w.flush()  # never finished: incomplete
    store.rate(me, a1.id, 1, "right")
    store.rate(me, a2.id, -1, "wrong")
    store.rate(me, a3.id, 1)
    store.rate(me, a4.id, -1)
    store.rate(me, w.id, 1)
    store.edit_message(me, p1.id, "What is 2+3?")  # a second root: a second tree
    store.select(me, a3.id)
    return c


U = lambda t: {"role": "user", "content": t}  # noqa: E731
A = lambda t: {"role": "assistant", "content": t}  # noqa: E731
SYS = {"role": "system", "content": "Be brief."}


def test_export_sft_dpo_and_import_round_trip(store, url, request):
    me = store.local_user()
    c = build_rated_conversation(store, me)
    trees = export_trees(store, me)
    assert [t.prompt.text for t in trees] == ["What is 2+2?", "What is 2+3?"]
    t = trees[0]
    assert t.homellm["conversation_id"] == c.id and t.homellm["system_prompt"] == "Be brief."
    assert t.homellm["current_leaf_id"] == trees[0].prompt.replies[0].replies[0].replies[0] \
        .message_id and "current_leaf_id" not in trees[1].homellm
    a1 = t.prompt.replies[0]
    assert (a1.rank, a1.emojis, a1.synthetic, a1.model_name, a1.homellm) == \
        (0, {"+1": 1}, True, "m", {"seed": 1, "timings": {"decode_tps": 9.5},
                                   "finish_reason": "stop"})
    assert a1.events == {"rating": [{"type": "rating", "user_id": "local", "rating": "+1",
                                     "comment": "right"}]}
    assert t.prompt.user_id == "local" and t.prompt.synthetic is False
    # the incomplete reply ties with "4" (ranked after it by reply order); never a target
    assert sft_examples(t) == [
        {"messages": [SYS, U("What is 2+2?"), A("4"), U("And 3+3?"), A("6")]},
        {"messages": [SYS, U("What is 2+2?"), A("4"), U("Why?"), A("Because.")]}]
    assert dpo_pairs(t) == [
        {"prompt": [SYS, U("What is 2+2?")], "chosen": [A("4")], "rejected": [A("5")]},
        {"prompt": [SYS, U("What is 2+2?"), A("4"), U("And 3+3?")],
         "chosen": [A("6")], "rejected": [A("7")]}]
    assert sft_examples(trees[1]) == [] and dpo_pairs(trees[1]) == []

    # into a fresh database of the same kind: the same trees come back out
    other_url = url.replace("homellm.db", "other.db") if url.startswith("sqlite") else \
        new_database(request.getfixturevalue("pg_server"))
    with open_store(other_url, auth=FAST) as s2:
        me2 = s2.local_user()
        (c2,) = import_trees(s2, me2, trees)
        again = export_trees(s2, me2)
        want = [tree_to_dict(x) for x in trees]
        got = [tree_to_dict(x) for x in again]
        for w in want:  # a new conversation id; everything else is equal
            w["homellm"]["conversation_id"] = c2.id
        assert got == want
        assert [(x.message.content, x.index) for x in s2.branch(me2, c2.id)] == \
            [("What is 2+2?", 0), ("4", 0), ("And 3+3?", 0), ("6", 0)]
        assert s2.ratings(me2, c2.id)  # the owner's ratings became this user's
    # into the same database: ids are taken, so new ones; the trees are the same otherwise
    (c3,) = import_trees(store, me, trees)
    copy = export_trees(store, me, [c3.id])
    assert [m.text for m in copy[0].messages()] == [m.text for m in trees[0].messages()]
    assert copy[0].message_tree_id != trees[0].message_tree_id


def test_import_foreign_oasst_tree_keeps_its_fields(store):
    me = store.local_user()
    line = {"message_tree_id": "x0", "tree_state": "ready_for_export", "prompt": {
        "message_id": "x0", "parent_id": None, "user_id": "someone", "text": "Hola", "role":
        "prompter", "lang": "es", "review_count": 3, "deleted": False, "synthetic": False,
        "emojis": {"_skip_reply": 2}, "labels": {"spam": {"value": 0.0, "count": 3}},
        "detoxify": {"toxicity": 0.01}, "replies": [
            {"message_id": "x1", "parent_id": "x0", "text": "¡Hola!", "role": "assistant",
             "rank": 0, "lang": "es", "synthetic": False, "replies": []},
            {"message_id": "x2", "parent_id": "x0", "text": "Hi", "role": "assistant",
             "rank": 1, "lang": "es", "emojis": {"+1": 1, "-1": 2}, "replies": []}]}}
    from homellm.data.oasst import tree_from_dict
    tree = tree_from_dict(json.loads(json.dumps(line)))
    (c,) = import_trees(store, me, [tree])
    assert c.title == "Hola"
    (out,) = export_trees(store, me)
    p = out.prompt
    assert (p.lang, p.review_count, p.emojis, p.labels, p.extra, p.user_id) == \
        ("es", 3, {"_skip_reply": 2}, {"spam": {"value": 0.0, "count": 3}},
         {"detoxify": {"toxicity": 0.01}}, "local")
    x1, x2 = p.replies
    assert (x1.synthetic, x2.emojis) == (False, {"+1": 1, "-1": 2})
    # x2 carries votes, so ranks come from votes: x2 rated (score -1) is rank 0 of the rated
    assert (x1.rank, x2.rank) == (None, 0)
    # votes of other people are kept, anonymous
    assert sorted((r["user_id"], r["value"]) for r in store.db.all(
        "SELECT user_id, value FROM ratings")) == [(None, -1), (None, -1), (None, 1)]


def test_bad_urls_and_unwritable_places(tmp_path):
    with pytest.raises(HomellmError, match="unknown scheme"):
        open_store("mysql://x/y")
    with pytest.raises(HomellmError, match="does not exist"):
        open_store(tmp_path / "no" / "such" / "dir" / "h.db")
    with pytest.raises(HomellmError, match="sqlite:///"):
        open_store("sqlite://h.db")
    (tmp_path / "junk.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(HomellmError, match="junk.db"):
        open_store(tmp_path / "junk.db")
    with pytest.raises(HomellmError, match="cannot connect") as e:
        open_store("postgresql://me:hunter2@/db?host=/nonexistent&port=1")
    assert "hunter2" not in str(e.value)


def test_default_location(homellm_home):
    with open_store() as s:
        assert Path(s.url) == homellm_home / "homellm.db"
        assert s.db.one("PRAGMA journal_mode")["journal_mode"] == "wal"
        assert s.db.one("PRAGMA foreign_keys")["foreign_keys"] == 1


def test_threads_write_concurrently(store):
    """A web server's worker threads share one Store: every write lands, none is lost."""
    import threading
    me = store.local_user()
    c = store.create_conversation(me, first_message="root")
    root = store.get_conversation(me, c.id).current_leaf_id
    assert [m.content for m in store.messages(me, c.id)] == ["root"]
    errors = []

    def worker(k):
        try:
            for i in range(10):
                w = store.start_reply(me, c.id, root, flush_tokens=1)
                w.append(f"t{k}-{i}")
                w.finish(finish_reason="stop")
                store.rate(me, w.id, 1 if i % 2 else -1)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    replies = store.children(me, root)
    assert sorted(m.content for m in replies) == sorted(f"t{k}-{i}" for k in range(4)
                                                        for i in range(10))
    assert not any(m.incomplete for m in replies) and len(store.ratings(me, c.id)) == 40


def test_search_words_split_like_both_engines(store):
    me = store.local_user()
    c = store.create_conversation(me, first_message="call snake_case_name() and café")
    assert [h.conversation_id for h in store.search(me, "snake_case")] == [c.id]
    assert [h.conversation_id for h in store.search(me, "case name")] == [c.id]
    assert [h.conversation_id for h in store.search(me, "CAFÉ")] == [c.id]
    assert store.search(me, "cafe") == []  # accents are kept on both
