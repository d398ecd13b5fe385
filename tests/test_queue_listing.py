"""Listing the queue: order, keyset paging, headers and filters."""

from __future__ import annotations

import datetime as dt
from urllib.parse import parse_qs, urlsplit

import pytest

from app.timeutil import utcnow
from tests.helpers import assert_error, queue_message


def _next_url(response) -> str | None:
    link = response.headers.get("Link")
    if not link:
        return None
    url = link.split(";")[0].strip("<>")
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}"


def test_listing_is_oldest_first_with_message_objects(client, session):
    base = utcnow() - dt.timedelta(hours=1)
    ids = [queue_message(session, subject=f"n{i}", created_at=base + dt.timedelta(minutes=i))
           for i in range(3)]
    response = client.get("/api/queue/pending")
    assert response.status_code == 200
    assert response.headers["X-Total-Count"] == "3"
    assert "Link" not in response.headers
    body = response.get_json()
    assert [m["id"] for m in body] == ids
    first = body[0]
    assert set(first) == {"id", "queue", "from", "to", "subject", "size", "priority", "attempts",
                          "created_at", "updated_at", "next_attempt_at", "last_error"}
    assert first["queue"] == "pending" and first["from"] == "alice@example.com"
    assert first["to"] == ["bob@example.net"] and first["subject"] == "n0"
    assert first["created_at"].endswith("Z") and len(first["created_at"]) == 20
    assert first["last_error"] is None


def test_empty_queue_is_an_empty_array(client):
    response = client.get("/api/queue/held")
    assert response.get_json() == []
    assert response.headers["X-Total-Count"] == "0"


def test_paging_neither_skips_nor_repeats_while_messages_arrive(client, session):
    base = utcnow() - dt.timedelta(hours=2)
    expected = [
        queue_message(
            session,
            created_at=base +
            dt.timedelta(
                seconds=i)) for i in range(25)]
    seen: list[str] = []
    url: str | None = "/api/queue/all?limit=10"
    pages = 0
    while url:
        response = client.get(url)
        assert response.status_code == 200
        seen += [m["id"] for m in response.get_json()]
        # New mail arrives between pages; it is newer, so it shows up at the end, once.
        expected.append(queue_message(session))
        url = _next_url(response)
        pages += 1
        assert pages < 20
    assert seen == expected[: len(seen)]
    assert len(seen) == len(set(seen))
    assert set(expected[:25]) <= set(seen)


def test_link_keeps_the_filters(client, session):
    for _ in range(3):
        queue_message(session, recipients=("x@example.org",))
    response = client.get("/api/queue/pending?limit=2&domain=example.org")
    query = parse_qs(urlsplit(response.headers["Link"].split(";")[0].strip("<>")).query)
    assert query["domain"] == ["example.org"] and query["limit"] == ["2"] and query["cursor"]
    assert response.headers["Link"].endswith('rel="next"')
    assert response.headers["X-Total-Count"] == "3"


