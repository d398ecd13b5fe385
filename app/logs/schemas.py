"""Shapes of log records and message events (SPEC 4)."""

from __future__ import annotations

import marshmallow as ma

from ..schemas import Timestamp


class MessageEventSchema(ma.Schema):
    """One message delivery event (SPEC 4.2 item)."""

    id = ma.fields.Integer(required=True)
    timestamp = Timestamp(required=True)
    event_type = ma.fields.String(required=True)
    message_id = ma.fields.String(allow_none=True)
    sender = ma.fields.String(allow_none=True)
    recipient = ma.fields.String(allow_none=True)
    delivery_ip = ma.fields.String(allow_none=True)
    delivery_host = ma.fields.String(allow_none=True)
    smtp_code = ma.fields.Integer(allow_none=True)
    spam_score = ma.fields.Float(allow_none=True)
    threats = ma.fields.List(ma.fields.Raw(), required=True)
    message = ma.fields.String(allow_none=True)
