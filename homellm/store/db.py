"""A database by URL: one connection per thread, transactions, and the migrations runner.

    db = Database("sqlite:///homellm.db")      # or a path, or postgresql://user@host/db
    with db.transaction():                     # BEGIN IMMEDIATE on SQLite; nested: one
        db.run("INSERT ...", (a, b))
    rows = db.all("SELECT ... WHERE id = ?", (x,))   # -> list[dict]

Statements outside `transaction()` commit on their own (autocommit). Connections are per
thread, so a web server's worker threads and a streaming writer never share one.
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
    def _execute(self, sql: str, params=()):
        con = self.connection()
        sql = self.dialect.sql(sql)
        try:
            if self.dialect is POSTGRESQL:
                cur = con.cursor()
                cur.execute(sql, params)
                return cur
            return con.execute(sql, params)
        except Exception as e:
            if type(e).__name__ in ("OperationalError", "InterfaceError") and \
                    "locked" not in str(e):
                raise HomellmError(f"database {redact(self.url)}: {str(e).strip()}") from None
            raise

    def all(self, sql: str, params=()) -> list[dict]:
        cur = self._execute(sql, params)
        return [dict(r) for r in cur.fetchall()]

    def one(self, sql: str, params=()) -> dict | None:
        rows = self.all(sql, params)
        return rows[0] if rows else None

    def run(self, sql: str, params=()) -> int:
        """Execute one statement; the number of rows it changed."""
        return self._execute(sql, params).rowcount

    @contextmanager
    def transaction(self):
        """All statements inside commit together or not at all. Nested uses join the outer one."""
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
            if self.dialect is POSTGRESQL:
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
