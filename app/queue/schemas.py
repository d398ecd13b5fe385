"""Queue request and response schemas (SPEC 2)."""

from __future__ import annotations

from typing import Any

import marshmallow as ma

from ..dkim.signing import signatures_of
from ..logs.schemas import MessageEventSchema
from ..schemas import Limit, Timestamp
from .content import headers_of, text_of


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
    limit = Limit()
    cursor = ma.fields.String(validate=ma.validate.Length(max=512),
                              metadata={"description": "Opaque cursor from the Link header"})


class BulkQuerySchema(FilterQuerySchema):
    dry_run = ma.fields.Boolean(
        load_default=False,
        metadata={"description": "Count what would be affected, change nothing"})


class DetailQuerySchema(ma.Schema):
    format = ma.fields.String(validate=ma.validate.OneOf(["json", "raw"]), load_default="json")


class QueueStatsSchema(ma.Schema):
    pending = ma.fields.Integer(required=True)
    deferred = ma.fields.Integer(required=True)
    held = ma.fields.Integer(required=True)
    failed = ma.fields.Integer(required=True)
    total = ma.fields.Integer(required=True)


class MessageSchema(ma.Schema):
    """A queued message (SPEC 2.1)."""

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
