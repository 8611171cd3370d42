"""A database by URL: one connection per thread, transactions, and the migrations runner.

    db = Database("sqlite:///homellm.db")      # or a path, or postgresql://user@host/db
    with db.transaction():                     # BEGIN IMMEDIATE on SQLite; nested: one
        db.run("INSERT ...", (a, b))
    rows = db.all("SELECT ... WHERE id = ?", (x,))   # -> list[dict]

Statements outside `transaction()` commit on their own (autocommit). Connections are per
thread, so a web server's worker threads and a streaming writer never share one.

Round trips are what a statement costs on PostgreSQL, so a transaction can be batched:

    with db.transaction(batch=True):           # PostgreSQL: psycopg's pipeline mode
        lock = db.queue("SELECT ... FOR UPDATE", (x,))   # sent, its answer not awaited
        added = db.queue("INSERT ... SELECT ... WHERE ...", (...))
    added.rowcount                             # BEGIN, both, COMMIT: one round trip

Inside it `all`, `one` and `run` wait for their answer as ever (taking what was queued
before along in the same round trip); on SQLite `queue` runs the statement at once.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from homellm.errors import HomellmError
from homellm.store.dialect import (POSTGRESQL, connect_postgresql, connect_sqlite, parse_url,
                                   redact)
from homellm.store.migrations import MIGRATIONS

# psycopg parses (and does not keep) the text of a statement longer than this, or with
# more parameters (its MAX_CACHED_STATEMENT_LENGTH / _PARAMS): such statements are numbered
# here once and sent with a RawCursor
LONG_SQL, LONG_PARAMS = 4096, 50


def now() -> str:
    """The time as stored: ISO 8601 UTC with microseconds, sortable as text."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def default_url() -> str:
    """`$HOMELLM_HOME/homellm.db` (the folder is created)."""
    from homellm.catalog.library import home
    h = home()
    h.mkdir(parents=True, exist_ok=True)
    return str(h / "homellm.db")


