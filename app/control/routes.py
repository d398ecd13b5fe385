"""``/api/policies``, ``/api/suppressions``, ``/api/rules``: thin views over ``app/control``
(API.md §16).

Reads are open as every read (``ELEMTA_AUTH_MODE``); changes need an admin key.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from flask import Response, current_app, request
from flask.views import MethodView

from ..api import Blueprint
from ..auth import current_actor
from ..errors import ApiError
from ..extensions import db
from ..schemas import StatusSchema
from . import policies, rules, state, suppression
from .schemas import (
    ImportResultSchema,
    PolicyCreateSchema,
    PolicySchema,
    PolicyStateSchema,
    PolicyUpdateSchema,
    RuleCreateSchema,
    RuleQuerySchema,
    RuleSchema,
    SuppressionCreateSchema,
    SuppressionListQuerySchema,
    SuppressionQuerySchema,
    SuppressionSchema,
)

policies_blp = Blueprint("policies", __name__, url_prefix="/api/policies",
                         description="Destination policies: connection and rate limits")
suppressions_blp = Blueprint("suppressions", __name__, url_prefix="/api/suppressions",
                             description="The suppression list")
rules_blp = Blueprint("rules", __name__, url_prefix="/api/rules",
                      description="Rules: hold, defer or bounce matching mail until they expire")


# --------------------------------------------------------------------------- policies


@policies_blp.route("")
class Policies(MethodView):
    @policies_blp.response(200, PolicySchema(many=True))
    def get(self) -> Any:
        """List destination policies (default, domains, MX patterns)"""
        return policies.list_policies(db.session())

    @policies_blp.arguments(PolicyCreateSchema)
    @policies_blp.response(201, PolicySchema)
    def post(self, data: dict[str, Any]) -> Any:
        """Create a policy; every worker applies it within seconds"""
        return policies.create_policy(db.session(), data, current_actor())


@policies_blp.route("/state")
class PolicyState(MethodView):
    @policies_blp.response(200, PolicyStateSchema)
    def get(self) -> Any:
        """Destinations being limited now: backoff, connections in use, messages this window"""
        return {"destinations": state.destination_states(db.session())}


@policies_blp.route("/<int:policy_id>")
class PolicyById(MethodView):
    @policies_blp.response(200, PolicySchema)
    def get(self, policy_id: int) -> Any:
        """One policy"""
        return policies.get_policy(db.session(), policy_id)

    @policies_blp.arguments(PolicyUpdateSchema)
    @policies_blp.response(200, PolicySchema)
    def patch(self, data: dict[str, Any], policy_id: int) -> Any:
        """Change a policy's limits (null removes a limit)"""
        return policies.update_policy(db.session(), policy_id, data, current_actor())

    @policies_blp.response(200, StatusSchema)
    def delete(self, policy_id: int) -> Any:
        """Delete a policy"""
        policies.delete_policy(db.session(), policy_id, current_actor())
        return {"status": "success", "message": f"Policy {policy_id} deleted"}


# --------------------------------------------------------------------------- suppressions


def _filters(args: dict[str, Any]) -> suppression.SuppressionFilters:
    return suppression.SuppressionFilters(address=args.get("address"),
                                          source=args.get("source"),
                                          reason=args.get("reason"),
                                          include_expired=args.get("include_expired", False))


@suppressions_blp.route("")
class Suppressions(MethodView):
    @suppressions_blp.arguments(SuppressionListQuerySchema, location="query")
    @suppressions_blp.response(200, SuppressionSchema(many=True),
                               headers={"X-Total-Count": {"schema": {"type": "integer"}},
                                        "Link": {"schema": {"type": "string"}}})
    def get(self, args: dict[str, Any]) -> Any:
        """List suppressed addresses, newest first (filters, keyset paging)"""
        rows, next_cursor, total = suppression.list_suppressions(
            db.session(), _filters(args), limit=args["limit"], cursor=args.get("cursor"))
        headers = {"X-Total-Count": str(total)}
        if next_cursor:
            query = request.args.to_dict()
            query["cursor"] = next_cursor
            headers["Link"] = f'<{request.base_url}?{urlencode(query)}>; rel="next"'
        return rows, 200, headers

    @suppressions_blp.arguments(SuppressionCreateSchema)
    @suppressions_blp.response(201, SuppressionSchema)
    def post(self, data: dict[str, Any]) -> Any:
        """Suppress an address (no mail is queued for it until removed or expired)"""
        return suppression.add_suppression(db.session(), data["address"], data["reason"],
                                           data["expires_at"], current_actor())


