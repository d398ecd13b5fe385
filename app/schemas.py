"""Marshmallow building blocks shared by every blueprint."""

from __future__ import annotations

import datetime as dt
from typing import Any

import marshmallow as ma

from .timeutil import isoformat_z, to_utc


class Timestamp(ma.fields.DateTime):
    """ISO 8601 UTC with a Z suffix, seconds precision; naive input is taken as UTC."""

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> str | None:
        return isoformat_z(value)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> dt.datetime:
        parsed = super()._deserialize(value, attr, data, **kwargs)
        try:
            return to_utc(parsed)
        except ValueError:
            raise self.make_error("invalid", input=value, obj_type=self.OBJ_TYPE) from None


class Limit(ma.fields.Integer):
    """``limit``: 1..1000, default 100."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("load_default", 100)
        kwargs.setdefault("validate", ma.validate.Range(min=1, max=1000))
        kwargs.setdefault("strict", False)
        kwargs.setdefault("metadata", {"description": "Page size, 1..1000"})
        super().__init__(**kwargs)


class StatusSchema(ma.Schema):
    """``{"status": "success", "message": "..."}``"""

    status = ma.fields.String(required=True)
    message = ma.fields.String(required=True)


class CountedStatusSchema(StatusSchema):
    count = ma.fields.Integer(required=True)
