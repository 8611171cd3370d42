"""Batched transactions (Database.transaction(batch=True) and Database.queue): on PostgreSQL
the statements go out together in psycopg's pipeline mode, BEGIN and COMMIT included, and
the answers are read afterwards; on SQLite queue() runs at once. The same results on both:
all or nothing, errors raised (never swallowed), the connection usable afterwards, and on
PostgreSQL the round trips counted by Database.round_trips.
"""
from __future__ import annotations

import pytest
from pg_server import pg_server, pg_url  # noqa: F401  (fixtures)

from homellm.errors import HomellmError
from homellm.store.db import Database


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    url = str(tmp_path / "b.db") if request.param == "sqlite" else \
        request.getfixturevalue("pg_url")
    d = Database(url)
    d.run("CREATE TABLE t (id INTEGER PRIMARY KEY, v INTEGER NOT NULL)")
    d.run("INSERT INTO t (id, v) VALUES (1, 0)")
    yield d
    d.close()


def trips(db, fn):
    n0 = db.round_trips
    out = fn()
    return out, db.round_trips - n0


def test_queued_statements_commit_together_in_one_round_trip(db):
    def work():
        with db.transaction(batch=True):
            row = db.queue("SELECT v FROM t WHERE id = ?", (1,))
            added = db.queue("INSERT INTO t (id, v) VALUES (?, ?)", (2, 5))
            bumped = db.queue("UPDATE t SET v = v + 1 WHERE id >= ?", (1,))
        return row, added, bumped
    (row, added, bumped), n = trips(db, work)
    assert row.row == {"v": 0} and row.rows == [{"v": 0}]
    assert (added.rowcount, bumped.rowcount) == (1, 2)
    assert added.rows == [] and added.row is None   # no rows: an INSERT
    assert db.all("SELECT id, v FROM t ORDER BY id") == [{"id": 1, "v": 1}, {"id": 2, "v": 6}]
    # PostgreSQL: BEGIN, the three and COMMIT, one round trip (SQLite has none)
    assert n == (1 if db.dialect.name == "postgresql" else 0)


def test_inside_a_batch_reads_and_counts_wait_and_see_what_was_queued(db):
    def work():
        with db.transaction(batch=True):
            db.queue("UPDATE t SET v = 7 WHERE id = ?", (1,))
            seen = db.one("SELECT v FROM t WHERE id = ?", (1,))     # waits: 1
            changed = db.run("UPDATE t SET v = v + 1 WHERE id = ?", (1,))   # waits: 2
            missing = db.queue("UPDATE t SET v = 0 WHERE id = ?", (99,))
            n = missing.rowcount   # waits: 3
            with db.transaction():   # nested: joins the batch
                db.queue("INSERT INTO t (id, v) VALUES (?, ?)", (3, 3))
        return seen, changed, n   # COMMIT: 4
    (seen, changed, n), trip_count = trips(db, work)
    assert (seen, changed, n) == ({"v": 7}, 1, 0)
    assert db.all("SELECT id, v FROM t ORDER BY id") == [{"id": 1, "v": 8}, {"id": 3, "v": 3}]
    assert trip_count == (4 if db.dialect.name == "postgresql" else 0)


@pytest.mark.parametrize("how", ["queued statement", "read", "block"])
def test_a_failure_rolls_everything_back_and_the_connection_goes_on(db, how):
    with pytest.raises(Exception) as e:
        with db.transaction(batch=True):
            db.queue("UPDATE t SET v = 100 WHERE id = ?", (1,))
            db.queue("INSERT INTO t (id, v) VALUES (?, ?)", (2, 2))
            if how == "queued statement":   # fails on the server after the UPDATE
                db.queue("INSERT INTO t (id, v) VALUES (?, ?)", (1, 1))
            elif how == "read":
                db.one("SELECT x FROM no_such_table")
            else:
                raise ValueError("the block fails")
    if how == "block":
        assert isinstance(e.value, ValueError)
    elif how == "queued statement":
        assert db.dialect.is_unique_violation(e.value), e.value
    # nothing of it was kept, and the same connection works (in and out of a batch)
    assert db.all("SELECT id, v FROM t ORDER BY id") == [{"id": 1, "v": 0}]
    with db.transaction(batch=True):
        db.queue("UPDATE t SET v = 2 WHERE id = ?", (1,))
    assert db.one("SELECT v FROM t")["v"] == 2


def test_queue_outside_a_batch_runs_at_once(db):
    q = db.queue("UPDATE t SET v = 3 WHERE id = ?", (1,))
    assert q.rowcount == 1 and db.one("SELECT v FROM t")["v"] == 3
    with db.transaction():   # a plain transaction: each statement waits as ever
        q = db.queue("SELECT v FROM t")
        assert q.rows == [{"v": 3}]


def test_a_lost_connection_in_a_batch_is_a_clear_error_then_reconnects(pg_url):  # noqa: F811
    db = Database(pg_url)
    db.run("CREATE TABLE t (id INTEGER PRIMARY KEY, v INTEGER NOT NULL)")
    db.run("INSERT INTO t (id, v) VALUES (1, 0)")
    pid = db.one("SELECT pg_backend_pid() AS p")["p"]
    other = Database(pg_url)
    other.one("SELECT pg_terminate_backend(?) AS ok", (pid,))
    with pytest.raises(HomellmError, match="database postgresql://"):
        with db.transaction(batch=True):
            db.queue("UPDATE t SET v = 1 WHERE id = ?", (1,))
            db.one("SELECT v FROM t")
    assert db.one("SELECT v FROM t") == {"v": 0}   # a new connection; nothing was written
    db.close()
    other.close()


def test_long_statements_and_many_parameters(db):
    """A statement over 4096 characters or 50 parameters (psycopg would parse its text on
    every call; it is numbered once and sent as it is): the same answers, a literal '%'
    kept; `prepare=True` prepares it on its first use (PostgreSQL)."""
    db.run("INSERT INTO t (id, v) VALUES (2, 20)")
    many = "SELECT " + ", ".join(f"? AS c{i}" for i in range(60))
    assert db.one(many, list(range(60))) == {f"c{i}": i for i in range(60)}
    padding = " AND ".join(["v >= 0"] * 700)   # ~5000 characters
    long = (f"SELECT id, '50%' AS pct FROM t WHERE id IN (?, ?) AND {padding} AND "
            "'a%b' LIKE 'a%' ORDER BY id")
    assert len(long) > 4096
    for _ in range(2):
        q = db.queue(long, (1, 2), prepare=True)
        assert q.rows == [{"id": 1, "pct": "50%"}, {"id": 2, "pct": "50%"}]
    if db.dialect.name == "postgresql":
        assert db.one("SELECT COUNT(*) AS n FROM pg_prepared_statements WHERE statement "
                      "LIKE ?", ("SELECT id, '50\\%' AS pct%",))["n"] == 1