@suppressions_blp.route("/export")
class SuppressionExport(MethodView):
    @suppressions_blp.arguments(SuppressionQuerySchema, location="query")
    @suppressions_blp.response(200, {"type": "string"}, content_type="text/csv")
    def get(self, args: dict[str, Any]) -> Any:
        """The suppression list as CSV (address, reason, source, created_at, expires_at)"""
        return Response(suppression.export_csv(db.session(), _filters(args)),
                        mimetype="text/csv", headers={
                            "Content-Disposition": 'attachment; filename="suppressions.csv"'})


@suppressions_blp.route("/import")
class SuppressionImport(MethodView):
    @suppressions_blp.doc(requestBody={"required": True, "content": {
        "text/csv": {"schema": {"type": "string"}}},
        "description": "A header line naming 'address' (and optionally 'reason', "
                       "'expires_at'), then one address per line; an export is accepted"})
    @suppressions_blp.response(200, ImportResultSchema)
    def post(self) -> Any:
        """Import addresses from CSV: all rows valid or nothing is imported"""
        if request.mimetype != "text/csv":
            raise ApiError(415, "UNSUPPORTED_MEDIA_TYPE", "Unsupported media type; send text/csv")
        try:
            text = request.get_data().decode("utf-8-sig")
        except UnicodeDecodeError:
            raise ApiError(400, "VALIDATION_ERROR", "The CSV is not UTF-8") from None
        return suppression.import_csv(db.session(), text, current_actor())


@suppressions_blp.route("/<path:address>")
class SuppressionByAddress(MethodView):
    @suppressions_blp.response(200, SuppressionSchema)
    def get(self, address: str) -> Any:
        """One suppressed address"""
        return suppression.get_suppression(db.session(), address)

    @suppressions_blp.response(200, StatusSchema)
    def delete(self, address: str) -> Any:
        """Remove an address from the suppression list"""
        suppression.remove_suppression(db.session(), address, current_actor())
        return {"status": "success", "message": f"{address} removed from the suppression list"}


# --------------------------------------------------------------------------- rules


@rules_blp.route("")
class Rules(MethodView):
    @rules_blp.arguments(RuleQuerySchema, location="query")
    @rules_blp.response(200, RuleSchema(many=True))
    def get(self, args: dict[str, Any]) -> Any:
        """List rules with their live hit counts"""
        return rules.list_rules(db.session(), args["include_expired"])

    @rules_blp.arguments(RuleCreateSchema)
    @rules_blp.response(201, RuleSchema)
    def post(self, data: dict[str, Any]) -> Any:
        """Make a rule: applied at once to matching queued mail, then to new mail until expiry"""
        return rules.create_rule(db.session(), action=data["action"],
                                 expires_at=rules.expiry(data["expires_at"], data["minutes"]),
                                 sender=data["sender"], recipient=data["recipient"],
                                 domain=data["domain"], comment=data["comment"],
                                 actor=current_actor(), config=current_app.config)


@rules_blp.route("/<int:rule_id>")
class RuleById(MethodView):
    @rules_blp.response(200, RuleSchema)
    def get(self, rule_id: int) -> Any:
        """One rule"""
        return rules.get_rule(db.session(), rule_id)

    @rules_blp.response(200, StatusSchema)
    def delete(self, rule_id: int) -> Any:
        """End a rule now (mail it held stays held until released)"""
        rules.delete_rule(db.session(), rule_id, current_actor())
        return {"status": "success", "message": f"Rule {rule_id} deleted"}
