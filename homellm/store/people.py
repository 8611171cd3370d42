"""Users, passwords, sessions and login rate limiting (the Store's people half).

- Passwords: argon2id through argon2-cffi (RFC 9106); hashes upgrade on login when the
  parameters change. A user without a password cannot log in (the local user).
- Sessions: a random 32-byte token for the client; the database keeps only its SHA-256, so
  a leaked database opens no session. Each session has its own CSRF token and an expiry.
- First-run setup: `create_first_admin` makes the first account with a password, an admin,
  exactly once: the check and the insert share one transaction, and the `first_admin` table
  holds one row at most, so of concurrent setups (threads, processes, PostgreSQL clients)
  one wins and the others get SetupDone.
- Rate limiting: `login()` counts each attempt before it checks the password, per
  (username, client address): after `max_failures` inside `window_s` that pair is locked for
  `lockout_s`, doubling with each lockout up to `max_lockout_s` (LoginLocked, with
  retry_after_s). Failures at one address never lock the same user at another, so nobody can
  lock the admin out by name; one address is also limited over all usernames
  (`max_address_failures`). A success clears its pair; `unlock_logins(username)` clears a
  user's locks (the admin's "unlock").
"""
from __future__ import annotations

import hashlib
import math
import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from homellm.errors import HomellmError
from homellm.store.db import now
from homellm.store.records import Session, User

LOCAL_USERNAME = "local"
USERNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
MIN_PASSWORD = 8                           # characters (the page shows the rule up front)


@dataclass
class AuthConfig:
    session_ttl_s: int = 30 * 24 * 3600   # a session cookie lives 30 days
    max_failures: int = 5                  # failed logins per (user, address) inside window_s
    window_s: int = 15 * 60
    lockout_s: int = 60                    # ... lock that pair this long, doubled per lockout
    max_lockout_s: int = 3600              # ... up to this
    max_address_failures: int = 50         # failed logins from one address, any usernames
    argon2_time_cost: int = 3              # argon2-cffi's defaults (RFC 9106 second choice)
    argon2_memory_kib: int = 65536
    argon2_parallelism: int = 4


class LoginLocked(HomellmError):
    def __init__(self, key: str, retry_after_s: float):
        self.key, self.retry_after_s = key, retry_after_s
        super().__init__(f"too many failed logins; try again in {math.ceil(retry_after_s)} s")


class SetupDone(HomellmError):
    """The first-run setup has happened (an account with a password exists)."""


def _later(seconds: float) -> str:
    return (datetime.now(timezone.utc) + timedelta(seconds=seconds)).isoformat(
        timespec="microseconds")


