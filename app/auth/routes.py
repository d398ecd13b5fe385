"""``/api/auth/keys``: API keys over HTTP (admin only, see ``guard``)."""

from __future__ import annotations

from typing import Any

from flask.views import MethodView

from ..extensions import Blueprint, db
from ..schemas import StatusSchema
from . import keys
from .schemas import CreatedKeySchema, KeyCreateSchema, KeySchema

blp = Blueprint("auth", __name__, url_prefix="/api/auth", description="API keys (admin only)")


@blp.route("/keys")
class ApiKeys(MethodView):
    @blp.response(200, KeySchema(many=True))
    def get(self) -> Any:
        """List API keys (revoked and expired ones included)"""
        return keys.list_keys(db.session)

    @blp.arguments(KeyCreateSchema)
    @blp.response(201, CreatedKeySchema)
    def post(self, data: dict[str, Any]) -> Any:
        """Create an API key; the response is the only place the key ever appears"""
        key, plain = keys.create_key(db.session, data["name"], data["role"], data["expires_days"])
        return {"key": plain, **{name: getattr(key, name) for name in KeySchema().fields}}


@blp.route("/keys/<int:key_id>")
class ApiKeyById(MethodView):
    @blp.response(200, StatusSchema)
    def delete(self, key_id: int) -> dict[str, str]:
        """Revoke an API key"""
        key = keys.revoke_key(db.session, key_id)
        return {"status": "success", "message": f"API key {key.name} revoked"}
