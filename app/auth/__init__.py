"""Who is calling: API keys, roles, and the actor name recorded on operator actions.

``init_app`` wires SPEC sections 8 and 9 into an application: the rate limiter (first, so that
refused credentials are rate limited too), the auth check, ``/api/auth/keys`` and
``flask apikey``, and the security schemes of the OpenAPI document.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flask import Flask, g

if TYPE_CHECKING:
    from ..extensions import Api


def current_actor() -> str:
    """The name recorded on operator actions: the API key's name, or ``anonymous``."""
    return g.get("actor") or "anonymous"


def init_app(app: Flask, api: Api) -> None:
    from ..ratelimit import init_ratelimit
    from .cli import apikey_cli
    from .guard import forget_caller, init_auth
    from .routes import blp

    app.before_request(forget_caller)
    init_ratelimit(app)
    init_auth(app)
    api.register_blueprint(blp)
    app.cli.add_command(apikey_cli)
    api.spec.components.security_scheme(
        "bearerAuth", {"type": "http", "scheme": "bearer",
                       "description": "Authorization: Bearer elemta_..."})
    api.spec.components.security_scheme(
        "apiKeyHeader", {"type": "apiKey", "in": "header", "name": "X-API-Key"})
    # Which requests need which role depends on ELEMTA_AUTH_MODE; the empty alternative says
    # that a key is optional where the mode leaves the endpoint open.
    api.spec.options["security"] = [{"bearerAuth": []}, {"apiKeyHeader": []}, {}]
