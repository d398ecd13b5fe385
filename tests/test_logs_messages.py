"""GET /api/logs/messages (API.md §4.2): filters, item shape, keyset paging, bad input."""

from __future__ import annotations

import base64
import json
from urllib.parse import parse_qs, urlsplit

import pytest
import sqlalchemy as sa

from app.events import record_event
from app.models import DeliveryEvent
from app.timeutil import utcnow

from .conftest import plan_of
from .helpers import assert_error

ITEM_KEYS = {"id", "timestamp", "event_type", "message_id", "sender", "recipient", "delivery_ip",
             "delivery_host", "smtp_code", "spam_score", "threats", "message", "failure_class"}


def add_events(session, count: int, **fields) -> list[int]:
    events = []
    for number in range(count):
        values = {"message_id": f"msg-{number % 3}", "recipient": f"r{number % 2}@example.net",
                  "sender": "alice@example.com", "message": f"event {number}"}
        values.update(fields)
        event_type = values.pop("event_type", ("reception", "delivery", "tempfail")[number % 3])
        events.append(record_event(session, event_type, **values))
    session.commit()
    return [event.id for event in events]


def next_cursor_from_link(response) -> str | None:
    link = response.headers.get("Link")
    if not link:
        return None
    url = link.split(";")[0].strip("<> ")
    return parse_qs(urlsplit(url).query)["cursor"][0]


def test_newest_first_with_the_item_shape(client, session):
    ids = add_events(session, 4)
    record_event(session, "delivery", message_id="msg-x", sender="a@example.com",
                 recipient="b@example.net", delivery_ip="192.0.2.7", delivery_host="mx.example.net",
                 smtp_code=250, message="250 2.0.0 OK")
    record_event(session, "rejection", message_id=None, sender="spam@example.org",
                 recipient="c@example.net", spam_score=9.5, threats=["EICAR-Test"],
                 message="554 rejected")
    session.commit()

    body = client.get("/api/logs/messages").get_json()
    assert set(body) == {"logs", "count", "next_cursor"}
    assert body["count"] == len(body["logs"]) == 6
    assert body["next_cursor"] is None
    got = [item["id"] for item in body["logs"]]
    assert got == sorted(got, reverse=True) and set(ids) < set(got)
    rejected, delivered = body["logs"][0], body["logs"][1]
    assert all(set(item) == ITEM_KEYS for item in body["logs"])
    assert rejected["spam_score"] == 9.5 and rejected["threats"] == ["EICAR-Test"]
    assert rejected["message_id"] is None and rejected["delivery_ip"] is None
    assert delivered["delivery_ip"] == "192.0.2.7" and delivered["smtp_code"] == 250
    assert delivered["delivery_host"] == "mx.example.net" and delivered["threats"] == []
    assert delivered["spam_score"] is None
    assert delivered["timestamp"].endswith("Z") and len(delivered["timestamp"]) == 20


def test_null_threats_are_an_empty_list(client, session):
    session.execute(sa.insert(DeliveryEvent), [{"timestamp": utcnow(), "event_type": "system",
                                                "message_id": "msg-a", "threats": None}])
    session.commit()
    [item] = client.get("/api/logs/messages").get_json()["logs"]
    assert item["threats"] == []


@pytest.mark.parametrize("query, expected", [
    ("event_type=delivery", lambda e: e.event_type == "delivery"),
    ("event_type=TEMPFAIL", lambda e: e.event_type == "tempfail"),
    ("message_id=msg-1", lambda e: e.message_id == "msg-1"),
    ("recipient=r0@example.net", lambda e: e.recipient == "r0@example.net"),
    ("event_type=reception&recipient=r1@example.net",
     lambda e: e.event_type == "reception" and e.recipient == "r1@example.net"),
    ("message_id=msg-2&event_type=tempfail", lambda e: e.message_id == "msg-2"
     and e.event_type == "tempfail"),
    ("event_type=system", lambda e: False),
    ("recipient=R0@example.net", lambda e: False),  # exact match (documented)
])
def test_filters(client, session, query, expected):
    add_events(session, 12)
    events = session.scalars(sa.select(DeliveryEvent).order_by(DeliveryEvent.id.desc())).all()
    want = [e.id for e in events if expected(e)]
    body = client.get(f"/api/logs/messages?{query}&unknown=ignored").get_json()
    assert [item["id"] for item in body["logs"]] == want
    assert body["count"] == len(want)


