"""What the collect layer refuses, and why: a message for the volunteer, an HTTP-like status,
a code and the field at fault (the web layer turns it into an OpenAI-shaped error body)."""
from __future__ import annotations

from homellm.errors import HomellmError


class CollectError(HomellmError):
    def __init__(self, message: str, *, status: int = 400, code: str = "invalid_value",
                 param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


def not_found(what: str) -> CollectError:
    return CollectError(f"{what} not found", status=404, code="not_found")


def user_id(user) -> str:
    """The id of a store User, or the id itself."""
    return user if isinstance(user, str) else user.id
