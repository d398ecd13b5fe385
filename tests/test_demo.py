"""Demo data (both databases): internally consistent, found by the README's filter
combinations, and removed again by ``flask demo reset`` without touching other mail."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from app.demo.vocabulary import DEMO_ID_PREFIX
from app.events import record_event
from app.models import DeliveryEvent, Message, Recipient
from app.queue.counters import recount as recount_queue
from app.queue.service import queue_stats
from app.timeutil import utcnow
from tests.helpers import queue_message
from tests.test_stats_api import recount, rollup_rows

OPEN = ("pending", "deferred")
ATTEMPT_EVENTS = ("tempfail", "rejection", "delivery")


def _attempt_times(session) -> dict[tuple[str, str], list]:
    times: dict[tuple[str, str], list] = {}
    for message_id, recipient, timestamp in session.execute(
            sa.select(DeliveryEvent.message_id, DeliveryEvent.recipient, DeliveryEvent.timestamp)
            .where(DeliveryEvent.event_type.in_(ATTEMPT_EVENTS))):
        times.setdefault((message_id, recipient), []).append(timestamp)
    return times


def assert_consistent(session, *, every_attempt_has_an_event: bool) -> int:
    """Each message as queue/service.py's settle_message_state would leave it; each
    recipient's last attempt is its last event. Returns the number of messages checked."""
    session.expire_all()
    times = _attempt_times(session)
    messages = list(session.scalars(sa.select(Message).where(Message.origin == "demo")))
    now = utcnow()
    for message in messages:
        recipients = list(message.recipients)
        due = [r.next_attempt_at for r in recipients if r.status in OPEN]
        assert message.next_attempt_at == (min(due) if due else None), message.id
        assert message.attempts == max(r.attempts for r in recipients), message.id
        assert message.updated_at >= message.created_at
        for r in recipients:
            seen = times.get((message.id, r.address), [])
            if not r.attempts:
                assert r.last_attempt_at is None and not seen, (message.id, r.address)
                continue
            if every_attempt_has_an_event:
                assert len(seen) == r.attempts, (message.id, r.address)
            assert r.last_attempt_at == max(seen), (message.id, r.address)
            assert message.created_at < r.last_attempt_at <= min(message.updated_at, now)
            if r.status == "deferred":
                assert r.next_attempt_at > r.last_attempt_at
            if r.status == "failed":
                assert r.next_attempt_at is None
    return len(messages)


def test_seeded_messages_are_consistent(runner, session) -> None:
    result = runner.invoke(args=["demo", "seed", "--messages", "300", "--events", "0",
                                 "--seed", "11"])
    assert result.exit_code == 0, result.output
    assert assert_consistent(session, every_attempt_has_an_event=True) == 300


def test_bulk_seeded_messages_are_consistent_on_postgresql(session) -> None:
    if session.get_bind().dialect.name != "postgresql":
        pytest.skip("the bulk generator is PostgreSQL-only (SQLite uses the Python path)")
    from app.demo.bulk import seed_messages_postgresql

    seed_messages_postgresql(session, 400, seed=5, now=utcnow())
    # The bulk generator records each recipient's last outcome only (app/queue/bulk.py).
    assert assert_consistent(session, every_attempt_has_an_event=False) == 400


def test_the_readmes_filter_combination_finds_demo_messages(runner, client) -> None:
    assert runner.invoke(args=["demo", "seed", "--events", "0"]).exit_code == 0
    response = client.get("/api/queue/all?domain=example.com&sender=alice&limit=5")
    assert response.status_code == 200
    rows = response.get_json()
    assert len(rows) == 5
    for row in rows:
        assert "alice" in row["from"]
        assert any(to.endswith("@example.com") for to in row["to"])


def test_reset_removes_demo_data_and_nothing_else(runner, session) -> None:
    real_id = queue_message(session, sender="app@example.com", recipients=("user@example.net",))
    record_event(session, "delivery", message_id=real_id, sender="app@example.com",
                 recipient="user@example.net", message="250 ok", action="delivered")
    session.commit()
    seeded = runner.invoke(args=["demo", "seed", "--messages", "120", "--events", "900",
                                 "--seed", "3"])
    assert seeded.exit_code == 0, seeded.output
    last_event_id = session.scalar(sa.select(sa.func.max(DeliveryEvent.id)))
    demo_events = session.scalar(sa.select(sa.func.count()).select_from(DeliveryEvent)
                                 .where(DeliveryEvent.message_id.startswith(DEMO_ID_PREFIX)))

    result = runner.invoke(args=["demo", "reset", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"messages": 120, "events": demo_events}
    session.expire_all()
    assert list(session.scalars(sa.select(Message.id))) == [real_id]
    assert {r.message_id for r in session.scalars(sa.select(Recipient))} == {real_id}
    left = list(session.scalars(sa.select(DeliveryEvent).order_by(DeliveryEvent.id)))
    assert {e.message_id for e in left[:-1]} == {real_id}
    # The reset's own record keeps the highest id: new events never reuse a deleted one's.
    assert (left[-1].event_type, left[-1].action) == ("system", None)
    assert left[-1].message.startswith("Demo data reset by cli")
    assert left[-1].id > last_event_id
    stats = queue_stats(session)
    assert (stats["pending"], stats["total"]) == (1, 1)
    assert recount_queue(session) == {k: v for k, v in stats.items() if k != "total"}
    assert rollup_rows(session) == recount(session) != {}

    again = runner.invoke(args=["demo", "reset"])
    assert again.exit_code == 0
    assert again.stdout.startswith("Deleted 0 demo message(s) from the queue and 0 demo event")
