"""Operator actions on queued mail: each transition, its 409 cases, and its system event."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from app.models import Recipient
from tests.helpers import assert_error, queue_message, state_of, system_events


def test_stats_count_every_state(client, session):
    for state, n in (("pending", 2), ("deferred", 3), ("held", 1), ("failed", 4)):
        for _ in range(n):
            queue_message(session, state=state)
    body = client.get("/api/queue/stats").get_json()
    assert body == {"pending": 2, "deferred": 3, "held": 1, "failed": 4, "total": 10}


@pytest.mark.parametrize("start", ["pending", "deferred", "failed"])
def test_retry_makes_message_due_now(client, session, start):
    message_id = queue_message(session, state=start)
    response = client.post(f"/api/queue/message/{message_id}/retry")
    assert response.status_code == 200
    assert response.get_json() == {"status": "success", "message": f"Message {message_id} retried"}
    assert state_of(session, message_id) == "pending"
    detail = client.get(f"/api/queue/message/{message_id}").get_json()
    assert [r["status"] for r in detail["recipients"]] == ["pending"]
    assert system_events(session, message_id) == [f"Message {message_id} retried by test-admin"]


def test_retry_of_held_message_is_a_conflict(client, session):
    message_id = queue_message(session, state="held")
    assert_error(client.post(f"/api/queue/message/{message_id}/retry"), 409, "CONFLICT")
    assert state_of(session, message_id) == "held"
    assert system_events(session, message_id) == []


@pytest.mark.parametrize("start", ["pending", "deferred"])
def test_hold_then_release(client, session, start):
    message_id = queue_message(session, state=start)
    assert client.post(f"/api/queue/message/{message_id}/hold").status_code == 200
    assert state_of(session, message_id) == "held"
    assert client.post(f"/api/queue/message/{message_id}/release").status_code == 200
    assert state_of(session, message_id) == "pending"
    detail = client.get(f"/api/queue/message/{message_id}").get_json()
    assert detail["next_attempt_at"] is not None
    assert all(r["status"] == "pending" for r in detail["recipients"])
    assert system_events(session, message_id) == [
        f"Message {message_id} held by test-admin",
        f"Message {message_id} released by test-admin",
    ]


def test_release_of_a_message_whose_recipients_failed_while_held(client, session):
    """Deliveries under way when the hold came may fail it for good; release must not revive
    it as a pending message that no worker would ever claim."""
    message_id = queue_message(session, recipients=("bob@example.net", "carol@example.net"),
                               state="held")
    session.execute(sa.update(Recipient).where(Recipient.message_id == message_id)
                    .values(status="failed", attempts=1, last_error="550 no such user",
                            next_attempt_at=None))
    session.commit()
    assert client.post(f"/api/queue/message/{message_id}/release").status_code == 200
    assert state_of(session, message_id) == "failed"
    detail = client.get(f"/api/queue/message/{message_id}").get_json()
    assert detail["next_attempt_at"] is None
    assert [r["status"] for r in detail["recipients"]] == ["failed", "failed"]
    assert client.get("/api/queue/stats").get_json() == {
        "pending": 0, "deferred": 0, "held": 0, "failed": 1, "total": 1}


def test_release_keeps_delivered_recipients_delivered(client, session):
    message_id = queue_message(session, recipients=("bob@example.net", "carol@example.net"),
                               state="held")
    session.execute(sa.update(Recipient).where(Recipient.message_id == message_id,
                                               Recipient.address == "bob@example.net")
                    .values(status="delivered", attempts=1))
    session.commit()
    assert client.post(f"/api/queue/message/{message_id}/release").status_code == 200
    assert state_of(session, message_id) == "pending"
    detail = client.get(f"/api/queue/message/{message_id}").get_json()
    assert {r["address"]: r["status"] for r in detail["recipients"]} == {
        "bob@example.net": "delivered", "carol@example.net": "pending"}


def test_hold_of_failed_message_is_a_conflict(client, session):
    message_id = queue_message(session, state="failed")
    body = assert_error(client.post(f"/api/queue/message/{message_id}/hold"), 409, "CONFLICT")
    assert "failed" in body["error"]
    assert state_of(session, message_id) == "failed"


@pytest.mark.parametrize("start", ["pending", "deferred", "failed"])
def test_release_of_message_not_held_is_a_conflict(client, session, start):
    message_id = queue_message(session, state=start)
    assert_error(client.post(f"/api/queue/message/{message_id}/release"), 409, "CONFLICT")
    assert state_of(session, message_id) == start


def test_delete_removes_message_and_records_it(client, session):
    message_id = queue_message(session, state="deferred")
    response = client.delete(f"/api/queue/message/{message_id}")
    assert response.get_json() == {"status": "success", "message": f"Message {message_id} deleted"}
    assert state_of(session, message_id) is None
    assert_error(client.get(f"/api/queue/message/{message_id}"), 404, "MESSAGE_NOT_FOUND")
    assert system_events(session, message_id) == [f"Message {message_id} deleted by test-admin"]
    assert client.get("/api/queue/stats").get_json()["total"] == 0


@pytest.mark.parametrize("method,suffix", [
    ("get", ""), ("delete", ""), ("post", "/retry"), ("post", "/hold"), ("post", "/release"),
])
@pytest.mark.parametrize("message_id", [
    "msg-doesNotExist000000000", "not-a-message-id", "msg-", "msg-%27%20OR%201%3D1--",
    "msg-..%2F..%2Fetc%2Fpasswd", "..%2F..%2Fetc%2Fpasswd",
])
def test_unknown_or_malformed_ids_are_not_found(client, session, method, suffix, message_id):
    queued = queue_message(session)
    before = client.get(f"/api/queue/message/{queued}").get_json()
    response = getattr(client, method)(f"/api/queue/message/{message_id}{suffix}")
    # An encoded slash becomes a path separator: no route matches, a plain NOT_FOUND.
    expected = "NOT_FOUND" if "%2F" in message_id else "MESSAGE_NOT_FOUND"
    body = assert_error(response, 404, expected)
    assert "Traceback" not in body["error"]
    assert client.get("/api/queue/stats").get_json()["total"] == 1
    # The message that exists is untouched: same state, recipients, timestamps, events.
    assert client.get(f"/api/queue/message/{queued}").get_json() == before


def test_path_tricks_never_reach_a_message(client, session):
    message_id = queue_message(session)
    before = client.get(f"/api/queue/message/{message_id}").get_json()
    for path in (f"/api/queue/message/../message/{message_id}/../../stats/x",
                 f"/api/queue/message/{message_id}/../../../../etc/passwd",
                 "/api/queue/message/%2e%2e/%2e%2e/stats"):
        response = client.delete(path)
        assert response.status_code in (404, 405), path
        assert response.get_json()["code"] in (
            "NOT_FOUND", "MESSAGE_NOT_FOUND", "METHOD_NOT_ALLOWED")
    # Still there, unchanged (state, recipients, timestamps), and no action was recorded.
    assert client.get(f"/api/queue/message/{message_id}").get_json() == before
    assert state_of(session, message_id) == "pending"
    assert system_events(session, message_id) == []


def test_cli_actions_record_the_cli_actor(app, runner, session):
    message_id = queue_message(session, state="deferred")
    result = runner.invoke(args=["queue", "hold", message_id])
    assert result.exit_code == 0, result.output
    assert state_of(session, message_id) == "held"
    result = runner.invoke(args=["queue", "retry", message_id])
    assert result.exit_code == 1
    assert "held" in result.output
    result = runner.invoke(args=["queue", "release", message_id])
    assert result.exit_code == 0
    assert system_events(session, message_id) == [
        f"Message {message_id} held by cli", f"Message {message_id} released by cli"]
    result = runner.invoke(args=["queue", "delete", "msg-nope0000000000"])
    assert result.exit_code == 1 and "not found" in result.output
