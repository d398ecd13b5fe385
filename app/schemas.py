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


class IntegerCountsSchema(ma.Schema):
    """A response schema of plain ``Integer`` fields (counts), dumped without marshmallow's
    per-field machinery when it can be: a dict in, ``int()`` of each value out (None stays
    None, an absent key is left out), exactly what ``Schema.dump`` gives for such a schema
    (tests/test_schemas_counts.py). Anything else (``many``, another type of object, a
    schema with other fields, hooks, ``only``/``exclude``) takes marshmallow's own path. The
    schema, its name and fields are unchanged for the OpenAPI document. ``/api/queue/stats``
    dumps one on every request (docs/PERFORMANCE.md).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # (_hooks is a defaultdict that marshmallow's dump fills with empty lists.)
        plain = (not any(self._hooks.values())
                 and type(self).get_attribute is ma.Schema.get_attribute
                 and all(type(field) is ma.fields.Integer and not field.as_string
                         and field.dump_default is ma.missing
                         and "." not in (field.attribute or name)
                         for name, field in self.dump_fields.items()))
        self.counts: tuple[tuple[str, str], ...] | None = tuple(
            (field.data_key or name, field.attribute or name)
            for name, field in self.dump_fields.items()) if plain else None

    def dump(self, obj: Any, *, many: bool | None = None) -> Any:
        counts = self.counts
        if counts is None or type(obj) is not dict or (self.many if many is None else many):
            return super().dump(obj, many=many)
        return {key: None if (value := obj[attribute]) is None else int(value)
                for key, attribute in counts if attribute in obj}
