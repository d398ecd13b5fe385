"""Delivery statistics endpoint (API.md §3): a thin view over ``stats.service``."""

from __future__ import annotations

from typing import Any

from flask.views import MethodView

from ..api import Blueprint
from ..extensions import db
from ..http import conditional
from . import service
from .schemas import (
    DeliveryStatsQuerySchema,
    DeliveryStatsSchema,
    DomainStatsQuerySchema,
    DomainStatsSchema,
)

blp = Blueprint("stats", __name__, url_prefix="/api/stats", description="Delivery statistics")


@blp.route("/delivery")
class DeliveryStats(MethodView):
    @conditional
    @blp.arguments(DeliveryStatsQuerySchema, location="query", as_kwargs=True)
    @blp.response(200, DeliveryStatsSchema, headers=conditional.HEADERS)
    @blp.alt_response(304, description=conditional.NOT_MODIFIED)
    def get(self, time_scale: str, domain: str | None = None) -> dict[str, Any]:
        """Recipient delivery outcomes in zero-filled buckets, newest first (?domain=: one)"""
        return service.delivery_stats(db.session(), time_scale, domain=domain)


@blp.route("/domains")
class DomainStats(MethodView):
    @conditional
    @blp.arguments(DomainStatsQuerySchema, location="query", as_kwargs=True)
    @blp.response(200, DomainStatsSchema, headers=conditional.HEADERS)
    @blp.alt_response(304, description=conditional.NOT_MODIFIED)
    def get(self, time_scale: str, limit: int, sort: str) -> dict[str, Any]:
        """Per recipient domain: outcomes, rates, failure classes, latency percentiles"""
        return service.domain_stats(db.session(), time_scale, limit=limit, sort=sort)
