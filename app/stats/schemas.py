"""Delivery statistics request and response schemas (SPEC 3)."""

from __future__ import annotations

import marshmallow as ma

from ..schemas import Timestamp
from .service import TIME_SCALES


class DeliveryStatsQuerySchema(ma.Schema):
    time_scale = ma.fields.String(
        data_key="timeScale", load_default="hour", validate=ma.validate.OneOf(TIME_SCALES),
        metadata={"description": "Bucket size: hour (24), day (30), week (12), month (12)"},
    )


def _start() -> Timestamp:
    return Timestamp(required=True, metadata={"description": "The bucket's first instant"})


class BucketSchema(ma.Schema):
    label = ma.fields.String(required=True,
                             metadata={"description": "HH:00, YYYY-MM-DD or YYYY-MM"})
    start = _start()
    delivered = ma.fields.Integer(required=True)
    failed = ma.fields.Integer(required=True)
    deferred = ma.fields.Integer(required=True)


class HourBucketSchema(ma.Schema):
    hour = ma.fields.String(required=True, metadata={"description": "HH:00"})
    start = _start()
    delivered = ma.fields.Integer(required=True)
    failed = ma.fields.Integer(required=True)
    deferred = ma.fields.Integer(required=True)


class RecentErrorSchema(ma.Schema):
    message_id = ma.fields.String(required=True)
    recipient = ma.fields.String(required=True)
    error = ma.fields.String(allow_none=True)
    timestamp = Timestamp(required=True)
    status = ma.fields.String(required=True, metadata={"description": "failed or deferred"})


class DeliveryStatsSchema(ma.Schema):
    total_delivered = ma.fields.Integer(required=True)
    total_failed = ma.fields.Integer(required=True)
    total_deferred = ma.fields.Integer(required=True)
    success_rate = ma.fields.Float(required=True)
    data = ma.fields.List(ma.fields.Nested(BucketSchema), required=True)
    by_hour = ma.fields.List(ma.fields.Nested(HourBucketSchema), required=True)
    recent_errors = ma.fields.List(ma.fields.Nested(RecentErrorSchema), required=True)
