"""Everything that differs between SQLite and PostgreSQL, in one place.

The rest of the store writes SQL once, with `?` placeholders and the type names below in
`{braces}` (migrations only); a Dialect turns that into what its database speaks and opens
connections. Text search: SQLite FTS5 (`unicode61`, diacritics kept) and PostgreSQL
`to_tsvector('simple', ...)` both split on non-word characters, fold case and do not stem;
each query word matches as a prefix and all words must match, so simple queries give the
same results on both.
"""
from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from homellm.errors import HomellmError

WORD = re.compile(r"[^\W_]+")  # letters and digits: both engines split at "_" too


def query_words(query: str) -> list[str]:
    """The words of a search query, lower case, in order (punctuation is ignored)."""
    return [w.lower() for w in WORD.findall(query or "")]


@dataclass(frozen=True)
class Dialect:
    name: str                      # "sqlite" | "postgresql"
    types: dict                    # {pk}, {bool}, {bigint}, {true}, {false} in migration SQL

    def sql(self, text: str) -> str:
        """Query text with `?` placeholders in this dialect (no '?' or '%' inside literals)."""
        return text if self.name == "sqlite" else text.replace("%", "%%").replace("?", "%s")

    def ddl(self, text: str) -> str:
        return text.format(**self.types)

    def match_sql(self, target: str) -> str:
        """A WHERE fragment, with one `?`, true when `target` ("message" or "title") matches."""
        if self.name == "sqlite":
            if target == "message":
                return "m.n IN (SELECT rowid FROM message_fts WHERE message_fts MATCH ?)"
            return "c.n IN (SELECT rowid FROM conversation_fts WHERE conversation_fts MATCH ?)"
        column = "m.content" if target == "message" else "c.title"
        return f"to_tsvector('simple', {column}) @@ to_tsquery('simple', ?)"

    def match_param(self, words: list[str]) -> str:
        """The `?` of match_sql for these words: every word, as a prefix."""
        if self.name == "sqlite":
            return " AND ".join(f'"{w}"*' for w in words)
        return " & ".join(f"{w}:*" for w in words)

    def is_unique_violation(self, exc: Exception) -> bool:
        if self.name == "sqlite":
            return isinstance(exc, sqlite3.IntegrityError) and "UNIQUE" in str(exc)
        return type(exc).__name__ == "UniqueViolation"


SQLITE = Dialect("sqlite", {"pk": "INTEGER PRIMARY KEY", "bool": "INTEGER", "bigint": "INTEGER",
                            "true": "1", "false": "0"})
POSTGRESQL = Dialect("postgresql", {"pk": "BIGSERIAL PRIMARY KEY", "bool": "BOOLEAN",
                                    "bigint": "BIGINT", "true": "TRUE", "false": "FALSE"})


def parse_url(url: str | Path) -> tuple[Dialect, str]:
    """(dialect, target) for `sqlite:///path`, a plain path, or `postgresql://...`.

    The SQLite target is a file path (`:memory:` is refused: each thread would see its own
    empty database); the PostgreSQL target is the URL as libpq takes it.
    """
    text = str(url)
    if text.startswith(("postgresql://", "postgres://")):  # libpq's two spellings
        return POSTGRESQL, text
    if text.startswith("sqlite:"):
        if not text.startswith("sqlite:///"):
            raise HomellmError(f"database URL {text!r}: expected sqlite:///relative/path.db or "
                               "sqlite:////absolute/path.db (as SQLAlchemy writes them)")
        text = text[len("sqlite:///"):]
    elif "://" in text:
        scheme = text.split("://", 1)[0]
        raise HomellmError(f"database URL {text!r}: unknown scheme {scheme!r} (use sqlite:///FILE, "
                           "a file path, or postgresql://USER@HOST/DB)")
    if text in ("", ":memory:"):
        raise HomellmError("database: give a file path (an in-memory database is not shared "
                           "between threads)")
    return SQLITE, text


def connect_sqlite(path: str) -> sqlite3.Connection:
    """A connection in autocommit mode (the store opens its own transactions), WAL, foreign keys."""
    p = Path(path).expanduser()
    if not p.parent.is_dir():
        raise HomellmError(f"database {p}: the folder {p.parent} does not exist")
    try:
        con = sqlite3.connect(str(p), isolation_level=None, check_same_thread=False, timeout=30)
        con.row_factory = sqlite3.Row
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA foreign_keys=ON")
        con.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at checkpoints, never corrupt
    except sqlite3.DatabaseError as e:
        raise HomellmError(f"database {p}: cannot open as SQLite: {e}") from None
    return con


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", url)


def connect_postgresql(url: str):
    try:
        import psycopg
        from psycopg.rows import dict_row
    except ImportError:
        raise HomellmError("PostgreSQL needs psycopg: pip install 'homellm[postgres]'") from None
    try:
        return psycopg.connect(url, autocommit=True, row_factory=dict_row, connect_timeout=10)
    except psycopg.Error as e:
        raise HomellmError(f"database {redact(url)}: cannot connect: {str(e).strip()}") from None
