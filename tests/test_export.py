"""CSV and NDJSON exports of message events and queue listings (API.md §16), both databases.

An export is the whole listing under the same filters, in the listing's order, streamed over
its keyset pages: checked here against the JSON listing itself, across several pages.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json

import pytest
import sqlalchemy as sa

from app.models import DeliveryEvent
from app.timeutil import utcnow
from tests.delivery_helpers import bulk_queue
from tests.helpers import assert_error, queue_message

CSV = "text/csv; charset=utf-8"
NDJSON = "application/x-ndjson"


def add_events(session, count: int, **fields) -> None:
    now = utcnow()
    session.execute(sa.insert(DeliveryEvent), [
        {"timestamp": now - dt.timedelta(seconds=count - n), "event_type": "tempfail",
         "message_id": f"msg-exp{n:08d}", "recipient": f"r{n}@example.org", "threats": [],
         "message": "451 4.7.1 Greylisted", "failure_class": "policy", **fields}
        for n in range(count)])
    session.commit()


def all_pages(client, url: str, key: str | None = "logs") -> list[dict]:
    """The JSON listing followed through its Link headers (what an export must equal)."""
    items: list[dict] = []
    while url:
        response = client.get(url)
        body = response.get_json()
        items += body[key] if key else body
        link = response.headers.get("Link")
        url = link[1:link.index(">")] if link else ""
    return items


def rows_of(response) -> list[dict]:
    return list(csv.DictReader(io.StringIO(response.get_data(as_text=True))))


def test_event_export_is_every_page_of_the_listing(client, session) -> None:
    add_events(session, 1203)
    add_events(session, 5, event_type="delivery", failure_class=None, message="250 ok")
    listing = all_pages(client, "/api/logs/messages?event_type=tempfail&limit=1000")
    assert len(listing) == 1203
    nd = client.get("/api/logs/messages?event_type=tempfail&format=ndjson")
    assert nd.status_code == 200 and nd.headers["Content-Type"] == NDJSON
    assert nd.is_streamed
    lines = nd.get_data(as_text=True).splitlines()
    assert [json.loads(line) for line in lines] == listing
    as_csv = client.get("/api/logs/messages?event_type=tempfail", headers={"Accept": "text/csv"})
    assert as_csv.status_code == 200 and as_csv.headers["Content-Type"] == CSV
    assert "attachment" in as_csv.headers["Content-Disposition"]
    rows = rows_of(as_csv)
    assert [int(r["id"]) for r in rows] == [e["id"] for e in listing]
    assert rows[0]["failure_class"] == "policy" and rows[0]["threats"] == ""
    assert list(rows[0]) == list(listing[0])


def test_export_follows_every_filter(client, session) -> None:
    add_events(session, 30)
    add_events(session, 3, failure_class="spam", message="554 5.7.1 spam")
    spam = client.get("/api/logs/messages?failure_class=spam&format=csv")
    assert [r["failure_class"] for r in rows_of(spam)] == ["spam"] * 3
    one = client.get("/api/logs/messages?recipient=r1@example.org&format=ndjson")
    assert [json.loads(line)["recipient"] for line in one.get_data(as_text=True).splitlines()] \
        == ["r1@example.org", "r1@example.org"]
    empty = client.get("/api/logs/messages?message_id=msg-none0000&format=csv")
    assert empty.status_code == 200 and len(rows_of(empty)) == 0
    assert empty.get_data(as_text=True).startswith("id,timestamp,event_type")


def test_csv_cells_that_look_like_formulas_are_neutralised(client, session) -> None:
    for n, text in enumerate(["=HYPERLINK(\"http://evil\")", "+1+1", "-2", "@SUM(A1)",
                              "\tx", "plain = fine"]):
        session.add(DeliveryEvent(timestamp=utcnow(), event_type="system", threats=[],
                                  message_id=f"msg-inj{n:08d}", message=text,
                                  sender="=cmd@example.org"))
    session.commit()
    rows = rows_of(client.get("/api/logs/messages?event_type=system&format=csv"))
    assert [r["message"] for r in reversed(rows)] == [
        "'=HYPERLINK(\"http://evil\")", "'+1+1", "'-2", "'@SUM(A1)", "'\tx", "plain = fine"]
    assert {r["sender"] for r in rows} == {"'=cmd@example.org"}
    # NDJSON is data, not a spreadsheet: left as it is.
    nd = client.get("/api/logs/messages?event_type=system&format=ndjson")
    assert json.loads(nd.get_data(as_text=True).splitlines()[-1])["message"].startswith("=")


@pytest.mark.parametrize("accept, expected", [
    ("text/csv", CSV), ("application/x-ndjson", NDJSON),
    ("text/csv, application/json;q=0.5", CSV),
    ("application/json, text/csv;q=0.5", "application/json"),
    ("*/*", "application/json"), ("text/html,*/*;q=0.8", "application/json"),
])
def test_accept_header_chooses_the_format(client, accept, expected) -> None:
    response = client.get("/api/logs/messages", headers={"Accept": accept})
    assert response.status_code == 200 and response.headers["Content-Type"] == expected


def test_format_parameter_wins_over_accept_and_is_validated(client) -> None:
    response = client.get("/api/logs/messages?format=json", headers={"Accept": "text/csv"})
    assert response.headers["Content-Type"] == "application/json"
    body = assert_error(client.get("/api/logs/messages?format=xml"), 400, "VALIDATION_ERROR")
    assert "format" in body["details"]
    body = assert_error(client.get("/api/queue/pending?format=xls"), 400, "VALIDATION_ERROR")
    assert "format" in body["details"]
    assert_error(client.get("/api/queue/nope?format=csv"), 400, "VALIDATION_ERROR")
    assert_error(client.get("/api/logs/messages?format=csv&cursor=bogus"), 400,
                 "VALIDATION_ERROR")
    assert_error(client.get("/api/queue/all?format=ndjson&cursor=bogus"), 400,
                 "VALIDATION_ERROR")


def test_queue_export_is_every_page_of_the_listing(app, client, session) -> None:
    bulk_queue(app, 1105)
    listing = all_pages(client, "/api/queue/pending?limit=1000", key=None)
    assert len(listing) == 1105
    response = client.get("/api/queue/pending?format=ndjson")
    assert response.headers["X-Total-Count"] == "1105"
    assert [json.loads(line) for line in response.get_data(as_text=True).splitlines()] == listing
    rows = rows_of(client.get("/api/queue/all", headers={"Accept": "text/csv"}))
    assert [r["id"] for r in rows] == [m["id"] for m in listing]
    assert list(rows[0]) == ["id", "queue", "from", "to", "subject", "size", "priority",
                             "attempts", "created_at", "updated_at", "next_attempt_at",
                             "last_error"]


def test_queue_export_follows_the_filters(client, session) -> None:
    queue_message(session, sender="alice@example.com", recipients=("a@one.example",
                                                                   "b@two.example"))
    queue_message(session, sender="bob@example.com", recipients=("c@two.example",),
                  state="deferred")
    queue_message(session, sender="carol@example.com", recipients=("d@one.example",))
    response = client.get("/api/queue/all?domain=two.example&format=csv")
    rows = rows_of(response)
    assert response.headers["X-Total-Count"] == "2"
    assert [r["from"] for r in rows] == ["alice@example.com", "bob@example.com"]
    assert rows[0]["to"] == "a@one.example, b@two.example"
    deferred = rows_of(client.get("/api/queue/deferred?format=csv&sender=BOB"))
    assert [(r["from"], r["queue"], r["last_error"]) for r in deferred] == [
        ("bob@example.com", "deferred", "451 try later")]
