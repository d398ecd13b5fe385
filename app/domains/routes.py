"""``GET /api/domains/{domain}/check``: a thin view over ``domains.check``."""

from __future__ import annotations

from typing import Any

from flask import current_app
from flask.views import MethodView

from ..api import Blueprint
from ..extensions import db
from .check import cache_of, check_domain
from .schemas import CheckQuerySchema, DomainReportSchema

blp = Blueprint("domains", __name__, url_prefix="/api/domains",
                description="What receivers see of a sending domain")


@blp.route("/<string:domain>/check")
class DomainCheck(MethodView):
    @blp.arguments(CheckQuerySchema, location="query")
    @blp.response(200, DomainReportSchema)
    def get(self, args: dict[str, Any], domain: str) -> Any:
        """Check SPF, DKIM, DMARC, MX, reverse DNS and MTA-STS of a domain as receivers see it"""
        return check_domain(db.session(), domain, current_app.config,
                            cache=cache_of(current_app), refresh=args["refresh"])
