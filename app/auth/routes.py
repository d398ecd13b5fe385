"""``/api/auth/keys``: API keys over HTTP (admin only, see ``guard``)."""

from __future__ import annotations

from typing import Any

from flask import current_app
from flask.views import MethodView

from ..api import Blueprint
from ..extensions import db
from ..schemas import StatusSchema
from . import keys
from .guard import authenticate
from .schemas import CallerSchema, CreatedKeySchema, KeyCreateSchema, KeySchema

blp = Blueprint("auth", __name__, url_prefix="/api/auth",
                description="API keys (admin only) and the caller's identity")


@blp.route("/keys")
class ApiKeys(MethodView):
    @blp.response(200, KeySchema(many=True))
    def get(self) -> Any:
        """List API keys (revoked and expired ones included)"""
        return keys.list_keys(db.session())

    @blp.arguments(KeyCreateSchema)
    @blp.response(201, CreatedKeySchema)
    def post(self, data: dict[str, Any]) -> Any:
        """Create an API key; the response is the only place the key ever appears"""
        key, plain = keys.create_key(db.session(), data["name"], data["role"], data["expires_days"])
        return {"key": plain, **{name: getattr(key, name) for name in KeySchema().fields}}


@blp.route("/keys/<int:key_id>")
class ApiKeyById(MethodView):
    @blp.response(200, StatusSchema)
    def delete(self, key_id: int) -> dict[str, str]:
        """Revoke an API key"""
        key = keys.revoke_key(db.session(), key_id)
        return {"status": "success", "message": f"API key {key.name} revoked"}


@blp.route("/me")
class CallerIdentity(MethodView):
    @blp.response(200, CallerSchema)
    def get(self) -> dict[str, Any]:
        """The calling key's name, role and expiry, and the auth mode (any caller; 401 for a
        bad key, and without a key in auth mode all)"""
        principal = authenticate()
        mode = current_app.config["AUTH_MODE"]
        if principal is None:
            return {"name": None, "role": None, "expires_at": None, "auth_mode": mode}
        return {"name": principal.name, "role": principal.role,
                "expires_at": principal.expires_at, "auth_mode": mode}