class Database:
    def __init__(self, url: str | Path | None = None):
        self.url = str(url) if url is not None else default_url()
        self.dialect, self.target = parse_url(self.url)
        self._local = threading.local()
        self._all: list = []  # every connection opened, to close them all
        self._lock = threading.Lock()
        # PostgreSQL: how many times a statement's answer was waited for (BEGIN and COMMIT
        # included), all threads together; a diagnostic for tests and benchmarks
        self.round_trips = 0
        self._numbered_cache: dict[str, str] = {}
        self.connection()  # fail now, with a clear message, if it cannot be opened

    def __repr__(self):
        return f"Database({redact(self.url)!r})"

    # -- connections
    def connection(self):
        con = getattr(self._local, "con", None)
        if con is not None and getattr(con, "broken", False) and not self._local.depth:
            # PostgreSQL went away under it (a restart): the statement that found out failed,
            # this thread's next one gets a new connection (threads live long: db_threads.py)
            with self._lock:
                if con in self._all:
                    self._all.remove(con)
            con = None
        if con is None:
            if self.dialect is POSTGRESQL:
                con = connect_postgresql(self.target)
            else:
                con = connect_sqlite(self.target)
            self._local.con, self._local.depth = con, 0
            with self._lock:
                self._all.append(con)
        return con

    def close(self):
        with self._lock:
            for con in self._all:
                try:
                    con.close()
                except Exception:  # closing a connection of a finished thread: nothing to do
                    pass
            self._all.clear()
        self._local = threading.local()

    # -- statements
    def _error(self, e: Exception) -> Exception:
        """A lost or refused connection (an OperationalError or InterfaceError, psycopg's
        subclasses such as AdminShutdown too) as a HomellmError that names the database;
        other errors as they are."""
        if any(c.__name__ in ("OperationalError", "InterfaceError") for c in type(e).__mro__) \
                and "locked" not in str(e):
            return HomellmError(f"database {redact(self.url)}: {str(e).strip()}")
        return e

    def _execute(self, sql: str, params=(), prepare: bool | None = None):
        con = self.connection()
        try:
            if self.dialect is POSTGRESQL:
                if len(sql) > LONG_SQL or len(params) > LONG_PARAMS:
                    cur = _raw_cursor(con)
                    cur.execute(self._numbered(sql), params, prepare=prepare)
                else:
                    cur = con.cursor()
                    cur.execute(self.dialect.sql(sql), params, prepare=prepare)
                if getattr(self._local, "pipeline", None) is None:
                    self.round_trips += 1
                return cur
            return con.execute(sql, params)
        except Exception as e:
            err = self._error(e)
            if err is e:
                raise
            raise err from None

    def _numbered(self, sql: str) -> str:
        """`?` placeholders as PostgreSQL's $1, $2, ... (a long statement: psycopg parses the
        text of one over 4096 characters or 50 parameters on every call, ~0.25 ms for
        collect's next-task; this once)."""
        out = self._numbered_cache.get(sql)
        if out is None:
            parts = sql.split("?")   # (no '?' inside literals: Dialect.sql)
            out = parts[0] + "".join(f"${i}{p}" for i, p in enumerate(parts[1:], 1))
            if len(self._numbered_cache) >= 256:
                self._numbered_cache.clear()
            self._numbered_cache[sql] = out
        return out

    def _wait(self, fn, cur=None):
        """fn() (reading an answer: inside a batch it waits for what was queued before it
        too, unless `cur`'s answer is here already), with _execute's errors."""
        if getattr(self._local, "pipeline", None) is not None and (
                cur is None or cur.pgresult is None):
            self.round_trips += 1
        try:
            return fn()
        except Exception as e:
            err = self._error(e)
            if err is e:
                raise
            raise err from None

    def all(self, sql: str, params=()) -> list[dict]:
        cur = self._execute(sql, params)
        return [dict(r) for r in self._wait(cur.fetchall, cur)]

    def one(self, sql: str, params=()) -> dict | None:
        rows = self.all(sql, params)
        return rows[0] if rows else None

    def run(self, sql: str, params=()) -> int:
        """Execute one statement; the number of rows it changed."""
        cur = self._execute(sql, params)
        pipeline = getattr(self._local, "pipeline", None)
        if pipeline is not None:   # a batch: the count comes with the answer
            self._wait(pipeline.sync)
        return cur.rowcount

    def queue(self, sql: str, params=(), prepare: bool | None = None) -> Queued:
        """Send a statement without waiting for its answer (inside `transaction(batch=True)`
        on PostgreSQL; elsewhere it runs at once): its rows or row count are read from the
        Queued, which waits then if it must. An error in it is raised where an answer is
        next waited for, at the latest when the transaction ends (it then rolls back).
        `prepare`: PostgreSQL: True prepares it on its first use on a connection (psycopg
        prepares a statement once it has run it 5 times; a long one is planned each time
        until then)."""
        cur = self._execute(sql, params, prepare)
        pipeline = getattr(self._local, "pipeline", None)
        if pipeline is None:
            return Queued(self, None, [dict(r) for r in cur.fetchall()] if cur.description
                          else None, cur.rowcount)
        return Queued(self, cur, None, None, pipeline)

    @contextmanager
    def transaction(self, batch: bool = False):
        """All statements inside commit together or not at all. Nested uses join the outer one.

        `batch`: on PostgreSQL the transaction runs in psycopg's pipeline mode: its BEGIN goes
        out with the first statement that waits for an answer, statements sent with `queue`
        go out without waiting, and COMMIT after the last one; a transaction of queued
        statements is one round trip instead of one each, BEGIN and COMMIT included."""
        con = self.connection()
        if self._local.depth:
            self._local.depth += 1
            try:
                yield self
            finally:
                self._local.depth -= 1
            return
        self._local.depth = 1
        try:
            if self.dialect is POSTGRESQL and batch:
                with self._batch(con):
                    yield self
            elif self.dialect is POSTGRESQL:
                self.round_trips += 2   # BEGIN, COMMIT
                with con.transaction():
                    yield self
            else:
                con.execute("BEGIN IMMEDIATE")  # take the write lock now: no upgrade deadlock
                try:
                    yield self
                except BaseException:
                    con.execute("ROLLBACK")
                    raise
                con.execute("COMMIT")
        finally:
            self._local.depth = 0

    @contextmanager
    def _batch(self, con):
        """BEGIN ... COMMIT in pipeline mode, written by hand: psycopg's own transaction()
        waits for its BEGIN and its COMMIT (a round trip each) even in a pipeline."""
        committed = False
        try:
            with con.pipeline() as pipeline:
                self._local.pipeline = pipeline
                con.cursor().execute("BEGIN")
                yield
                con.cursor().execute("COMMIT")
                self.round_trips += 1   # the pipeline's end: what is left, answers read
            committed = True   # (the pipeline's end sent it all and read every answer)
        except Exception as e:
            err = self._error(e)
            if err is e:
                raise
            raise err from None
        finally:
            self._local.pipeline = None
            if not committed and not con.broken:
                try:   # the block raised, or a statement failed (the COMMIT was not run)
                    con.execute("ROLLBACK")
                except Exception:   # the connection is gone: the server rolled back
                    pass

    # -- migrations
    def applied(self) -> list[str]:
        """Names of the applied migrations, in order ([] for an empty database)."""
        self.run("CREATE TABLE IF NOT EXISTS migrations "
                 "(name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
        rows = self.all("SELECT name FROM migrations ORDER BY name")  # names are numbered
        return [r["name"] for r in rows]

    def migrate(self, upto: int | None = None) -> list[str]:
        """Apply the migrations not yet applied (the first `upto` only, for tests); their names."""
        known = [m.name for m in MIGRATIONS]
        applied = self.applied()
        if applied != known[:len(applied)]:
            unknown = [a for a in applied if a not in known]
            raise HomellmError(
                f"database {redact(self.url)}: its migrations {unknown or applied} do not match "
                f"this homellm's ({', '.join(known)}); is it from a newer homellm?")
        done = []
        for m in MIGRATIONS[len(applied):upto]:
            with self.transaction():
                if self.dialect is POSTGRESQL:  # one migrator at a time across processes
                    self.run("SELECT pg_advisory_xact_lock(4242)")
                    if self.one("SELECT name FROM migrations WHERE name = ?", (m.name,)):
                        continue
                for statement in m.statements(self.dialect.name):
                    self.run(self.dialect.ddl(statement))
                self.run("INSERT INTO migrations (name, applied_at) VALUES (?, ?)",
                         (m.name, now()))
            done.append(m.name)
        return done


class Queued:
    """A statement sent with Database.queue: its answer, waited for when first read."""

    def __init__(self, db: Database, cur, rows: list[dict] | None, rowcount: int | None,
                 pipeline=None):
        self._db, self._cur, self._rows, self._rowcount = db, cur, rows, rowcount
        self._pipeline = pipeline

    def _fetch(self) -> None:
        if self._cur is None:
            return
        cur, self._cur = self._cur, None
        if cur.pgresult is None:   # not answered yet: wait for it (and what came before)
            self._db._wait(self._pipeline.sync, cur)
        self._rows = [dict(r) for r in cur.fetchall()] if cur.description else None
        self._rowcount = cur.rowcount

    @property
    def rows(self) -> list[dict]:
        self._fetch()
        return self._rows or []

    @property
    def row(self) -> dict | None:
        rows = self.rows
        return rows[0] if rows else None

    @property
    def rowcount(self) -> int:
        self._fetch()
        return self._rowcount


def _raw_cursor(con):
    from psycopg import RawCursor   # ($1 placeholders as they are)
    return RawCursor(con)
