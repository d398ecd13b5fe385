"""``GET /api/domains/{domain}/check`` shapes."""

from __future__ import annotations

import marshmallow as ma

from ..schemas import Timestamp

STATUSES = ["pass", "warn", "fail"]


class CheckQuerySchema(ma.Schema):
    refresh = ma.fields.Boolean(load_default=False, metadata={
        "description": "Ask DNS now instead of reusing a report of the last "
                       "ELEMTA_DOMAIN_CHECK_CACHE seconds"})


class PublishSchema(ma.Schema):
    name = ma.fields.String(required=True, metadata={"example": "example.com"})
    type = ma.fields.String(required=True, metadata={"example": "TXT"})
    value = ma.fields.String(required=True, metadata={"example": "v=spf1 ip4:192.0.2.10 ~all"})


class CheckItemSchema(ma.Schema):
    name = ma.fields.String(required=True, metadata={
        "enum": ["spf", "dkim", "dmarc", "mx", "fcrdns", "mta_sts"]})
    status = ma.fields.String(required=True, metadata={"enum": STATUSES})
    summary = ma.fields.String(required=True, metadata={"description": "What it means, in words"})
    found = ma.fields.List(ma.fields.String(), required=True,
                           metadata={"description": "The records found in DNS"})
    publish = ma.fields.List(ma.fields.Nested(PublishSchema), required=True, metadata={
        "description": "The exact records to publish when something is missing or wrong"})
    details = ma.fields.List(ma.fields.String(), required=True)


class DomainReportSchema(ma.Schema):
    domain = ma.fields.String(required=True)
    status = ma.fields.String(required=True, metadata={"enum": STATUSES,
                                                       "description": "The worst item's"})
    checked_at = Timestamp(required=True)
    age_seconds = ma.fields.Integer(required=True, metadata={
        "description": "How old the report is (0 when just checked)"})
    cached = ma.fields.Boolean(required=True)
    sending_ips = ma.fields.List(ma.fields.String(), required=True,
                                 metadata={"description": "ELEMTA_SENDING_IPS"})
    hostname = ma.fields.String(required=True,
                                metadata={"description": "The name this host uses in EHLO"})
    checks = ma.fields.List(ma.fields.Nested(CheckItemSchema), required=True)
