"""Per-request plumbing shared by every endpoint: request ids, size limit, CORS, headers."""

from __future__ import annotations

import functools
import io
import re
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlencode

from flask import Flask, Response, current_app, g, request
from werkzeug.exceptions import RequestEntityTooLarge

from .errors import ApiError

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
SECURITY_HEADER_ITEMS = tuple(SECURITY_HEADERS.items())


# CORS (API.md §9): what a browser page on an allowed origin may send and read.
CORS_ALLOW_HEADERS = "Authorization, Content-Type, X-API-Key, X-Request-ID"
CORS_EXPOSE_HEADERS = ("X-Request-ID, X-Total-Count, Link, X-RateLimit-Limit, "
                       "X-RateLimit-Remaining, X-RateLimit-Reset, Retry-After")
CORS_MAX_AGE = "600"


def origin_allowed(origin: str) -> bool:
    allowed = current_app.config["CORS_ORIGINS"]
    return "*" in allowed or origin in allowed


def is_preflight() -> bool:
    return (request.method == "OPTIONS" and "Origin" in request.headers
            and "Access-Control-Request-Method" in request.headers)


def answer_preflight() -> Response | None:
    """204 with the route's methods for an allowed origin; 403 for any other origin."""
    if not is_preflight() or request.routing_exception is not None:
        return None  # not a preflight, or an unknown route: the usual 404
    origin = request.headers["Origin"]
    if not origin_allowed(origin):
        raise ApiError(403, "FORBIDDEN", "Cross-origin requests from this origin are not allowed",
                       headers={"Vary": "Origin"})
    adapter = current_app.url_map.bind_to_environ(request.environ)
    methods = sorted(set(adapter.allowed_methods()) | {"OPTIONS"})
    response = current_app.response_class(status=204)
    response.headers["Access-Control-Allow-Origin"] = origin
    response.headers["Access-Control-Allow-Methods"] = ", ".join(methods)
    response.headers["Access-Control-Allow-Headers"] = CORS_ALLOW_HEADERS
    response.headers["Access-Control-Max-Age"] = CORS_MAX_AGE
    return response


# NUL, and UTF-16 surrogate code points (JSON's "\\ud800" decodes to a lone one).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def contains_unstorable(value: object) -> bool:
    """True when a NUL or a lone surrogate hides anywhere in ``value`` (str, or lists/dicts).

    No field of this API has a use for either, and both break what stores or sends text: SQLite
    ends a bound string at a NUL (``sender=%00`` became a LIKE pattern matching every message),
    PostgreSQL refuses NUL, and a lone surrogate cannot be encoded as UTF-8 at all (not in the
    database, not in a message). They are refused at the door, in the URL here and in JSON
    bodies by the request parser. Walked with a stack, not recursion: how deep a value nests
    is the client's choice.
    """
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if _UNSTORABLE.search(item) is not None:
                return True
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
    return False


# No request body of this API nests deeper than a few levels; the limit leaves room for any
# future one and stays far below what Python's parser and marshmallow can recurse through.
MAX_JSON_DEPTH = 32
# One token of a JSON text as far as nesting goes: a complete string (escapes included; its
# brackets do not count), a bracket, or a quote that no string closes (the text is broken).
_JSON_NESTING_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*+"|[\[\]{}]|"', re.DOTALL)


