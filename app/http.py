"""Per-request plumbing shared by every endpoint: request ids and response headers."""

from __future__ import annotations

import re
import uuid

from flask import Flask, Response, current_app, g, request
from werkzeug.exceptions import RequestEntityTooLarge

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


def current_request_id() -> str | None:
    return g.get("request_id")


def register_request_hooks(app: Flask) -> None:
    @app.before_request
    def _assign_request_id() -> None:
        # Echo a caller's id when it is sane; anything else would end up in logs unchecked.
        given = request.headers.get("X-Request-ID", "")
        g.request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        # Refuse an oversized body up front, whether or not the view would read it.
        limit = current_app.config["MAX_CONTENT_LENGTH"]
        if limit and request.content_length and request.content_length > limit:
            raise RequestEntityTooLarge()

    @app.after_request
    def _common_headers(response: Response) -> Response:
        response.headers["X-Request-ID"] = g.get("request_id") or uuid.uuid4().hex
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        if request.path.startswith("/api"):
            response.headers["Cache-Control"] = "no-store"
        return response
