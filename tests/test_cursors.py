"""The listings' cursors are hostile input: anything a client sends is a page or a 400.

A property test over any text, base64 of any bytes and base64 of any JSON (arrays of two
values included, the shape real cursors have), against both keyset listings that take one.
"""

from __future__ import annotations

import base64
import json
import logging

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.cursors import encode_cursor_payload
from tests.helpers import assert_error, queue_message

LISTINGS = ["/api/queue/deferred", "/api/queue/all", "/api/logs/messages"]

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


CURSORS = st.one_of(
    st.text(max_size=80),
    st.binary(max_size=120).map(b64),
    JSON.map(lambda value: b64(json.dumps(value).encode())),
    # Two values, as the real ones: timestamps, ids, numbers, nested values in either place.
    st.tuples(JSON | st.datetimes().map(lambda d: d.isoformat()),
              JSON | st.from_regex(r"msg-[A-Za-z0-9_-]{8,60}", fullmatch=True))
      .map(lambda pair: encode_cursor_payload(list(pair))),
    st.tuples(JSON, st.integers()).map(lambda pair: encode_cursor_payload(list(pair))),
)


@pytest.mark.parametrize("path", LISTINGS)
@pytest.mark.parametrize("cursor", [
    "WzUsICJtc2ctQUFBQUFBQUFBQUFBIl0",  # [5, "msg-AAAAAAAAAAAA"]: once a 500
    b64(b'[[1], "msg-AAAAAAAAAAAA"]'),
    b64(b'["2026-01-01T00:00:00Z", "msg-AAAAAAAAAAAA", 1]'),
    b64(b'["2026-01-01T00:00:00Z", "msg-AAAAAAAA\\n"]'),
    b64(b'["e1", true]'), b64(b'["e1", 1.0]'), b64(b'["e1", 0]'), b64(b"[" * 300 + b"]" * 300),
    "x" * 513,
])
def test_malformed_cursors_are_400_naming_the_cursor(client, session, caplog, path, cursor):
    queue_message(session, state="deferred")
    with caplog.at_level(logging.WARNING):
        response = client.get(path, query_string={"cursor": cursor})
    details = assert_error(response, 400, "VALIDATION_ERROR")["details"]
    assert list(details) == ["cursor"]
    # A client's bad cursor is not the server's error: no error record, no traceback.
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


@pytest.mark.parametrize("path", LISTINGS)
def test_any_cursor_is_a_page_or_a_400(client, session, caplog, path):
    queue_message(session, state="deferred")

    @given(cursor=CURSORS)
    @settings(max_examples=150, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture,
                                     HealthCheck.too_slow])
    def probe(cursor: str) -> None:
        response = client.get(path, query_string={"cursor": cursor})
        assert response.status_code in (200, 400), (cursor, response.get_data(as_text=True))
        if response.status_code == 400:
            assert response.get_json()["code"] == "VALIDATION_ERROR"

    with caplog.at_level(logging.WARNING):
        probe()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_a_real_cursor_still_pages(client, session):
    for _ in range(3):
        queue_message(session, state="deferred")
    first = client.get("/api/queue/deferred", query_string={"limit": 2})
    assert first.status_code == 200
    cursor = first.headers["Link"].split("cursor=")[1].split(">")[0].split("&")[0]
    second = client.get("/api/queue/deferred", query_string={"limit": 2, "cursor": cursor})
    assert second.status_code == 200
    assert len(second.get_json()) == 1