def _seconds_until(stamp: str) -> float:
    return (datetime.fromisoformat(stamp) - datetime.now(timezone.utc)).total_seconds()


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class People:
    """Mixin of Store: needs `self.db` and `self.auth` (AuthConfig)."""

    # -- passwords
    def _hasher(self):
        try:
            from argon2 import PasswordHasher
        except ImportError:
            raise HomellmError("accounts need argon2-cffi: pip install argon2-cffi") from None
        a = self.auth
        return PasswordHasher(time_cost=a.argon2_time_cost, memory_cost=a.argon2_memory_kib,
                              parallelism=a.argon2_parallelism)

    # -- users
    def _check_new(self, username: str, password: str | None):
        if not isinstance(username, str) or not USERNAME.fullmatch(username):
            raise HomellmError(f"invalid username {username!r}: 1-64 letters, digits, '.', '_', "
                               "'@' or '-', starting with a letter or digit")
        if password is not None and len(password) < MIN_PASSWORD:
            raise HomellmError(f"the password is too short: at least {MIN_PASSWORD} characters")

    def create_user(self, username: str, password: str | None = None, *, is_admin: bool = False,
                    share_feedback: bool = False) -> User:
        """A new user; HomellmError when the name is taken or invalid, or the password is short."""
        self._check_new(username, password)
        pw_hash = self._hasher().hash(password) if password is not None else None
        uid = uuid.uuid4().hex
        try:
            self._insert_user(uid, username, pw_hash, is_admin, share_feedback)
        except Exception as e:
            if self.db.dialect.is_unique_violation(e):
                raise HomellmError(f"the username {username!r} is taken") from None
            raise
        return self.get_user(uid)

    def _insert_user(self, uid: str, username: str, pw_hash: str | None, is_admin: bool,
                     share_feedback: bool = False):
        self.db.run("INSERT INTO users (id, username, password_hash, is_admin, share_feedback,"
                    " created_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (uid, username, pw_hash, bool(is_admin), bool(share_feedback), now()))

    def needs_setup(self) -> bool:
        """True while no account has a password (the first-run setup is still open)."""
        return self.db.one("SELECT 1 AS one FROM users WHERE password_hash IS NOT NULL "
                           "LIMIT 1") is None

    def create_first_admin(self, username: str, password: str) -> User:
        """The first account with a password, an admin; SetupDone if there is one already
        (also for all but one of concurrent callers). HomellmError for a bad name or password."""
        self._check_new(username, password)
        pw_hash = self._hasher().hash(password)  # slow: before the transaction
        uid = uuid.uuid4().hex
        done = SetupDone("setup is done: an account already exists; log in")
        try:
            with self.db.transaction():  # SQLite: BEGIN IMMEDIATE, one writer at a time
                if not self.needs_setup():
                    raise done
                self._insert_user(uid, username, pw_hash, True)
                # PostgreSQL: a concurrent setup that also saw no account waits here for the
                # first one's commit, then fails on the primary key (and rolls back its user)
                self.db.run("INSERT INTO first_admin (one, user_id, created_at) VALUES (1, ?, ?)",
                            (uid, now()))
        except SetupDone:
            raise
        except Exception as e:
            if self.db.dialect.is_unique_violation(e):
                raise done from None
            raise
        return self.get_user(uid)

    def get_user(self, user_id: str) -> User | None:
        r = self.db.one("SELECT * FROM users WHERE id = ?", (user_id,))
        return User.from_row(r) if r else None

    def user_by_name(self, username: str) -> User | None:
        r = self.db.one("SELECT * FROM users WHERE username = ?", (username,))
        return User.from_row(r) if r else None

    def list_users(self) -> list[User]:
        return [User.from_row(r) for r in self.db.all("SELECT * FROM users ORDER BY n")]

    def local_user(self) -> User:
        """The single user of a server without --auth (created on first use; an admin)."""
        u = self.user_by_name(LOCAL_USERNAME)
        if u is None:
            try:
                u = self.create_user(LOCAL_USERNAME, None, is_admin=True)
            except HomellmError:  # another process created it first
                u = self.user_by_name(LOCAL_USERNAME)
        return u

    def set_password(self, user: User | str, password: str) -> None:
        if len(password) < MIN_PASSWORD:
            raise HomellmError(f"the password is too short: at least {MIN_PASSWORD} characters")
        self.db.run("UPDATE users SET password_hash = ? WHERE id = ?",
                    (self._hasher().hash(password), _uid(user)))

    def check_password(self, user: User | str, password: str) -> bool:
        """Is this the user's password? (No rate limit here: for a user already logged in.)"""
        r = self.db.one("SELECT password_hash FROM users WHERE id = ?", (_uid(user),))
        if r is None or not r["password_hash"]:
            return False
        from argon2.exceptions import InvalidHashError, VerificationError
        try:
            return self._hasher().verify(r["password_hash"], password)
        except (VerificationError, InvalidHashError):
            return False

    def end_sessions(self, user: User | str, keep_token: str | None = None) -> int:
        """Log the user out everywhere (but the session of `keep_token`); how many ended."""
        if keep_token:
            return self.db.run("DELETE FROM sessions WHERE user_id = ? AND token_hash <> ?",
                               (_uid(user), _token_hash(keep_token)))
        return self.db.run("DELETE FROM sessions WHERE user_id = ?", (_uid(user),))

    def set_share_feedback(self, user: User | str, share: bool) -> None:
        self.db.run("UPDATE users SET share_feedback = ? WHERE id = ?", (bool(share), _uid(user)))

    def set_admin(self, user: User | str, is_admin: bool) -> None:
        self.db.run("UPDATE users SET is_admin = ? WHERE id = ?", (bool(is_admin), _uid(user)))

    def delete_user(self, user: User | str) -> bool:
        """Remove a user with their sessions, conversations and ratings (and login limits)."""
        r = self.db.one("SELECT username FROM users WHERE id = ?", (_uid(user),))
        if r is None:
            return False
        with self.db.transaction():
            self.db.run("DELETE FROM login_attempts WHERE username = ?", (r["username"],))
            return self.db.run("DELETE FROM users WHERE id = ?", (_uid(user),)) > 0

    # -- login and sessions
    def login(self, username: str, password: str, *, client: str | None = None) -> Session | None:
        """A new session for the right password, None for a wrong one; LoginLocked when the
        (username, client) pair or the client's address is limited. The attempt is counted
        before the password is checked, so concurrent attempts cannot exceed the limit."""
        self._count_attempt(username, client)
        r = self.db.one("SELECT * FROM users WHERE username = ?", (username,))
        ok = False
        if r is not None and r["password_hash"]:
            from argon2.exceptions import InvalidHashError, VerificationError
            hasher = self._hasher()
            try:
                ok = hasher.verify(r["password_hash"], password)
            except (VerificationError, InvalidHashError):
                ok = False
            if ok and hasher.check_needs_rehash(r["password_hash"]):
                self.db.run("UPDATE users SET password_hash = ? WHERE id = ?",
                            (hasher.hash(password), r["id"]))
        else:
            self._hasher().hash(password)  # same work for unknown users: no timing oracle
        if not ok:
            return None
        self.db.run("DELETE FROM login_attempts WHERE key = ?", (_pair_key(username, client),))
        if client:  # a success gives its address back the attempt counted for it: only
            # failures add up there, so a class behind one address never locks itself out
            self.db.run("UPDATE login_attempts SET failures = failures - 1 WHERE key = ? "
                        "AND failures > 0", (f"addr:{client}",))
        return self.create_session(r["id"])

    def _count_attempt(self, username: str, client: str | None):
        """Count one login attempt for the pair and the address (one transaction); raise
        LoginLocked instead if either is locked or this attempt goes over its limit."""
        a = self.auth
        keys = [(_pair_key(username, client), username, client, a.max_failures)]
        if client:
            keys.append((f"addr:{client}", None, client, a.max_address_failures))
        locked = None
        lock_rows = " FOR UPDATE" if self.db.dialect.name == "postgresql" else ""
        with self.db.transaction():
            rows = []
            for key, user, address, limit in keys:
                self.db.run("INSERT INTO login_attempts (key, failures, window_start, username, "
                            "address, lockouts) VALUES (?, 0, ?, ?, ?, 0) ON CONFLICT (key) "
                            "DO NOTHING", (key, now(), user, address))
                r = self.db.one(f"SELECT * FROM login_attempts WHERE key = ?{lock_rows}", (key,))
                wait = _seconds_until(r["locked_until"]) if r["locked_until"] else None
                if wait is not None and wait > 0:
                    raise LoginLocked(key, wait)  # nothing counted: the transaction rolls back
                rows.append((r, limit, wait))
            for r, limit, wait in rows:
                lockouts = r["lockouts"]
                if wait is not None and -wait > a.max_lockout_s:  # the last lock is long over
                    lockouts = 0
                failures, start = r["failures"] + 1, r["window_start"]
                if _seconds_until(start) < -a.window_s:
                    failures, start = 1, now()
                if failures > limit:
                    hold = min(a.lockout_s * 2 ** min(lockouts, 30), a.max_lockout_s)
                    self.db.run("UPDATE login_attempts SET failures = 0, window_start = ?, "
                                "locked_until = ?, lockouts = ? WHERE key = ?",
                                (now(), _later(hold), lockouts + 1, r["key"]))
                    locked = locked or LoginLocked(r["key"], hold)
                else:
                    self.db.run("UPDATE login_attempts SET failures = ?, window_start = ?, "
                                "lockouts = ? WHERE key = ?", (failures, start, lockouts, r["key"]))
        if locked is not None:
            raise locked

    def login_locks(self) -> dict[str, float]:
        """username -> seconds until its longest lock ends, for the users locked now."""
        out: dict[str, float] = {}
        for r in self.db.all("SELECT username, locked_until FROM login_attempts "
                             "WHERE username IS NOT NULL AND locked_until IS NOT NULL"):
            wait = _seconds_until(r["locked_until"])
            if wait > 0:
                out[r["username"]] = max(wait, out.get(r["username"], 0.0))
        return out

    def unlock_logins(self, username: str) -> int:
        """Clear the login limits of `username` at every address; how many were cleared."""
        return self.db.run("DELETE FROM login_attempts WHERE username = ?", (username,))

    def create_session(self, user: User | str, ttl_s: int | None = None) -> Session:
        token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        expires = _later(ttl_s if ttl_s is not None else self.auth.session_ttl_s)
        uid = _uid(user)
        self.db.run("INSERT INTO sessions (token_hash, user_id, csrf_token, created_at, "
                    "expires_at) VALUES (?, ?, ?, ?, ?)", (_token_hash(token), uid, csrf, now(),
                                                           expires))
        return Session(token=token, user=self.get_user(uid), csrf_token=csrf, expires_at=expires)

    def session(self, token: str | None) -> Session | None:
        """The live session for a client's token (None if unknown or expired)."""
        if not token:
            return None
        # one statement with its user (every request of a logged-in page asks this)
        r = self.db.one("SELECT u.*, s.csrf_token AS session_csrf, s.expires_at AS "
                        "session_expires FROM sessions s JOIN users u ON u.id = s.user_id "
                        "WHERE s.token_hash = ?", (_token_hash(token),))
        if r is None or _seconds_until(r["session_expires"]) <= 0:
            return None
        return Session(token=token, user=User.from_row(r), csrf_token=r["session_csrf"],
                       expires_at=r["session_expires"])

    def logout(self, token: str) -> bool:
        return self.db.run("DELETE FROM sessions WHERE token_hash = ?", (_token_hash(token),)) > 0

    def purge_expired_sessions(self) -> int:
        return self.db.run("DELETE FROM sessions WHERE expires_at <= ?", (now(),))


def _pair_key(username: str, client: str | None) -> str:
    return f"login:{client or '-'}:{username}"


def _uid(user: User | str) -> str:
    return user.id if isinstance(user, User) else user
