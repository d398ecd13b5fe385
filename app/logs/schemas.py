"""Shapes of log records and message events (API.md §4), in and out."""

from __future__ import annotations

from typing import Any

import marshmallow as ma

from ..export import EXPORT_FORMATS, FORMAT_DESCRIPTION
from ..models import EVENT_TYPES
from ..schemas import Limit, Timestamp
from ..stats.classify import FAILURE_CLASSES
from .levels import ACCEPTED, levelno_of


class MessageEventSchema(ma.Schema):
    """One message delivery event (API.md §4.2 item)."""

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
    failure_class = ma.fields.String(allow_none=True, metadata={
        "description": "Why a tempfail or rejection failed (docs/STATS.md); null otherwise",
        "enum": [*FAILURE_CLASSES, None]})

    @ma.post_dump
    def _threats_never_null(self, data: dict[str, Any], **_kwargs: Any) -> dict[str, Any]:
        # Rows written set-based (demo data, bulk actions) may carry NULL: the contract says [].
        if data.get("threats") is None:
            data["threats"] = []
        return data


class SystemLogSchema(ma.Schema):
    """One system log record (API.md §4.1 item); ``level`` is debug|info|warn|error|fatal."""

    id = ma.fields.Integer(required=True)
    timestamp = Timestamp(required=True)
    level = ma.fields.String(required=True)
    logger = ma.fields.String(required=True)
    message = ma.fields.String(required=True)
    process = ma.fields.String(required=True, metadata={"description": "role:pid, e.g. api:1234"})


class MinimumLevel(ma.fields.String):
    """A level name or alias, any letter case, loaded as its level number."""

    # marshmallow types String as Field[str], output included; this one checks a string (and
    # stays a string in the OpenAPI document) but loads a level number.
    def _deserialize(  # type: ignore[override]
        self, value: Any, attr: str | None, data: Any, **kwargs: Any
    ) -> int:
        text = super()._deserialize(value, attr, data, **kwargs)
        try:
            return levelno_of(text)
        except ValueError:
            raise ma.ValidationError(f"Must be one of: {', '.join(ACCEPTED)}.") from None


class SystemLogQuerySchema(ma.Schema):
    level = MinimumLevel(metadata={"description": "Minimum severity: debug, info, warn (warning), "
                                                  "error, fatal (critical). Default: all.",
                                   "enum": list(ACCEPTED)})
    limit = Limit()


class SystemLogListSchema(ma.Schema):
    logs = ma.fields.List(ma.fields.Nested(SystemLogSchema), required=True)
    count = ma.fields.Integer(required=True, metadata={"description": "Number of items in logs"})


class EventType(ma.fields.String):
    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs).strip().lower()
        if text not in EVENT_TYPES:
            raise ma.ValidationError(f"Must be one of: {', '.join(EVENT_TYPES)}.")
        return text


class MessageEventQuerySchema(ma.Schema):
    event_type = EventType(metadata={"enum": list(EVENT_TYPES)})
    message_id = ma.fields.String(validate=ma.validate.Length(min=1, max=64),
                                  metadata={"description": "Exact message id"})
    recipient = ma.fields.String(validate=ma.validate.Length(min=1, max=320),
                                 metadata={"description": "Exact recipient address"})
    failure_class = ma.fields.String(validate=ma.validate.OneOf(FAILURE_CLASSES),
                                     metadata={"description": "Only failures of this class"})
    format = ma.fields.String(validate=ma.validate.OneOf(EXPORT_FORMATS),
                              metadata={"description": FORMAT_DESCRIPTION})
    limit = Limit()
    cursor = ma.fields.String(validate=ma.validate.Length(max=512),
                              metadata={"description": "Opaque cursor (next_cursor or the "
                                                       "Link header)"})


class MessageEventListSchema(ma.Schema):
    logs = ma.fields.List(ma.fields.Nested(MessageEventSchema), required=True)
    count = ma.fields.Integer(required=True, metadata={"description": "Number of items in logs"})
    next_cursor = ma.fields.String(allow_none=True, required=True,
                                   metadata={"description": "Cursor of the next (older) page; "
                                                            "null on the last page"})
