"""Who is calling: API keys, roles, and the actor name recorded on operator actions.

``guard`` checks every request (``create_app`` registers it after the rate limiter, so that
refused credentials are rate limited too), ``keys`` is the key service, ``routes`` serves
``/api/auth/keys`` and ``cli`` ``flask apikey``; the security schemes of the OpenAPI document
are in ``app/openapi.py``.
"""

from __future__ import annotations

from flask import g


def current_actor() -> str:
    """The name recorded on operator actions: the API key's name, or ``anonymous``."""
    return g.get("actor") or "anonymous"
