"""Paging cursors: opaque to clients, exact round trips, and every foreign string refused."""

from __future__ import annotations

import base64
import datetime as dt
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.errors import ValidationFailed
from app.logs.service import decode_event_cursor, encode_event_cursor
from app.models import Message
from app.queue.reading import decode_cursor, encode_cursor

UTC = dt.UTC
ids = st.from_regex(r"msg-[A-Za-z0-9_-]{8,60}", fullmatch=True)
instants = st.datetimes(min_value=dt.datetime(2000, 1, 1), max_value=dt.datetime(2100, 1, 1),
                        timezones=st.just(UTC))


def b64(value: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


@given(message_id=ids, created=instants)
def test_queue_cursor_round_trip(message_id, created):
    cursor = encode_cursor(Message(id=message_id, created_at=created))
    assert "=" not in cursor and "/" not in cursor and "+" not in cursor  # URL-safe as it is
    assert decode_cursor(cursor) == (created, message_id)


@given(event_id=st.integers(1, 2**63 - 1))
def test_event_cursor_round_trip(event_id):
    assert decode_event_cursor(encode_event_cursor(event_id)) == event_id


QUEUE_CURSOR = b64(["2026-01-28T12:00:00+00:00", "msg-abcdefgh"])


@pytest.mark.parametrize("cursor", [
    "", "not a cursor", "!!!!", b64(["2026-01-28T12:00:00", "../../etc"]),
    b64(["yesterday", "msg-abcdefgh"]), b64(["2026-01-28T12:00:00", 5]), b64({"a": 1}),
    b64([1, 2, 3]), encode_event_cursor(5),
])
def test_queue_cursor_refuses_foreign_strings(cursor):
    with pytest.raises(ValidationFailed):
        decode_cursor(cursor)


@pytest.mark.parametrize("cursor", [
    "", "xyz", b64([99, 5]), b64([1, 0]), b64([1, -5]), b64([1, 2**63]), b64([1, "5"]),
    b64([1, 5.0]), b64([1, True]), QUEUE_CURSOR,
])
def test_event_cursor_refuses_foreign_strings(cursor):
    with pytest.raises(ValidationFailed):
        decode_event_cursor(cursor)
