"""Bulk actions: flush, retry, hold, release over a queue with filters and dry runs."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from app.models import DeliveryEvent, Message, Recipient
from app.queue import actions, service
from tests.helpers import assert_error, queue_message, state_of


def _states(session) -> dict[str, str]:
    session.expire_all()
    return dict(session.execute(sa.select(Message.id, Message.queue_state)).all())


def _fill(session) -> dict[str, list[str]]:
    made: dict[str, list[str]] = {}
    for state in ("pending", "deferred", "held", "failed"):
        made[state] = [queue_message(session, state=state, recipients=(f"{state}{i}@example.net",))
                       for i in range(3)]
    made["deferred"].append(queue_message(session, state="deferred", sender="vip@corp.example",
                                          recipients=("x@other.example",)))
    return made


@pytest.mark.parametrize("path", [
    "/api/queue/all/flush", "/api/queue/deferred/flush", "/api/queue/deferred/retry",
    "/api/queue/failed/retry", "/api/queue/pending/hold", "/api/queue/all/hold",
    "/api/queue/held/release",
])
def test_dry_run_counts_and_changes_nothing(client, session, path):
    _fill(session)
    before = _states(session)
    events_before = session.scalar(sa.select(sa.func.count()).select_from(DeliveryEvent))
    response = client.post(f"{path}?dry_run=true")
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "success" and body["count"] > 0
    assert _states(session) == before
    assert session.scalar(sa.select(sa.func.count()).select_from(DeliveryEvent)) == events_before


def test_flush_all_empties_the_queue(client, session):
    made = _fill(session)
    total = sum(len(v) for v in made.values())
    response = client.post("/api/queue/all/flush")
    assert response.get_json() == {"status": "success", "message": "Queue all flushed",
                                   "count": total}
    assert _states(session) == {}
    assert session.scalar(sa.select(sa.func.count()).select_from(Recipient)) == 0
    assert client.get("/api/queue/stats").get_json() == {
        "pending": 0, "deferred": 0, "held": 0, "failed": 0, "total": 0}
    flushed = session.scalar(sa.select(sa.func.count()).select_from(DeliveryEvent)
                             .where(DeliveryEvent.action == "flushed"))
    assert flushed == total


def test_flush_one_queue_with_a_filter(client, session):
    made = _fill(session)
    response = client.post("/api/queue/deferred/flush?sender=vip")
    assert response.get_json()["count"] == 1
    states = _states(session)
    assert made["deferred"][-1] not in states
    assert all(m in states for m in made["deferred"][:-1] + made["pending"])


def test_bulk_retry_hold_release(client, session):
    made = _fill(session)
    assert client.post("/api/queue/failed/retry").get_json()["count"] == 3
    assert all(state_of(session, m) == "pending" for m in made["failed"])
    assert client.post("/api/queue/all/hold?domain=example.net").get_json()["count"] == 12 - 3
    states = _states(session)
    assert states[made["deferred"][-1]] == "deferred"  # other.example: not matched
    assert sum(1 for s in states.values() if s == "held") == 12
    assert client.post("/api/queue/held/release?recipient=held1@").get_json()["count"] == 1
    assert state_of(session, made["held"][1]) == "pending"
    assert client.post("/api/queue/held/release").get_json()["count"] == 11
    assert set(_states(session).values()) == {"pending", "deferred"}


@pytest.mark.parametrize("path", [
    "/api/queue/pending/retry", "/api/queue/held/retry", "/api/queue/failed/hold",
    "/api/queue/held/hold", "/api/queue/all/release", "/api/queue/pending/release",
    "/api/queue/nope/flush",
])
def test_bulk_action_on_a_queue_it_does_not_apply_to_is_400(client, session, path):
    _fill(session)
    before = _states(session)
    body = assert_error(client.post(path), 400, "VALIDATION_ERROR")
    assert "type" in body["details"]
    assert _states(session) == before


def test_bulk_action_skips_messages_that_moved_on(app, session):
    """A message whose state changed after selection is not acted on wrongly."""
    ids = [queue_message(session, state="deferred") for _ in range(3)]
    service.hold_message(session, ids[0], "someone")
    changed = actions._apply(session, "retry", ids, "test", queue_type="deferred")
    session.commit()
    assert sorted(changed) == sorted(ids[1:])
    assert state_of(session, ids[0]) == "held"


def test_cli_bulk_and_json_output(runner, session):
    _fill(session)
    result = runner.invoke(args=["queue", "flush", "held", "--dry-run", "--json"])
    assert result.exit_code == 0
    assert '"count": 3' in result.output and '"dry_run": true' in result.output
    result = runner.invoke(args=["queue", "hold", "--queue", "pending"])
    assert result.exit_code == 0 and "3 message(s) held" in result.output
    result = runner.invoke(args=["queue", "stats", "--json"])
    assert '"held": 6' in result.output
    result = runner.invoke(args=["queue", "hold"])
    assert result.exit_code != 0
    result = runner.invoke(args=["queue", "list", "bogus"])
    assert result.exit_code != 0
