"""Queue request and response schemas (API.md §2)."""

from __future__ import annotations

from typing import Any

import marshmallow as ma

from ..dkim.signing import signatures_of
from ..export import EXPORT_FORMATS, FORMAT_DESCRIPTION
from ..logs.schemas import MessageEventSchema
from ..models import SHAPE_KINDS
from ..schemas import IntegerCountsSchema, Limit, Timestamp
from ..timeutil import isoformat_z
from .content import headers_of, text_of
from .shape import BUCKETS, SHAPE_QUEUES


class FilterQuerySchema(ma.Schema):
    """Listing filters, shared by the listing and the bulk actions."""

    sender = ma.fields.String(validate=ma.validate.Length(max=320),
                              metadata={"description": "Case-insensitive substring of the sender"})
    recipient = ma.fields.String(
        validate=ma.validate.Length(max=320),
        metadata={"description": "Case-insensitive substring of a recipient"})
    domain = ma.fields.String(validate=ma.validate.Length(max=255),
                              metadata={"description": "Exact recipient domain"})
    before = Timestamp(metadata={"description": "created_at earlier than this"})
    after = Timestamp(metadata={"description": "created_at later than this"})


class ListQuerySchema(FilterQuerySchema):
    format = ma.fields.String(validate=ma.validate.OneOf(EXPORT_FORMATS),
                              metadata={"description": FORMAT_DESCRIPTION})
    limit = Limit()
    cursor = ma.fields.String(validate=ma.validate.Length(max=512),
                              metadata={"description": "Opaque cursor from the Link header"})


class BulkQuerySchema(FilterQuerySchema):
    dry_run = ma.fields.Boolean(
        load_default=False,
        metadata={"description": "Count what would be affected, change nothing"})


class DetailQuerySchema(ma.Schema):
    format = ma.fields.String(validate=ma.validate.OneOf(["json", "raw"]), load_default="json")


class QueueStatsSchema(IntegerCountsSchema):
    pending = ma.fields.Integer(required=True)
    deferred = ma.fields.Integer(required=True)
    held = ma.fields.Integer(required=True)
    failed = ma.fields.Integer(required=True)
    total = ma.fields.Integer(required=True)


class MessageSchema(ma.Schema):
    """A queued message (API.md §2.1)."""

    id = ma.fields.String(required=True)
    queue = ma.fields.String(attribute="queue_state", required=True)
    from_ = ma.fields.String(attribute="sender", data_key="from", required=True)
    to = ma.fields.Method(
        "_to", required=True, metadata={
            "type": "array", "items": {
                "type": "string"}})
    subject = ma.fields.String(required=True)
    size = ma.fields.Integer(required=True)
    priority = ma.fields.Integer(required=True)
    attempts = ma.fields.Integer(required=True)
    created_at = Timestamp(required=True)
    updated_at = Timestamp(required=True)
    next_attempt_at = Timestamp(allow_none=True)
    last_error = ma.fields.String(allow_none=True)

    def _to(self, message: Any) -> list[str]:
        return [r.address for r in message.recipients]


class RecipientSchema(ma.Schema):
    address = ma.fields.String(required=True)
    status = ma.fields.String(required=True)
    attempts = ma.fields.Integer(required=True)
    last_error = ma.fields.String(allow_none=True)
    last_attempt_at = Timestamp(allow_none=True)
    next_attempt_at = Timestamp(allow_none=True)


class MessageDetailSchema(MessageSchema):
    """A message with its recipients, headers, content and timeline."""

    recipients = ma.fields.List(ma.fields.Nested(RecipientSchema), required=True)
    headers = ma.fields.Method(
        "_headers", required=True,
        metadata={"type": "array", "items": {"type": "array", "items": {"type": "string"}}})
    content = ma.fields.Method("_content", required=True, metadata={"type": "string"})
    events = ma.fields.List(ma.fields.Nested(MessageEventSchema), attribute="timeline",
                            required=True)
    dkim = ma.fields.Method(
        "_dkim", required=True,
        metadata={"type": "array", "items": {"type": "object", "properties": {
            "domain": {"type": "string"}, "selector": {"type": "string"},
            "algorithm": {"type": "string"}}},
            "description": "The DKIM keys that signed the message at acceptance (d=, s=); "
                           "[] when it was not signed"})

    def _headers(self, message: Any) -> list[list[str]]:
        return headers_of(message.content.raw)

    def _content(self, message: Any) -> str:
        return text_of(message.content.raw)

    def _dkim(self, message: Any) -> list[dict[str, str]]:
        return [signature.as_dict() for signature in signatures_of(message.content.raw)]


