"""Delivery statistics request and response schemas (API.md §3)."""

from __future__ import annotations

from typing import Any

import marshmallow as ma

from ..schemas import Timestamp
from .classify import FAILURE_CLASSES
from .service import DOMAIN_SORTS, TIME_SCALES


def _time_scale() -> ma.fields.String:
    return ma.fields.String(
        data_key="timeScale", load_default="hour", validate=ma.validate.OneOf(TIME_SCALES),
        metadata={"description": "Bucket size: hour (24), day (30), week (12), month (12)"},
    )


class RecipientDomain(ma.fields.String):
    """A recipient domain as the rollup keeps it: trimmed, lower case, no "@" or spaces."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs).strip().lower()
        if not 1 <= len(text) <= 255 or any(c in text for c in "@ \t/"):
            raise ma.ValidationError("Must be a domain name (1 to 255 characters, no @).")
        return text


class DeliveryStatsQuerySchema(ma.Schema):
    time_scale = _time_scale()
    domain = RecipientDomain(metadata={
        "description": "Only this recipient domain (from the per-domain rollup)"})


class DomainStatsQuerySchema(ma.Schema):
    time_scale = _time_scale()
    limit = ma.fields.Integer(load_default=20, strict=False,
                              validate=ma.validate.Range(min=1, max=1000),
                              metadata={"description": "Number of domains, 1..1000"})
    sort = ma.fields.String(load_default="volume", validate=ma.validate.OneOf(DOMAIN_SORTS),
                            metadata={"description": "volume (outcomes, most first) or "
                                                     "failure_rate (highest first)"})


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


class DomainFailureClassSchema(ma.Schema):
    failure_class = ma.fields.String(required=True,
                                     metadata={"enum": list(FAILURE_CLASSES)})
    count = ma.fields.Integer(required=True,
                              metadata={"description": "Deferred and failed outcomes"})


class DomainStatsItemSchema(ma.Schema):
    domain = ma.fields.String(required=True)
    delivered = ma.fields.Integer(required=True)
    failed = ma.fields.Integer(required=True)
    deferred = ma.fields.Integer(required=True)
    total = ma.fields.Integer(required=True)
    success_rate = ma.fields.Float(required=True, metadata={"description": "As API.md §3"})
    failure_rate = ma.fields.Float(required=True,
                                   metadata={"description": "100 * failed / total, 1 decimal"})
    deferral_rate = ma.fields.Float(required=True,
                                    metadata={"description": "100 * deferred / total"})
    failure_classes = ma.fields.List(ma.fields.Nested(DomainFailureClassSchema), required=True,
                                     metadata={"description": "Top 5, most frequent first"})
    latency_p50 = ma.fields.Float(required=True, allow_none=True, metadata={
        "description": "Seconds from reception to delivery: the upper bound of the histogram "
                       "bucket holding the median (docs/STATS.md); null without deliveries"})
    latency_p95 = ma.fields.Float(required=True, allow_none=True,
                                  metadata={"description": "As latency_p50, 95th percentile"})


class DomainStatsSchema(ma.Schema):
    time_scale = ma.fields.String(required=True)
    sort = ma.fields.String(required=True)
    since = Timestamp(required=True, metadata={"description": "The window's first instant"})
    until = Timestamp(required=True, metadata={"description": "The end of the window "
                                                              "(exclusive)"})
    total_domains = ma.fields.Integer(required=True,
                                      metadata={"description": "Domains with outcomes in "
                                                               "the window"})
    domains = ma.fields.List(ma.fields.Nested(DomainStatsItemSchema), required=True)