def test_filters_combine_with_and(client, session):
    now = utcnow()
    old = queue_message(session, sender="Alice@Example.com", recipients=("bob@example.net",),
                        created_at=now - dt.timedelta(days=2))
    new = queue_message(session, sender="alice@example.com",
                        recipients=("carol@shop.example", "dave@example.net"))
    other = queue_message(session, sender="zed@elsewhere.example", recipients=("BOB@Example.NET",),
                          state="deferred")

    def ids(query: str) -> set[str]:
        response = client.get(f"/api/queue/all?{query}")
        assert response.status_code == 200, response.get_json()
        assert response.headers["X-Total-Count"] == str(len(response.get_json()))
        return {m["id"] for m in response.get_json()}

    assert ids("sender=ALICE") == {old, new}
    assert ids("recipient=bob@") == {old, other}
    assert ids("domain=example.net") == {old, new, other}
    assert ids("domain=EXAMPLE.NET&sender=alice") == {old, new}
    assert ids("domain=example.net&sender=zed") == {other}
    assert ids("domain=example") == set()  # exact domain, not a substring
    cutoff = (now - dt.timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert ids(f"before={cutoff}") == {old}
    assert ids(f"after={cutoff}") == {new, other}
    assert ids("sender=%25") == set()  # LIKE wildcards are literal
    assert ids("sender=_") == set()
    assert {m["id"] for m in client.get("/api/queue/deferred?recipient=bob").get_json()} == {other}


def test_unknown_query_parameters_are_ignored(client, session):
    queue_message(session)
    response = client.get("/api/queue/all?colour=blue&limit=5")
    assert response.status_code == 200 and len(response.get_json()) == 1


@pytest.mark.parametrize("query,field", [
    ("limit=0", "limit"), ("limit=1001", "limit"), ("limit=ten", "limit"),
    ("before=yesterday", "before"), ("after=2026-13-45", "after"),
    ("cursor=not-a-cursor", "cursor"), ("cursor=WyJ4Il0", "cursor"),
])
def test_bad_listing_parameters_are_400(client, query, field):
    body = assert_error(client.get(f"/api/queue/all?{query}"), 400, "VALIDATION_ERROR")
    assert field in body["details"]


def test_unknown_queue_type_is_400(client):
    body = assert_error(client.get("/api/queue/bogus"), 400, "VALIDATION_ERROR")
    assert "type" in body["details"]


def test_detail_has_recipients_headers_content_and_timeline(client, session):
    message_id = queue_message(session, recipients=("bob@example.net", "carol@example.org"),
                               subject="Quarterly =?utf-8?q?r=C3=A9sum=C3=A9?=")
    client.post(f"/api/queue/message/{message_id}/hold")
    body = client.get(f"/api/queue/message/{message_id}").get_json()
    assert body["id"] == message_id and body["queue"] == "held"
    assert [r["address"] for r in body["recipients"]] == ["bob@example.net", "carol@example.org"]
    assert set(body["recipients"][0]) == {"address", "status", "attempts", "last_error",
                                          "last_attempt_at", "next_attempt_at"}
    names = [name for name, _ in body["headers"]]
    assert names[:3] == ["From", "To", "Subject"]
    assert ["Subject", "Quarterly résumé"] in body["headers"]
    assert "Hi there." in body["content"]
    assert [e["event_type"] for e in body["events"]] == ["system", "reception"]  # newest first
    assert body["events"][1]["message_id"] == message_id
    assert body["events"][0]["threats"] == []


def test_raw_format_is_the_message_itself(client, session):
    message_id = queue_message(session, subject="Raw please")
    response = client.get(f"/api/queue/message/{message_id}?format=raw")
    assert response.status_code == 200
    assert response.mimetype == "message/rfc822"
    assert b"Subject: Raw please" in response.data
    assert_error(client.get(f"/api/queue/message/{message_id}?format=xml"), 400, "VALIDATION_ERROR")


def test_links_are_relative_whatever_host_the_client_names(client, session):
    """Never built from Host or X-Forwarded-*: a client could point them at any host."""
    for _ in range(3):
        queue_message(session)
    for headers in ({}, {"Host": "evil.example"},
                    {"X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "https"}):
        link = client.get("/api/queue/pending?limit=1", headers=headers).headers["Link"]
        assert link.startswith("</api/queue/pending?limit=1&cursor="), link
    link = client.get("/api/logs/messages?limit=1").headers["Link"]
    assert link.startswith("</api/logs/messages?limit=1&cursor="), link


def test_links_are_absolute_on_the_configured_public_url(make_app, session):
    app = make_app(public_url="https://mail.example.com/elemta/")
    for _ in range(3):
        queue_message(session)
    link = app.test_client().get("/api/queue/pending?limit=1",
                                 headers={"Host": "evil.example"}).headers["Link"]
    assert link.startswith("<https://mail.example.com/elemta/api/queue/pending?limit=1&cursor=")


@pytest.mark.parametrize("value", ["mail.example.com", "ftp://mail.example.com",
                                   "https://mail.example.com/?x=1", "https://u@mail.example.com"])
def test_a_public_url_that_is_not_one_stops_the_start(make_app, value):
    from app.config import ConfigError

    with pytest.raises(ConfigError):
        make_app(public_url=value)
