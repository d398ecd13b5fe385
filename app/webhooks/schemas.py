"""``/api/webhooks`` request and response schemas. The secret is dumped only where it is new."""

from __future__ import annotations

from typing import Any

import marshmallow as ma

from ..models import WEBHOOK_EVENT_TYPES
from ..schemas import Limit, Timestamp
from .service import (
    DELIVERY_STATES,
    MAX_DESCRIPTION_LENGTH,
    MAX_SECRET_LENGTH,
    MAX_URL_LENGTH,
    MIN_SECRET_LENGTH,
)

_TYPES_DOC = ("Event types to receive: " + ", ".join(WEBHOOK_EVENT_TYPES)
              + " (docs/WEBHOOKS.md)")


class EventTypes(ma.fields.List):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(ma.fields.String(validate=ma.validate.OneOf(WEBHOOK_EVENT_TYPES)),
                         validate=ma.validate.Length(min=1, max=len(WEBHOOK_EVENT_TYPES) * 2),
                         metadata={"description": _TYPES_DOC,
                                   "example": ["delivered", "failed"]},
                         **kwargs)


class WebhookCreateSchema(ma.Schema):
    """``POST /api/webhooks`` body."""

    url = ma.fields.String(required=True, validate=ma.validate.Length(min=1, max=MAX_URL_LENGTH),
                           metadata={"description": "http:// or https:// URL of the receiver "
                                                    "(no credentials, no #fragment)",
                                     "example": "https://hooks.example.com/elemta"})
    event_types = EventTypes(required=True)
    description = ma.fields.String(load_default="",
                                   validate=ma.validate.Length(max=MAX_DESCRIPTION_LENGTH))
    secret = ma.fields.String(
        load_default=None, validate=ma.validate.Length(min=MIN_SECRET_LENGTH,
                                                       max=MAX_SECRET_LENGTH),
        metadata={"description": "The signing secret; generated (whsec_...) when left out. "
                                 "Shown in this response only."})
    active = ma.fields.Boolean(load_default=True)


class WebhookUpdateSchema(ma.Schema):
    """``PATCH /api/webhooks/{id}`` body: only what changes."""

    url = ma.fields.String(validate=ma.validate.Length(min=1, max=MAX_URL_LENGTH))
    event_types = EventTypes()
    description = ma.fields.String(validate=ma.validate.Length(max=MAX_DESCRIPTION_LENGTH))
    active = ma.fields.Boolean(metadata={"description": "false pauses sending; back to true, "
                                                        "the webhook receives events from then on"})
    secret = ma.fields.String(validate=ma.validate.Length(min=MIN_SECRET_LENGTH,
                                                          max=MAX_SECRET_LENGTH))
    rotate_secret = ma.fields.Boolean(
        load_default=False, metadata={"description": "Generate a new secret (shown once)"})


class WebhookSchema(ma.Schema):
    """A webhook, never its secret."""

    id = ma.fields.Integer(required=True)
    url = ma.fields.String(required=True)
    event_types = ma.fields.List(ma.fields.String(), required=True,
                                 metadata={"items": {"enum": list(WEBHOOK_EVENT_TYPES)}})
    description = ma.fields.String(required=True)
    active = ma.fields.Boolean(required=True)
    created_at = Timestamp(required=True)
    updated_at = Timestamp(required=True)


class WebhookWithSecretSchema(WebhookSchema):
    """A webhook just created (or whose secret was just replaced): the secret, this once."""

    secret = ma.fields.String(required=True, allow_none=True, metadata={
        "description": "The signing secret: store it now, it is never shown again "
                       "(null when it did not change)"})


class WebhookAttemptSchema(ma.Schema):
    attempted_at = Timestamp(required=True)
    status_code = ma.fields.Integer(required=True, allow_none=True,
                                    metadata={"description": "null: no HTTP answer"})
    error = ma.fields.String(required=True, allow_none=True)
    duration_ms = ma.fields.Integer(required=True)
    response_excerpt = ma.fields.String(required=True, allow_none=True,
                                        metadata={"description": "First 512 characters"})


class WebhookDeliverySchema(ma.Schema):
    """One event sent to one webhook: its state and every attempt, oldest first."""

    id = ma.fields.Integer(required=True, metadata={
        "description": "The delivery number n of .../deliveries/{n}/redeliver"})
    event_id = ma.fields.Function(lambda d: f"evt_{d.event_id}", required=True,
                                  metadata={"type": "string",
                                            "description": "Elemta-Event-Id"})
    event_type = ma.fields.String(required=True)
    message_id = ma.fields.String(required=True, allow_none=True)
    status = ma.fields.String(required=True, metadata={"enum": list(DELIVERY_STATES)})
    attempts = ma.fields.Integer(required=True)
    created_at = Timestamp(required=True)
    next_attempt_at = Timestamp(required=True, allow_none=True)
    retry_until = Timestamp(required=True)
    delivered_at = Timestamp(required=True, allow_none=True)
    last_status_code = ma.fields.Integer(required=True, allow_none=True)
    last_error = ma.fields.String(required=True, allow_none=True)
    payload = ma.fields.Raw(required=True, metadata={"type": "string",
                                                     "description": "The exact body sent"})
    attempt_log = ma.fields.List(ma.fields.Nested(WebhookAttemptSchema), required=True,
                                 data_key="attempt_log")


class DeliveryQuerySchema(ma.Schema):
    status = ma.fields.String(validate=ma.validate.OneOf(DELIVERY_STATES))
    message_id = ma.fields.String(validate=ma.validate.Length(min=1, max=64))
    limit = Limit()
    cursor = ma.fields.String(validate=ma.validate.Length(max=512),
                              metadata={"description": "Opaque cursor (next_cursor or the "
                                                       "Link header)"})


class DeliveryListSchema(ma.Schema):
    deliveries = ma.fields.List(ma.fields.Nested(WebhookDeliverySchema), required=True)
    count = ma.fields.Integer(required=True)
    next_cursor = ma.fields.String(required=True, allow_none=True,
                                   metadata={"description": "Cursor of the next (older) page; "
                                                            "null on the last page"})
