"""OpenAI-style errors: every failure is `{"error": {"message", "type", "param", "code"}}`.

APIError is what the serve layer raises (its Python API too: the web app catches it without
HTTP); `install_error_handlers` turns it, FastAPI's own validation errors (400 naming the
parameter instead of 422), unknown routes and unexpected exceptions into such bodies.
Nothing internal (tracebacks, other requests' text) ever reaches the client.
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("homellm.serve")


class APIError(Exception):
    """An error for the client: HTTP status, message, OpenAI `type`, `param` and `code`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message = status, message
        self.type, self.param, self.code = type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def invalid(param: str | None, message: str, code: str | None = None) -> APIError:
    """400 for a bad request parameter; the message starts with the parameter's name."""
    text = f"{param}: {message}" if param and not message.startswith(param) else message
    return APIError(400, text, param=param, code=code or "invalid_value")


def model_not_found(name: str, available: list[str]) -> APIError:
    have = ", ".join(available) or "none"
    return APIError(404, f"The model {name!r} does not exist (this server has: {have})",
                    param="model", code="model_not_found")


def _param_of(loc: tuple) -> str | None:
    """FastAPI's error location ("body", "messages", 0, "content") -> "messages[0].content"."""
    parts = [p for p in loc if p not in ("body", "query", "path", "header")]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif not str(p).startswith(("function-", "union[", "literal[", "list[", "str", "int",
                                    "float", "bool", "dict", "json-or-python")):
            out += ("." if out else "") + str(p)
    return out or None


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON: "
                        f"{first.get('ctx', {}).get('error', 'could not parse it')}",
                        code="invalid_json")
    if first.get("type") == "missing" and tuple(first.get("loc", ())) == ("body",):
        return APIError(400, "the request needs a JSON body", code="invalid_json")
    param = _param_of(tuple(first.get("loc", ())))
    message = first.get("msg", "invalid value")
    code = "missing_required_parameter" if first.get("type") == "missing" else "invalid_value"
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return APIError(400, f"{param or 'request'}: {message}{more}", param=param, code=code)


def install_error_handlers(app: FastAPI):
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return APIError(exc.status_code, message, type=kind,
                        headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        return APIError(500, f"internal error ({type(exc).__name__}); the server logged it",
                        type="server_error", code="internal_error").response()