# --------------------------------------------------------------------------- queue shape

class QueueShapeQuerySchema(ma.Schema):
    queue = ma.fields.String(
        load_default="all", validate=ma.validate.OneOf(SHAPE_QUEUES),
        metadata={"description": "Queue state to shape, or all"})
    by = ma.fields.String(
        load_default="domain", validate=ma.validate.OneOf(SHAPE_KINDS),
        metadata={"description": "domain: recipients not yet delivered, by recipient domain; "
                                 "sender_domain: messages, by sender domain"})
    top = ma.fields.Integer(
        load_default=20, validate=ma.validate.Range(min=1, max=1000), strict=False,
        metadata={"description": "Domains listed, largest first; the rest are summed in other"})


class QueueShapeRowSchema(ma.Schema):
    domain = ma.fields.String(required=True)
    count = ma.fields.Integer(attribute="total", required=True)
    buckets = ma.fields.List(ma.fields.Integer(), required=True,
                             metadata={"description": "Counts per age bucket, as `buckets`"})


class QueueShapeTotalSchema(ma.Schema):
    count = ma.fields.Integer(attribute="total", required=True)
    buckets = ma.fields.List(ma.fields.Integer(), required=True)


class QueueShapeOtherSchema(QueueShapeTotalSchema):
    domains = ma.fields.Integer(required=True,
                                metadata={"description": "How many domains beyond the top"})


class QueueShapeSchema(ma.Schema):
    """Queued mail per domain and age bucket (docs/QUEUE_SHAPE.md)."""

    queue = ma.fields.String(required=True)
    by = ma.fields.String(required=True)
    counts = ma.fields.Method("_counts", required=True, metadata={
        "type": "string", "enum": ["recipients", "messages"],
        "description": "What a figure counts: recipients not yet delivered (by=domain) or "
                       "messages (by=sender_domain)"})
    as_of = Timestamp(required=True, metadata={
        "description": "The moment the figures are exact for; ages are whole minutes from "
                       "the arrival's minute to this one's"})
    buckets = ma.fields.Method("_buckets", required=True, metadata={
        "type": "array", "items": {"type": "string"}})
    total = ma.fields.Nested(QueueShapeTotalSchema, required=True)
    domains = ma.fields.List(ma.fields.Nested(QueueShapeRowSchema), attribute="rows",
                             required=True)
    other = ma.fields.Method("_other", required=True,
                             metadata={"type": "object", "properties": {
                                 "domains": {"type": "integer"}, "count": {"type": "integer"},
                                 "buckets": {"type": "array", "items": {"type": "integer"}}}})

    def _counts(self, shape: Any) -> str:
        return "recipients" if shape.by == "domain" else "messages"

    def _buckets(self, shape: Any) -> list[str]:
        return list(BUCKETS)

    def _other(self, shape: Any) -> dict[str, Any]:
        return {"domains": shape.other_domains, "count": shape.other.total,
                "buckets": shape.other.buckets}


# --------------------------------------------------------------------------- diagnosis
# "Why is it still here?" (docs/QUEUE_SHAPE.md). Names start with Diagnosis: flask-smorest's
# schema names are global, and the delivery control's own schemas hold Policy..., Rule....

class DiagnosisAttemptSchema(ma.Schema):
    timestamp = Timestamp(required=True)
    outcome = ma.fields.String(attribute="event_type", required=True,
                               metadata={"description": "delivery, tempfail or rejection"})
    smtp_code = ma.fields.Integer(allow_none=True)
    enhanced_code = ma.fields.String(allow_none=True)
    remote_host = ma.fields.String(attribute="delivery_host", allow_none=True)
    remote_ip = ma.fields.String(attribute="delivery_ip", allow_none=True)
    reply = ma.fields.String(attribute="message", allow_none=True)
    failure_class = ma.fields.String(allow_none=True, metadata={
        "description": "the class of a tempfail or rejection (API.md §17); null for a delivery"})


