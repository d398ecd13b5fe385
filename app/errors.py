"""The one JSON error shape for every failure (API.md §1).

``{"error": "human readable", "code": "UPPER_SNAKE", "details": null | str | object}``

Every path that can fail ends here: ``ApiError`` raised by services and views, werkzeug's HTTP
exceptions (routing, 405, 413, ...), flask-smorest/webargs validation (400, never 422), the rate
limiter's 429, a database that is down (503), a conflict with concurrent work that outlasted the
retries (409) and anything unexpected (500, logged, no internals in the body).
"""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy.exc as sa_exc
from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException

from .database import describe_error, is_transient_conflict, is_unreachable

log = logging.getLogger("elemta.errors")

CODE_BY_STATUS = {
    400: "VALIDATION_ERROR",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    409: "CONFLICT",
    413: "PAYLOAD_TOO_LARGE",
    # 414 and 431 come from the HTTP server (gunicorn, nginx) before the application runs.
    414: "URI_TOO_LONG",
    415: "UNSUPPORTED_MEDIA_TYPE",
    422: "VALIDATION_ERROR",
    429: "RATE_LIMITED",
    431: "HEADERS_TOO_LARGE",
    500: "INTERNAL_ERROR",
    503: "SERVICE_UNAVAILABLE",
}

MESSAGE_BY_STATUS = {
    400: "Invalid request",
    401: "Authentication required",
    403: "Insufficient permissions",
    404: "Resource not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Request body too large",
    414: "Request line too long (URL and query over 8190 bytes)",
    415: "Unsupported media type; send application/json",
    429: "Rate limit exceeded",
    431: "Request header fields too large",
    500: "Internal server error",
    503: "Service unavailable",
}

# Headers of werkzeug's own error responses worth keeping (Allow on 405, Retry-After on 429...).
_KEPT_HEADERS = ("Allow", "Retry-After", "WWW-Authenticate")


class ApiError(Exception):
    """An error with a status, a contract code, a message and optional details."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers or {}


class NotFound(ApiError):
    def __init__(self, message: str = "Resource not found", code: str = "NOT_FOUND") -> None:
        super().__init__(404, code, message)


class Conflict(ApiError):
    def __init__(self, message: str) -> None:
        super().__init__(409, "CONFLICT", message)


class ValidationFailed(ApiError):
    def __init__(self, message: str, details: Any = None) -> None:
        super().__init__(400, "VALIDATION_ERROR", message, details)


def error_response(
    status: int,
    code: str,
    message: str,
    details: Any = None,
    headers: dict[str, str] | None = None,
) -> Response:
    response = jsonify({"error": message, "code": code, "details": details})
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def handle_api_error(error: ApiError) -> Response:
    return error_response(error.status, error.code, error.message, error.details, error.headers)


def handle_http_exception(error: HTTPException) -> Response:
    """Werkzeug/flask-smorest HTTP errors in the contract's shape, keeping useful headers."""
    status = error.code or 500
    if status == 422:
        status = 400
    data = getattr(error, "data", None) or {}
    details = data.get("messages") if isinstance(data, dict) else None
    message = MESSAGE_BY_STATUS.get(status) or error.name
    if status == 404:
        message = "The requested URL was not found"
    elif status == 429 and error.description:
        message = f"Rate limit exceeded: {error.description}"
    headers = {}
    for name, value in error.get_headers():
        if name in _KEPT_HEADERS:
            headers[name] = value
    if isinstance(data, dict):
        headers.update(data.get("headers") or {})
    code = CODE_BY_STATUS.get(status, "HTTP_ERROR")
    return error_response(status, code, message, details, headers)


def handle_unexpected(error: Exception) -> Response:
    """Anything not foreseen: a database outage is 503, a conflict with concurrent work that
    outlasted the retries 409, the rest 500; never internals in the body."""
    if isinstance(error, HTTPException):  # pragma: no cover - routed to the handler above
        return handle_http_exception(error)
    if is_transient_conflict(error):
        log.warning("database conflict: %s", describe_error(error))
        return error_response(409, "CONFLICT", CONFLICT_MESSAGE, None)
    if is_database_unavailable(error):
        log.error("database unavailable: %s", describe_error(error))
        return error_response(503, "SERVICE_UNAVAILABLE", "Database unavailable", None)
    log.exception("unhandled error")
    return error_response(500, "INTERNAL_ERROR", "Internal server error", None)


CONFLICT_MESSAGE = "The request conflicted with concurrent changes; try again"


def is_database_unavailable(error: BaseException) -> bool:
    """True for errors that mean 'cannot reach or use the database right now' (503).

    A database without the schema (not migrated yet) counts: the request cannot be served
    there, it is not a bug in it. A deadlock or a busy SQLite file does not: the database is
    healthy, and the transaction can be run again (``database.is_transient_conflict``).
    """
    return is_unreachable(error) or is_missing_schema(error)


def is_missing_schema(error: BaseException) -> bool:
    """A table is missing. SQLite: "no such table"; PostgreSQL: SQLSTATE 42P01."""
    if not isinstance(error, sa_exc.DBAPIError):
        return False
    return ("no such table" in str(error.orig).lower()
            or getattr(error.orig, "sqlstate", None) == "42P01")


def register_error_handlers(app: Flask) -> None:
    app.register_error_handler(ApiError, handle_api_error)
    app.register_error_handler(HTTPException, handle_http_exception)
    app.register_error_handler(Exception, handle_unexpected)
