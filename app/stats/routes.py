"""Delivery statistics endpoint (SPEC 3): a thin view over ``stats.service``."""

from __future__ import annotations

from typing import Any

from flask.views import MethodView

from ..extensions import Blueprint, db
from . import service
from .schemas import DeliveryStatsQuerySchema, DeliveryStatsSchema

blp = Blueprint("stats", __name__, url_prefix="/api/stats", description="Delivery statistics")


@blp.route("/delivery")
class DeliveryStats(MethodView):
    @blp.arguments(DeliveryStatsQuerySchema, location="query", as_kwargs=True)
    @blp.response(200, DeliveryStatsSchema)
    def get(self, time_scale: str) -> dict[str, Any]:
        """Recipient delivery outcomes in zero-filled buckets, newest first"""
        return service.delivery_stats(db.session, time_scale)
