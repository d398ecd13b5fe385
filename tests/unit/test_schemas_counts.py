"""app/schemas.py IntegerCountsSchema: its dump is marshmallow's own, without the machinery."""

from __future__ import annotations

import decimal

import marshmallow as ma
import pytest

from app.queue.schemas import QueueStatsSchema
from app.schemas import IntegerCountsSchema


class Renamed(IntegerCountsSchema):
    a = ma.fields.Integer(data_key="A")
    b = ma.fields.Integer(attribute="bee")


class WithString(IntegerCountsSchema):
    a = ma.fields.Integer()
    s = ma.fields.String()


class AsString(IntegerCountsSchema):
    a = ma.fields.Integer(as_string=True)


class WithDefault(IntegerCountsSchema):
    a = ma.fields.Integer(dump_default=7)


@pytest.mark.parametrize("schema,obj", [
    (QueueStatsSchema(), {"pending": 1, "deferred": 0, "held": 2, "failed": 3, "total": 6}),
    (QueueStatsSchema(), {"pending": decimal.Decimal(4), "held": None, "extra": 9,
                          "failed": 2.0, "total": True}),
    (QueueStatsSchema(), {}),
    (Renamed(), {"a": 1, "bee": "2"}),
    (Renamed(), {"b": 1}),
    (WithString(), {"a": 1, "s": "x"}),
    (AsString(), {"a": 5}),
    (WithDefault(), {}),
])
def test_the_dump_is_marshmallows(schema, obj) -> None:
    expected = ma.Schema.dump(schema, obj)
    assert schema.dump(obj) == expected
    assert list(schema.dump(obj)) == list(expected)  # the same keys in the same order


def test_only_plain_integer_schemas_take_the_short_path() -> None:
    assert QueueStatsSchema().counts is not None and Renamed().counts is not None
    for schema in (WithString(), AsString(), WithDefault(), QueueStatsSchema(only=("total",))):
        if schema.counts is not None:  # only= narrows the fields: still plain, and honoured
            assert schema.dump({"total": 1, "held": 2}) == {"total": 1}
        else:
            assert schema.counts is None
    many = QueueStatsSchema(many=True)
    assert many.dump([{"total": 1}]) == [{"total": 1}]
    assert QueueStatsSchema().dump([{"total": 1}], many=True) == [{"total": 1}]