def test_paging_has_no_gap_or_repeat_while_events_arrive(client, session):
    original = add_events(session, 23)
    seen: list[int] = []
    url = "/api/logs/messages?limit=5"
    pages = 0
    while url:
        response = client.get(url)
        assert response.status_code == 200
        body = response.get_json()
        seen += [item["id"] for item in body["logs"]]
        pages += 1
        # New events keep arriving between pages; they are newer than the first page.
        add_events(session, 2)
        cursor = next_cursor_from_link(response)
        assert cursor == body["next_cursor"]
        if cursor:
            link_url = response.headers["Link"].split(";")[0].strip("<>")
            assert "limit=5" in link_url
            url = f"/api/logs/messages?limit=5&cursor={cursor}"
        else:
            url = ""
    assert pages == 5
    assert seen == sorted(original, reverse=True)


def test_paging_keeps_the_filter(client, session):
    add_events(session, 30)
    want = session.scalars(sa.select(DeliveryEvent.id).where(DeliveryEvent.event_type == "delivery")
                           .order_by(DeliveryEvent.id.desc())).all()
    seen, cursor = [], None
    while True:
        query = "event_type=delivery&limit=3" + (f"&cursor={cursor}" if cursor else "")
        body = client.get(f"/api/logs/messages?{query}").get_json()
        assert all(item["event_type"] == "delivery" for item in body["logs"])
        seen += [item["id"] for item in body["logs"]]
        cursor = body["next_cursor"]
        if not cursor:
            break
    assert seen == list(want)


def test_exact_page_end_has_no_next(client, session):
    add_events(session, 4)
    response = client.get("/api/logs/messages?limit=4")
    assert response.get_json()["next_cursor"] is None and "Link" not in response.headers
    response = client.get("/api/logs/messages?limit=3")
    assert response.get_json()["next_cursor"] and "Link" in response.headers


def _cursor(payload) -> str:
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")


@pytest.mark.parametrize("query, field", [
    ("event_type=bogus", "event_type"),
    ("event_type=", "event_type"),
    ("limit=0", "limit"),
    ("limit=1001", "limit"),
    ("limit=ten", "limit"),
    ("cursor=not-a-cursor", "cursor"),
    (f"cursor={_cursor(['e1', -5])}", "cursor"),
    (f"cursor={_cursor(['e1', 'x'])}", "cursor"),
    (f"cursor={_cursor(['2026-01-01T00:00:00', 'msg-abc'])}", "cursor"),  # a queue cursor
    ("message_id=", "message_id"),
])
def test_bad_parameters_are_400(client, session, query, field):
    add_events(session, 2)
    body = assert_error(client.get(f"/api/logs/messages?{query}"), 400, "VALIDATION_ERROR")
    assert field in body["details"]


def test_limits_accepted_at_the_bounds(client, session):
    add_events(session, 3)
    assert client.get("/api/logs/messages?limit=1").get_json()["count"] == 1
    assert client.get("/api/logs/messages?limit=1000").get_json()["count"] == 3


# ------------------------------------------------------------------ the event_type read path

def _naive_page(session, *, limit, event_type=None, message_id=None, recipient=None,
                before_id=None) -> list[int]:
    """The page as the plain ``WHERE ... ORDER BY id DESC LIMIT`` query gives it."""
    query = sa.select(DeliveryEvent.id).order_by(DeliveryEvent.id.desc()).limit(limit)
    if event_type:
        query = query.where(DeliveryEvent.event_type == event_type)
    if message_id:
        query = query.where(DeliveryEvent.message_id == message_id)
    if recipient:
        query = query.where(DeliveryEvent.recipient == recipient)
    if before_id:
        query = query.where(DeliveryEvent.id < before_id)
    return list(session.scalars(query))