class DiagnosisLeaseSchema(ma.Schema):
    worker = ma.fields.String(required=True)
    expires_at = Timestamp(required=True)
    active = ma.fields.Boolean(required=True, metadata={
        "description": "false: the lease ran out (its worker died); the recipient is "
                       "claimable again"})


class DiagnosisPolicySchema(ma.Schema):
    id = ma.fields.Integer(required=True)
    kind = ma.fields.String(required=True)
    pattern = ma.fields.String(required=True)
    limit_key = ma.fields.String(required=True)
    description = ma.fields.String(required=True)


class DiagnosisBackoffSchema(ma.Schema):
    level = ma.fields.Integer(required=True)
    paused_until = Timestamp(allow_none=True)
    last_reply = ma.fields.String(required=True)
    throttles = ma.fields.Integer(required=True)


class DiagnosisRuleSchema(ma.Schema):
    id = ma.fields.Integer(required=True)
    action = ma.fields.String(required=True)
    sender = ma.fields.String(allow_none=True)
    recipient = ma.fields.String(allow_none=True)
    domain = ma.fields.String(allow_none=True)
    expires_at = Timestamp(required=True)


class DiagnosisSuppressionSchema(ma.Schema):
    reason = ma.fields.String(required=True)
    source = ma.fields.String(required=True)
    created_at = Timestamp(required=True)
    expires_at = Timestamp(allow_none=True)


class DiagnosisHoldSchema(ma.Schema):
    since = Timestamp(allow_none=True)
    reason = ma.fields.String(allow_none=True)


class DiagnosisRecipientSchema(ma.Schema):
    address = ma.fields.String(required=True)
    domain = ma.fields.String(required=True)
    status = ma.fields.String(required=True)
    attempts = ma.fields.List(ma.fields.Nested(DiagnosisAttemptSchema), required=True,
                              metadata={"description": "Oldest first"})
    last_error = ma.fields.String(allow_none=True)
    last_attempt_at = Timestamp(allow_none=True)
    next_attempt_at = Timestamp(allow_none=True)
    next_attempt_in = ma.fields.Integer(allow_none=True, metadata={
        "description": "Seconds until the next attempt (negative: overdue)"})
    planned_attempts = ma.fields.List(Timestamp(), required=True, metadata={
        "description": "The attempts left if each failed temporarily: the next one, then the "
                       "retry schedule without its jitter, the last at expires_at"})
    expires_at = Timestamp(required=True)
    lease = ma.fields.Nested(DiagnosisLeaseSchema, allow_none=True)
    policy = ma.fields.Nested(DiagnosisPolicySchema, allow_none=True)
    backoff = ma.fields.Nested(DiagnosisBackoffSchema, allow_none=True)
    rules = ma.fields.List(ma.fields.Nested(DiagnosisRuleSchema), required=True)
    suppressed = ma.fields.Nested(DiagnosisSuppressionSchema, allow_none=True)
    summary = ma.fields.String(required=True)


class DiagnosisSchema(ma.Schema):
    """Why a message is still queued, per recipient and in plain words."""

    id = ma.fields.Function(lambda d: d.message.id, required=True,
                            metadata={"type": "string"})
    queue = ma.fields.Function(lambda d: d.message.queue_state, required=True,
                               metadata={"type": "string"})
    created_at = ma.fields.Function(lambda d: isoformat_z(d.message.created_at), required=True,
                                    metadata={"type": "string", "format": "date-time"})
    as_of = Timestamp(required=True)
    expires_at = Timestamp(required=True)
    purge_at = Timestamp(allow_none=True, metadata={
        "description": "Failed messages: when the failed-mail retention removes it"})
    held = ma.fields.Nested(DiagnosisHoldSchema, allow_none=True)
    summary = ma.fields.String(required=True)
    recipients = ma.fields.List(ma.fields.Nested(DiagnosisRecipientSchema), required=True)
