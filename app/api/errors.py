"""API errors and their OpenAI-style bodies: `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import re
from typing import Any

import orjson
from pydantic import ValidationError


class APIError(Exception):
    """An error a client sees: HTTP status, OpenAI error type and code, optional Retry-After."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else {}

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep keyword state when the error crosses a Ray process boundary.
        return (_rebuild, (type(self), self.message, self.param, self.code, self.retry_after_s))


def _rebuild(
    cls: type[APIError], message: str, param: str | None, code: str | None, retry: int | None
) -> APIError:
    return cls(message, param=param, code=code, retry_after_s=retry)


class InvalidRequestError(APIError):
    status = 400
    type = "invalid_request_error"


class ModelNotFoundError(APIError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class NotFoundError(APIError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowedError(APIError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class RequestTooLargeError(APIError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class AuthenticationError(APIError):
    """No API key, or one that is malformed, unknown or revoked (401)."""

    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"

    def headers(self) -> dict[str, str]:
        return super().headers() | {"WWW-Authenticate": "Bearer"}


class PermissionDeniedError(APIError):
    """A valid key without the scope the endpoint needs (403)."""

    status = 403
    type = "permission_error"
    code = "insufficient_scope"


class RateLimitError(APIError):
    """A per-key limit reached (429, Retry-After and OpenAI's x-ratelimit-* headers)."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: int | None = None,
        limit_headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, param=param, code=code, retry_after_s=retry_after_s)
        self.limit_headers = dict(limit_headers or {})

    def headers(self) -> dict[str, str]:
        return super().headers() | self.limit_headers

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_limited, (self.message, self.retry_after_s, self.limit_headers))


def _rebuild_limited(message: str, retry: int | None, headers: dict[str, str]) -> RateLimitError:
    return RateLimitError(message, retry_after_s=retry, limit_headers=headers)


class OverloadedError(APIError):
    """The replica is at capacity; retry soon (429 with Retry-After)."""

    status = 429
    type = "rate_limit_error"
    code = "overloaded"


class ServiceUnavailableError(APIError):
    """No replica can take the request right now (503 with Retry-After)."""

    status = 503
    type = "service_unavailable"
    code = "no_replica_available"


class InternalError(APIError):
    status = 500
    type = "server_error"
    code = "internal_error"


def error_body(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_json(error: APIError) -> bytes:
    return orjson.dumps(error.body())


# Union members and validators appear in pydantic's error locations ("input.list[str]"); a
# client only needs the parameter path.
_TYPE_TAG = re.compile(r"^(body|str|int|float|bool|none|literal\[.*|.*\[.*\]|function-.*)$")


def from_validation_error(error: ValidationError | list[dict[str, Any]]) -> InvalidRequestError:
    """The first validation problem as a 400 that names the offending parameter."""
    items = error.errors() if isinstance(error, ValidationError) else error
    if not items:
        return InvalidRequestError("invalid request")
    first = items[0]
    loc = [str(part) for part in first.get("loc", ()) if not _TYPE_TAG.match(str(part))]
    param = ".".join(loc) or None
    message = str(first.get("msg", "invalid value"))
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if first.get("type") == "json_invalid":
        return InvalidRequestError(
            f"request body is not valid JSON: {message}", code="invalid_json"
        )
    if first.get("type") == "missing":
        return InvalidRequestError(f"missing required parameter: {param!r}", param=param)
    if param:
        message = f"invalid value for {param!r}: {message}"
    return InvalidRequestError(message, param=param)


class RequestTimeoutError(APIError):
    """The request ran past its model's time limit (the card's `timeouts`) and its work was
    cancelled (504)."""

    status = 504
    type = "timeout"
    code = "request_timeout"
