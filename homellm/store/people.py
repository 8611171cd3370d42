"""Users, passwords, sessions and login rate limiting (the Store's people half).

- Passwords: argon2id through argon2-cffi (RFC 9106); hashes upgrade on login when the
  parameters change. A user without a password cannot log in (the local user).
- Sessions: a random 32-byte token for the client; the database keeps only its SHA-256, so
  a leaked database opens no session. Each session has its own CSRF token and an expiry.
- Rate limiting: `login()` counts failures per key (the username, and the client address if
  the caller gives one); after `max_failures` inside `window_s` the key is locked for
  `lockout_s` and login raises LoginLocked (with retry_after_s), right password or not.
"""
from __future__ import annotations

import hashlib
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


@dataclass
class AuthConfig:
    session_ttl_s: int = 30 * 24 * 3600   # a session cookie lives 30 days
    max_failures: int = 5                  # failed logins per key inside window_s ...
    window_s: int = 15 * 60
    lockout_s: int = 15 * 60               # ... lock the key this long
    argon2_time_cost: int = 3              # argon2-cffi's defaults (RFC 9106 second choice)
    argon2_memory_kib: int = 65536
    argon2_parallelism: int = 4


class LoginLocked(HomellmError):
    def __init__(self, key: str, retry_after_s: float):
        self.key, self.retry_after_s = key, retry_after_s
        super().__init__(f"too many failed logins; try again in {int(retry_after_s) + 1} s")


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
            raise HomellmError("accounts need argon2-cffi: pip install 'homellm[auth]'") from None
        a = self.auth
        return PasswordHasher(time_cost=a.argon2_time_cost, memory_cost=a.argon2_memory_kib,
                              parallelism=a.argon2_parallelism)

    # -- users
    def create_user(self, username: str, password: str | None = None, *, is_admin: bool = False,
                    share_feedback: bool = False) -> User:
        """A new user; HomellmError when the name is taken or invalid, or the password is short."""
        if not isinstance(username, str) or not USERNAME.fullmatch(username):
            raise HomellmError(f"invalid username {username!r}: 1-64 letters, digits, '.', '_', "
                               "'@' or '-', starting with a letter or digit")
        if password is not None and len(password) < 8:
            raise HomellmError("the password is too short: at least 8 characters")
        pw_hash = self._hasher().hash(password) if password is not None else None
        uid = uuid.uuid4().hex
        try:
            self.db.run("INSERT INTO users (id, username, password_hash, is_admin, share_feedback,"
                        " created_at) VALUES (?, ?, ?, ?, ?, ?)",
                        (uid, username, pw_hash, bool(is_admin), bool(share_feedback), now()))
        except Exception as e:
            if self.db.dialect.is_unique_violation(e):
                raise HomellmError(f"the username {username!r} is taken") from None
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
        if len(password) < 8:
            raise HomellmError("the password is too short: at least 8 characters")
        self.db.run("UPDATE users SET password_hash = ? WHERE id = ?",
                    (self._hasher().hash(password), _uid(user)))

    def set_share_feedback(self, user: User | str, share: bool) -> None:
        self.db.run("UPDATE users SET share_feedback = ? WHERE id = ?", (bool(share), _uid(user)))

    def set_admin(self, user: User | str, is_admin: bool) -> None:
        self.db.run("UPDATE users SET is_admin = ? WHERE id = ?", (bool(is_admin), _uid(user)))

    def delete_user(self, user: User | str) -> bool:
        """Remove a user with their sessions, conversations and ratings."""
        return self.db.run("DELETE FROM users WHERE id = ?", (_uid(user),)) > 0

    # -- login and sessions
    def login(self, username: str, password: str, *, client: str | None = None) -> Session | None:
        """A new session for the right password, None for a wrong one; LoginLocked when limited."""
        keys = [f"user:{username}"] + ([f"ip:{client}"] if client else [])
        for key in keys:
            self._check_not_locked(key)
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
            for key in keys:
                self._record_failure(key)
            return None
        for key in keys:
            self.db.run("DELETE FROM login_attempts WHERE key = ?", (key,))
        return self.create_session(r["id"])

    def _check_not_locked(self, key: str):
        r = self.db.one("SELECT locked_until FROM login_attempts WHERE key = ?", (key,))
        if r and r["locked_until"]:
            wait = _seconds_until(r["locked_until"])
            if wait > 0:
                raise LoginLocked(key, wait)

    def _record_failure(self, key: str):
        with self.db.transaction():
            r = self.db.one("SELECT * FROM login_attempts WHERE key = ?", (key,))
            if r is None or _seconds_until(r["window_start"]) < -self.auth.window_s:
                self.db.run("DELETE FROM login_attempts WHERE key = ?", (key,))
                self.db.run("INSERT INTO login_attempts (key, failures, window_start) "
                            "VALUES (?, 1, ?)", (key, now()))
                failures = 1
            else:
                failures = r["failures"] + 1
                self.db.run("UPDATE login_attempts SET failures = ? WHERE key = ?",
                            (failures, key))
            if failures >= self.auth.max_failures:
                self.db.run("UPDATE login_attempts SET locked_until = ?, failures = 0, "
                            "window_start = ? WHERE key = ?",
                            (_later(self.auth.lockout_s), now(), key))

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
        r = self.db.one("SELECT * FROM sessions WHERE token_hash = ?", (_token_hash(token),))
        if r is None or _seconds_until(r["expires_at"]) <= 0:
            return None
        return Session(token=token, user=self.get_user(r["user_id"]), csrf_token=r["csrf_token"],
                       expires_at=r["expires_at"])

    def logout(self, token: str) -> bool:
        return self.db.run("DELETE FROM sessions WHERE token_hash = ?", (_token_hash(token),)) > 0

    def purge_expired_sessions(self) -> int:
        return self.db.run("DELETE FROM sessions WHERE expires_at <= ?", (now(),))


def _uid(user: User | str) -> str:
    return user.id if isinstance(user, User) else user