@pytest.mark.parametrize("filters", [
    {"event_type": "delivery"},
    {"event_type": "rejection"},
    {"event_type": "delivery", "message_id": "msg-1"},
    {"event_type": "tempfail", "recipient": "r2@example.net"},
    {"event_type": "delivery", "message_id": "msg-4", "recipient": "r1@example.net"},
    {"event_type": "system", "message_id": "msg-0"},
    {"message_id": "msg-3"},
    {},
])
@pytest.mark.parametrize("limit", [1, 4, 7])
def test_filters_and_cursor_give_the_rows_of_the_plain_query(client, session, filters, limit):
    # Types, message ids and recipients cycle with co-prime periods, so every combination
    # occurs, interleaved; pages are followed to the end by cursor.
    types = ("reception", "delivery", "delivery", "tempfail", "rejection", "delivery", "system")
    rows = [{"timestamp": utcnow(), "event_type": types[n % 7], "message_id": f"msg-{n % 5}",
             "recipient": f"r{n % 3}@example.net", "message": f"event {n}", "threats": []}
            for n in range(140)]
    session.execute(sa.insert(DeliveryEvent), rows)
    session.commit()

    cursor, before_id, pages, seen = None, None, 0, []
    while True:
        query = "&".join([f"limit={limit}"] + [f"{k}={v}" for k, v in filters.items()]
                         + ([f"cursor={cursor}"] if cursor else []))
        body = client.get(f"/api/logs/messages?{query}").get_json()
        want = _naive_page(session, limit=limit, before_id=before_id, **filters)
        got = [item["id"] for item in body["logs"]]
        assert got == want, (query, pages)
        seen += got
        for item in body["logs"]:
            assert all(item[key] == value for key, value in filters.items())
        pages += 1
        cursor = body["next_cursor"]
        if not cursor:
            break
        assert len(got) == limit
        before_id = got[-1]
    assert seen == _naive_page(session, limit=len(rows), **filters)


def test_event_type_page_reads_ids_from_the_type_index_on_postgresql(client, session):
    # The shape of the 10 M-event benchmark in small: older history of mixed outcomes, then
    # a stretch of receptions (newly queued mail) holding no delivery. A plain
    # ``WHERE event_type = 'delivery' ORDER BY id DESC LIMIT n`` made PostgreSQL walk the
    # primary key backwards through every reception; the count of rows the plan throws away
    # shows it without timing anything.
    if session.get_bind().dialect.name != "postgresql":
        pytest.skip("a PostgreSQL planner choice")
    session.execute(sa.text(
        "INSERT INTO delivery_events (timestamp, event_type, message_id, recipient, message, "
        "threats) SELECT now(), (ARRAY['delivery', 'delivery', 'tempfail', 'rejection'])"
        "[1 + g % 4], 'msg-' || g, 'r@example.net', repeat('x', 80), '[]' "
        "FROM generate_series(1, 60000) AS g"))
    session.execute(sa.text(
        "INSERT INTO delivery_events (timestamp, event_type, message_id, recipient, message, "
        "threats) SELECT now(), 'reception', 'msg-r' || g, 'r@example.net', repeat('x', 80), "
        "'[]' FROM generate_series(1, 20000) AS g"))
    session.commit()
    engine = session.get_bind()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM (ANALYZE) delivery_events")

    url = "/api/logs/messages?event_type=delivery&limit=100"
    body = client.get(url).get_json()
    assert body["count"] == 100 and all(i["event_type"] == "delivery" for i in body["logs"])
    every = plan_of(client, session, url, "FROM delivery_events")
    plan = every[0]
    assert sum(n.get("Rows Removed by Filter", 0) for n in every) == 0, plan
    assert any(n.get("Index Name") == "ix_delivery_events_type_id" for n in every), plan
