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
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    header = request.headers.get("X-API-Key", "").strip()
    if header:
        return header
    if is_websocket_path(request.path):
        return request.args.get("api_key", "").strip() or None
    return None


def authenticate() -> Principal | None:
    """Verify the presented key once per request (cached on ``g``); None when none is valid.

    When the database cannot be reached the key cannot be verified: the caller is then treated
    as anonymous, and ``check_request`` answers 503 only if the request needs a key (an open
    read such as /metrics keeps working through a database outage).
    """
    if "auth_principal" in g:
        return g.auth_principal
    principal = None
    plain = presented_key()
    g.auth_key_presented = plain is not None
    g.auth_unverified = None
    if plain is not None and current_app.config["AUTH_MODE"] != "off":
        try:
            key = verify_key(db.session(), plain)
        except Exception as exc:
            if not is_database_unavailable(exc):
                raise
            db.session.rollback()
            g.auth_unverified = exc
            key = None
        if key is not None:
            principal = Principal(key.id, key.name, key.role, key.key_hash, key.expires_at)
            g.actor = key.name
    g.auth_principal = principal
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
    if request.endpoint in ANY_CALLER_ENDPOINTS:
        return "key" if current_app.config["AUTH_MODE"] == "all" else None
    if request.blueprint in ADMIN_ONLY_BLUEPRINTS:
        return "admin"
    if request.endpoint in SENDING_ENDPOINTS and request.method == "POST":
        return "send"
    if request.method not in READ_METHODS:
        return "admin"
    if current_app.config["AUTH_MODE"] == "all":
        return "read"
    return None


def check_request() -> None:
    """before_request: 401 without a valid key where one is needed, 403 for a too-weak role."""
    if current_app.config["AUTH_MODE"] == "off":
        return
    # Preflights carry no credentials by design; unknown routes and wrong methods get their
    # 404/405 (the routes are public in the OpenAPI document anyway).
    if request.method == "OPTIONS" or request.routing_exception is not None:
        return
    if request.path in OPEN_PATHS or request.blueprint in OPEN_BLUEPRINTS:
        return
    principal = authenticate()
    needed = required_role()
    if g.auth_unverified is not None:
        if needed is None:
            return
        raise g.auth_unverified  # the error handler answers 503 SERVICE_UNAVAILABLE
    if g.auth_key_presented and principal is None:
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


def forget_caller() -> None:
    """before_request, first of ours: nothing of a previous request's caller may survive.

    ``g`` belongs to the app context, which a request shares with an enclosing one (tests,
    scripts): without this, one request's key (and actor name) would leak into the next.
    """
    for name in ("auth_principal", "auth_key_presented", "auth_unverified", "actor"):
        g.pop(name, None)


def init_auth(app: Flask) -> None:
    """Register the check (after ``forget_caller`` and the limiter); warn when it is off."""
    app.before_request(check_request)
    if app.config["AUTH_MODE"] == "off":
        log.warning("ELEMTA_AUTH_MODE=off: the API accepts every request without a key; "
                    "use this for local development only")
