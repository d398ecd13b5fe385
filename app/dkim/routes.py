"""``/api/dkim/keys``: DKIM keys over HTTP (admin only, see ``auth.guard``)."""

from __future__ import annotations

from typing import Any

from flask.views import MethodView

from ..api import Blueprint
from ..extensions import db
from . import keys
from .schemas import DkimKeyCreateSchema, DkimKeyQuerySchema, DkimKeySchema, DkimSwitchSchema

blp = Blueprint("dkim", __name__, url_prefix="/api/dkim",
                description="DKIM signing keys (admin only)")


@blp.route("/keys")
class DkimKeys(MethodView):
    @blp.arguments(DkimKeyQuerySchema, location="query")
    @blp.response(200, DkimKeySchema(many=True))
    def get(self, args: dict[str, Any]) -> Any:
        """List DKIM keys (retired ones included); never the private keys"""
        return keys.list_keys(db.session(), args.get("domain"))

    @blp.arguments(DkimKeyCreateSchema)
    @blp.response(201, DkimKeySchema)
    def post(self, data: dict[str, Any]) -> Any:
        """Create a key; active at once unless the domain has one (then standby, until switched)"""
        return keys.create_key(db.session(), data["domain"], data["selector"], data["algorithm"])


@blp.route("/keys/<int:key_id>")
class DkimKeyById(MethodView):
    @blp.response(200, DkimKeySchema)
    def get(self, key_id: int) -> Any:
        """One DKIM key and its DNS record"""
        return keys.get_key(db.session(), key_id)


@blp.route("/keys/<int:key_id>/activate")
class DkimKeyActivate(MethodView):
    @blp.response(200, DkimSwitchSchema)
    def post(self, key_id: int) -> Any:
        """Switch signing to this key (publish its record first); the key it replaces retires"""
        key, retired = keys.activate_key(db.session(), key_id)
        return {"key": key, "retired": retired}


@blp.route("/keys/<int:key_id>/retire")
class DkimKeyRetire(MethodView):
    @blp.response(200, DkimKeySchema)
    def post(self, key_id: int) -> Any:
        """Stop signing with this key for good (keep its record published a while)"""
        return keys.retire_key(db.session(), key_id)