def json_nests_deeper_than(raw: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """True when the JSON text ``raw`` opens more than ``limit`` arrays/objects inside each other.

    Checked on the text, before it is parsed: parsing and validating a value recurse once per
    level, and ``[[[...]]]`` a thousand deep ends in RecursionError (a 500) rather than a 400.
    One pass, linear in the length (an unterminated string ends the scan: the body is not JSON).
    """
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False  # every body this API expects: no scan needed
    depth = 0
    for match in _JSON_NESTING_TOKEN.finditer(raw):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            if depth > limit:
                return True
        elif token in (b"]", b"}"):
            depth -= 1
        elif token == b'"':
            break
    return False


UNSTORABLE_REFUSED = "NUL characters and unpaired surrogates are not allowed in requests"


def buffer_chunked_body(environ: dict, limit: int) -> None:
    """Read a body sent without Content-Length (chunked) up to ``limit`` bytes, or refuse it.

    werkzeug stops reading such a body at the limit without an error, so the view would see
    a silently truncated body. Reading one byte more tells; what fits is handed on with its
    length, like any other body.
    """
    stream = environ["wsgi.input"]
    received = bytearray()
    while len(received) <= limit:
        chunk = stream.read(limit + 1 - len(received))
        if not chunk:
            break
        received += chunk
    if len(received) > limit:
        raise RequestEntityTooLarge()
    environ["wsgi.input"] = io.BytesIO(bytes(received))
    environ["CONTENT_LENGTH"] = str(len(received))
    environ.pop("wsgi.input_terminated", None)
    environ.pop("HTTP_TRANSFER_ENCODING", None)


def next_page_link(**query: str) -> str:
    """``Link: <...>; rel="next"`` for this request's URL with ``query`` changed.

    Absolute on ``ELEMTA_PUBLIC_URL`` when one is configured, relative to the host otherwise:
    never built from the request's Host header or X-Forwarded-* (a client could make the API
    hand out links to a host of its choice).
    """
    args = request.args.to_dict()
    args.update(query)
    # The public URL stands for the API's root, path prefix included (a proxy's location).
    base = current_app.config["PUBLIC_URL"] or request.script_root
    return f'<{base}{quote(request.path)}?{urlencode(args)}>; rel="next"'


def current_request_id() -> str | None:
    return g.get("request_id")


def register_request_hooks(app: Flask) -> None:
    # The hooks run on every request: each takes the request (and ``g``) out of its context
    # once instead of through the proxies on every attribute, reads headers from the WSGI
    # environ, and the app's settings from its own config (docs/PERFORMANCE.md).
    config = app.config

    @app.before_request
    def _assign_request_id() -> None:
        req = request._get_current_object()  # type: ignore[attr-defined]
        environ = req.environ
        # Echo a caller's id when it is sane; anything else would end up in logs unchecked.
        given = environ.get("HTTP_X_REQUEST_ID", "")
        g._get_current_object().request_id = (
            given if _REQUEST_ID.match(given) else uuid.uuid4().hex)
        # Refuse an oversized body up front, whether or not the view would read it. A request
        # without a body (no length, not chunked: every GET of the API) has nothing to check.
        if "CONTENT_LENGTH" in environ or environ.get("wsgi.input_terminated"):
            limit = config["MAX_CONTENT_LENGTH"]
            if limit and req.content_length and req.content_length > limit:
                raise RequestEntityTooLarge()
            if limit and req.content_length is None and environ.get("wsgi.input_terminated"):
                buffer_chunked_body(environ, limit)
        if environ.get("QUERY_STRING"):
            checked: object = [req.path, *req.args.items(multi=True)]
        else:
            checked = req.path
        if contains_unstorable(checked):
            raise ApiError(400, "VALIDATION_ERROR", UNSTORABLE_REFUSED)

    # Registered after the request id hook and before the rate limiter and the auth check
    # (create_app's order): a preflight carries no credentials and costs nothing.
    app.before_request(answer_preflight)

    @app.after_request
    def _common_headers(response: Response) -> Response:
        req = request._get_current_object()  # type: ignore[attr-defined]
        headers = response.headers
        present = {name.lower() for name in headers.keys()}
        given = g._get_current_object().__dict__.get("request_id")
        headers["X-Request-ID"] = given or uuid.uuid4().hex
        # add() where the header is absent: setdefault() would search the headers twice.
        for name, value in SECURITY_HEADER_ITEMS:
            if name.lower() not in present:
                headers.add(name, value)
        if req.path.startswith("/api"):
            headers["Cache-Control"] = "no-store"
        if "vary" in present:
            response.vary.add("Origin")
        else:  # the usual case, without parsing and re-serialising an empty header set
            headers.add("Vary", "Origin")
        origin = req.environ.get("HTTP_ORIGIN")
        if origin and "access-control-allow-origin" not in present and (
                "*" in config["CORS_ORIGINS"] or origin in config["CORS_ORIGINS"]):
            headers["Access-Control-Allow-Origin"] = origin
            headers["Access-Control-Expose-Headers"] = CORS_EXPOSE_HEADERS
        return response


class _Conditional:
    """``ETag`` and ``If-None-Match`` for a GET view (outermost decorator, above flask-smorest's,
    so it sees the finished response).

    The tag is a hash of the body: two requests that would get the same answer get the same
    tag, and a client that sends it back gets ``304 Not Modified`` without a body. The answer
    is still computed (its cost is the rollup read): what is saved is the transfer and the
    client's work. ``Cache-Control: no-store`` stays (API.md §9): a browser's own cache does
    not keep these answers, so ``fetch()`` never sends ``If-None-Match`` by itself and always
    gets the data; clients that keep the last answer (scripts, proxies, monitoring) revalidate.
    """

    HEADERS = {"ETag": {"schema": {"type": "string"},
                        "description": "Tag of this answer; send it as If-None-Match"}}
    NOT_MODIFIED = "Not modified: the If-None-Match tag is the current answer's"

    def __call__(self, view: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            response = view(*args, **kwargs)
            if isinstance(response, Response) and response.status_code == 200:
                response.add_etag()
                response.make_conditional(request)
            return response

        return wrapper


conditional = _Conditional()
