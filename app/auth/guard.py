"""The auth check applied to every request (API.md §8), before any view runs.

``ELEMTA_AUTH_MODE``:
- ``admin`` (default): reads are open; every mutation (any method but GET/HEAD/OPTIONS) needs
  an ``admin`` key.
- ``all``: everything but the health probes needs a key; reads accept ``read`` or ``admin``.
- ``off``: nothing is checked (a warning is logged at start).

Sending (``POST /api/send-test``) takes a ``send`` or an ``admin`` key in both modes; a ``send``
key may do nothing else (where reads are open, it reads like anyone without a key).

Whatever the mode (but ``off``), the key endpoints (``/api/auth/...``) are admin only, and a key
that is presented must be valid even where none is required: a client with a revoked or
mistyped key learns it at once instead of silently acting as ``anonymous``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import re

from flask import Flask, current_app, g, request

from ..errors import ApiError, is_database_unavailable
from ..extensions import db
from .keys import SENDING_ROLES, verify_key

log = logging.getLogger("elemta.auth")

# Health probes stay open in every mode: orchestrators and load balancers carry no key.
OPEN_PATHS = frozenset({"/api/health", "/livez", "/readyz"})
# The dashboard's shell and assets hold no data (every value comes from the API, with the key
# the user signs in with), and a browser cannot send a header when it navigates.
OPEN_BLUEPRINTS = frozenset({"ui"})
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# WebSocket endpoints: browsers cannot set headers there, so ?api_key= is accepted too.
WEBSOCKET_PATH = re.compile(r"^/api/(?:[^/]+/)*ws/?$")
ADMIN_ONLY_BLUEPRINTS = frozenset({"auth", "dkim", "webhooks"})
# Endpoints that send mail: the ``send`` role's whole reach (API.md §8), admin keys too.
SENDING_ENDPOINTS = frozenset({"mail.SendTest"})
# Who am I (the dashboard's sign-in, GET /api/auth/me): any valid key, whatever its role;
# without a key wherever reads are open.
ANY_CALLER_ENDPOINTS = frozenset({"auth.CallerIdentity"})

UNAUTHORIZED_HEADERS = {"WWW-Authenticate": "Bearer"}


@dataclasses.dataclass(frozen=True)
class Principal:
    """The verified caller of this request (plain values: no ORM object outlives the check)."""

    key_id: int
    name: str
    role: str
    key_hash: str
    expires_at: dt.datetime | None = None


def is_websocket_path(path: str) -> bool:
    return bool(WEBSOCKET_PATH.match(path))


def presented_key() -> str | None:
    """The key the client sent: Authorization: Bearer, X-API-Key, or ?api_key= on WebSockets."""
    req = request._get_current_object()  # type: ignore[attr-defined]
    environ = req.environ
    scheme, _, value = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    header = environ.get("HTTP_X_API_KEY", "").strip()
    if header:
        return header
    if is_websocket_path(req.path):
        return req.args.get("api_key", "").strip() or None
    return None


def authenticate() -> Principal | None:
    """Verify the presented key once per request (cached on ``g``); None when none is valid.

    When the database cannot be reached the key cannot be verified: the caller is then treated
    as anonymous, and ``check_request`` answers 503 only if the request needs a key (an open
    read such as /metrics keeps working through a database outage).
    """
    state = g._get_current_object()
    if "auth_principal" in state.__dict__:
        return state.auth_principal
    principal = None
    plain = presented_key()
    state.auth_key_presented = plain is not None
    state.auth_unverified = None
    if plain is not None and current_app.config["AUTH_MODE"] != "off":
        try:
            key = verify_key(db.session(), plain)
        except Exception as exc:
            if not is_database_unavailable(exc):
                raise
            db.session.rollback()
            state.auth_unverified = exc
            key = None
        if key is not None:
            principal = Principal(key.id, key.name, key.role, key.key_hash, key.expires_at)
            state.actor = key.name
    state.auth_principal = principal
    return principal


def client_identity() -> str:
    """Whom the rate limiter counts: the (hashed) API key when a valid one is given."""
    principal = authenticate()
    if principal is not None:
        return "key:" + principal.key_hash
    return "addr:" + (request.remote_addr or "unknown")


def required_role() -> str | None:
    """The role this request needs: "admin", "send", "read", "key" (any valid key) or None
    (open)."""
    req = request._get_current_object()  # type: ignore[attr-defined]
    mode = current_app.config["AUTH_MODE"]
    endpoint = req.endpoint
    if endpoint in ANY_CALLER_ENDPOINTS:
        return "key" if mode == "all" else None
    if req.blueprint in ADMIN_ONLY_BLUEPRINTS:
        return "admin"
    if endpoint in SENDING_ENDPOINTS and req.method == "POST":
        return "send"
    if req.method not in READ_METHODS:
        return "admin"
    if mode == "all":
        return "read"
    return None


def check_request() -> None:
    """before_request: 401 without a valid key where one is needed, 403 for a too-weak role."""
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    if app.config["AUTH_MODE"] == "off":
        return
    req = request._get_current_object()  # type: ignore[attr-defined]
    # Preflights carry no credentials by design; unknown routes and wrong methods get their
    # 404/405 (the routes are public in the OpenAPI document anyway).
    if req.method == "OPTIONS" or req.routing_exception is not None:
        return
    if req.path in OPEN_PATHS or req.blueprint in OPEN_BLUEPRINTS:
        return
    principal = authenticate()
    needed = required_role()
    state = g._get_current_object()
    if state.auth_unverified is not None:
        if needed is None:
            return
        raise state.auth_unverified  # the error handler answers 503 SERVICE_UNAVAILABLE
    if state.auth_key_presented and principal is None:
        raise ApiError(401, "UNAUTHORIZED", "Invalid, revoked or expired API key",
                       headers=UNAUTHORIZED_HEADERS)
    if needed is None:
        return
    if principal is None:
        raise ApiError(401, "UNAUTHORIZED",
                       "An API key is required (Authorization: Bearer <key> or X-API-Key)",
                       headers=UNAUTHORIZED_HEADERS)
    if needed == "send" and principal.role not in SENDING_ROLES:
        raise ApiError(403, "FORBIDDEN", "Sending mail needs a send or admin key")
    if needed == "admin" and principal.role != "admin":
        raise ApiError(403, "FORBIDDEN", "This action needs an admin key")
    if needed == "read" and principal.role == "send":
        raise ApiError(403, "FORBIDDEN", "A send key may only send mail (SMTP AUTH and "
                       "POST /api/send-test); reading needs a read or admin key")


_CALLER_NAMES = ("auth_principal", "auth_key_presented", "auth_unverified", "actor")


def forget_caller() -> None:
    """before_request, first of ours: nothing of a previous request's caller may survive.

    ``g`` belongs to the app context, which a request shares with an enclosing one (tests,
    scripts): without this, one request's key (and actor name) would leak into the next.
    """
    names = g._get_current_object().__dict__
    for name in _CALLER_NAMES:
        if name in names:
            del names[name]


def init_auth(app: Flask) -> None:
    """Register the check (after ``forget_caller`` and the limiter); warn when it is off."""
    app.before_request(check_request)
    if app.config["AUTH_MODE"] == "off":
        log.warning("ELEMTA_AUTH_MODE=off: the API accepts every request without a key; "
                    "use this for local development only")
