"""POST /api/send-test (API.md §6): strict validation, a well-formed message, queued pending."""

from __future__ import annotations

import email
import email.policy

import pytest
import sqlalchemy as sa

from app.mail.addresses import LINE_BREAKS
from app.models import DeliveryEvent, Message, Recipient
from tests.helpers import assert_error


def _count(session, model) -> int:
    session.expire_all()
    return session.scalar(sa.select(sa.func.count()).select_from(model))


def test_send_test_queues_a_well_formed_message(client, session):
    response = client.post("/api/send-test", json={"from": "test@example.com",
                                                   "to": "recipient@example.com"})
    assert response.status_code == 200
    body = response.get_json()
    assert set(body) == {"status", "message_id", "message"}
    assert body["status"] == "success"
    assert body["message"] == "Test email queued successfully"
    assert body["message_id"].startswith("msg-")

    detail = client.get(f"/api/queue/message/{body['message_id']}").get_json()
    assert detail["queue"] == "pending"
    assert detail["from"] == "test@example.com" and detail["to"] == ["recipient@example.com"]
    assert detail["subject"] == "Test Email"
    names = [name for name, _ in detail["headers"]]
    for header in ("From", "To", "Subject", "Date", "Message-ID", "MIME-Version", "Content-Type"):
        assert header in names
    raw = client.get(f"/api/queue/message/{body['message_id']}?format=raw").get_data()
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert parsed.get_content_charset() == "utf-8"
    assert parsed.get_content().strip() == "This is a test email from Elemta."
    assert b"\r\n" in raw  # wire line ends
    [event] = [e for e in detail["events"] if e["event_type"] == "reception"]
    assert event["message_id"] == body["message_id"]


def test_send_test_with_a_list_names_and_non_ascii(client):
    response = client.post("/api/send-test", json={
        "from": "Ann Example <ann@example.com>",
        "to": ["bob@example.net", "Zoë <zoe@example.org>"],
        "subject": "Grüße", "body": "Hallo Zoë\n.\nsecond line"})
    assert response.status_code == 200
    message_id = response.get_json()["message_id"]
    detail = client.get(f"/api/queue/message/{message_id}").get_json()
    assert detail["to"] == ["bob@example.net", "zoe@example.org"]
    assert detail["from"] == "ann@example.com"
    assert detail["subject"] == "Grüße"
    raw = client.get(f"/api/queue/message/{message_id}?format=raw").get_data()
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert parsed["Subject"] == "Grüße"
    assert parsed["To"].addresses[1].display_name == "Zoë"
    assert parsed.get_content().replace("\r\n", "\n") == "Hallo Zoë\n.\nsecond line\n"
    assert raw.isascii()  # quoted-printable: 7-bit clean for any server


@pytest.mark.parametrize("body, field", [
    ({"to": "b@example.net"}, "from"),
    ({"from": "a@example.com"}, "to"),
    ({"from": "a@example.com\r\nBcc: victim@example.org", "to": "b@example.net"}, "from"),
    ({"from": "a@example.com", "to": "b@example.net\nBcc: victim@example.org"}, "to"),
    ({"from": "a@example.com", "to": ["b@example.net", "c@example.net\r"]}, "to"),
    ({"from": "a@example.com", "to": "b@example.net",
      "subject": "Hi\r\nBcc: x@example.org"}, "subject"),
    ({"from": "a@example.com", "to": "b@example.net", "subject": "Hi\nthere"}, "subject"),
    ({"from": "not-an-address", "to": "b@example.net"}, "from"),
    ({"from": "a@example.com", "to": "b@@example.net"}, "to"),
    ({"from": "a@example.com", "to": "b@exa mple.net"}, "to"),
    ({"from": "a@example.com", "to": "b@-example.net"}, "to"),
    ({"from": "a@example.com", "to": []}, "to"),
    ({"from": "a@example.com", "to": [f"r{i}@example.net" for i in range(51)]}, "to"),
    ({"from": "a@example.com", "to": 5}, "to"),
    ({"from": ["a@example.com"], "to": "b@example.net"}, "from"),
    ({"from": "a@example.com", "to": "b@example.net", "subject": "x" * 999}, "subject"),
    ({"from": "a@example.com", "to": "b@example.net", "body": "x" * (512 * 1024 + 1)}, "body"),
    ({"from": "a@example.com", "to": "b@example.net", "cc": "c@example.net"}, "cc"),
    ({"from": "x" * 65 + "@example.com", "to": "b@example.net"}, "from"),
])
def test_invalid_bodies_are_refused_and_change_nothing(client, session, body, field):
    response = client.post("/api/send-test", json=body)
    details = assert_error(response, 400, "VALIDATION_ERROR")["details"]
    assert field in details
    assert _count(session, Message) == 0
    assert _count(session, DeliveryEvent) == 0


# Every separator str.splitlines() knows: the email library refuses a header holding any of them.
SEPARATORS = ["\u2028", "\u2029", "\u0085", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\r", "\n"]


@pytest.mark.parametrize("separator", SEPARATORS)
def test_line_separators_in_header_fields_are_refused(client, session, separator):
    bodies = {
        "subject": {"from": "a@example.com", "to": "b@example.net",
                    "subject": f"hi{separator}Bcc: x@evil.example"},
        "from": {"from": f"Eve{separator}Bcc: x@evil.example <a@example.com>",
                 "to": "b@example.net"},
        "to": {"from": "a@example.com", "to": [f"Bob{separator}Bcc: x <b@example.net>"]},
    }
    for field, body in bodies.items():
        response = client.post("/api/send-test", json=body)
        details = assert_error(response, 400, "VALIDATION_ERROR")["details"]
        assert list(details) == [field]
    assert _count(session, Message) == 0


def test_the_refused_separators_are_exactly_those_splitlines_knows():
    for code in range(0x110000):
        char = chr(code)
        splits = len(f"a{char}b".splitlines()) > 1
        assert bool(LINE_BREAKS.search(char)) == splits, hex(code)


def test_fifty_recipients_are_accepted(client, session):
    addresses = [f"r{i}@example.net" for i in range(50)]
    response = client.post("/api/send-test", json={"from": "a@example.com", "to": addresses})
    assert response.status_code == 200
    message_id = response.get_json()["message_id"]
    # Every one is queued for delivery on the one message, in the order given.
    assert session.scalar(sa.select(Message.queue_state).where(Message.id == message_id)) \
        == "pending"
    stored = session.execute(
        sa.select(Recipient.address, Recipient.status).where(Recipient.message_id == message_id)
        .order_by(Recipient.id)).all()
    assert [tuple(row) for row in stored] == [(address, "pending") for address in addresses]
    assert client.get(f"/api/queue/message/{message_id}").get_json()["to"] == addresses


def test_non_json_is_415_and_broken_json_is_400(client, session):
    assert_error(client.post("/api/send-test", data="from=a@example.com",
                             content_type="application/x-www-form-urlencoded"),
                 415, "UNSUPPORTED_MEDIA_TYPE")
    assert_error(client.post("/api/send-test", data="{nope", content_type="application/json"),
                 400, "INVALID_JSON")
    assert_error(client.post("/api/send-test", json=["a@example.com"]), 400, "INVALID_JSON")
    assert_error(client.post("/api/send-test"), 400, "INVALID_JSON")
    assert _count(session, Message) == 0


def test_get_is_405(client):
    response = assert_error(client.get("/api/send-test"), 405, "METHOD_NOT_ALLOWED")
    assert response


def test_send_test_is_in_the_openapi_document(client):
    spec = client.get("/api/openapi.json").get_json()
    operation = spec["paths"]["/api/send-test"]["post"]
    assert operation["summary"]
    schema = spec["components"]["schemas"]["SendTest"]
    assert schema["required"] == ["from", "to"]
    assert schema["additionalProperties"] is False
