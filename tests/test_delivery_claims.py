"""Claims and leases, the retry policy, heartbeat, purge and the worker's stop."""

from __future__ import annotations

import datetime as dt
import random
import threading
import time

import pytest
import sqlalchemy as sa

from app.delivery import maintenance
from app.delivery.outcomes import OutcomePolicy, retry_delay
from app.delivery.worker import Worker
from app.models import DeliveryEvent, Message, Recipient, WorkerHeartbeat
from app.queue.leases import lease_due, release_leases
from app.queue.retention import purge_expired_failed
from app.timeutil import utcnow
from tests.delivery_helpers import Peer
from tests.helpers import queue_message, state_of


def _lease_owners(session) -> dict[str, str | None]:
    session.expire_all()
    return dict(session.execute(sa.select(Recipient.address, Recipient.lease_owner)).all())


def test_claims_of_two_workers_are_disjoint_and_take_whole_messages(session):
    for n in range(4):
        queue_message(session, recipients=(f"a{n}@example.net", f"b{n}@example.org"))
    first = lease_due(session, "w1", max_messages=2, lease_seconds=60)
    second = lease_due(session, "w2", max_messages=10, lease_seconds=60)
    assert len(first) == 4 and len(second) == 4
    assert {c.id for c in first}.isdisjoint({c.id for c in second})
    assert len({c.message_id for c in first}) == 2  # both recipients of each message
    assert lease_due(session, "w3", max_messages=10, lease_seconds=60) == []


def test_only_due_recipients_of_pending_or_deferred_messages_are_claimed(session):
    due = queue_message(session, recipients=("due@example.net",))
    queue_message(session, recipients=("held@example.net",), state="held")
    queue_message(session, recipients=("failed@example.net",), state="failed")
    queue_message(session, recipients=("later@example.net",), state="deferred")  # due in 1 h
    claimed = lease_due(session, "w1", max_messages=10, lease_seconds=60)
    assert [(c.message_id, c.address) for c in claimed] == [(due, "due@example.net")]


def test_an_expired_lease_is_taken_over_and_a_live_one_is_not(session):
    queue_message(session)
    now = utcnow()
    assert len(lease_due(session, "dead", max_messages=10, lease_seconds=30, now=now)) == 1
    assert lease_due(session, "w2", max_messages=10, lease_seconds=30,
                     now=now + dt.timedelta(seconds=29)) == []
    taken = lease_due(session, "w2", max_messages=10, lease_seconds=30,
                      now=now + dt.timedelta(seconds=31))
    assert [c.address for c in taken] == ["bob@example.net"]
    assert _lease_owners(session) == {"bob@example.net": "w2"}


def test_release_gives_back_only_this_workers_claims(session):
    queue_message(session, recipients=("a@example.net",))
    queue_message(session, recipients=("b@example.net",))
    [mine] = lease_due(session, "w1", max_messages=1, lease_seconds=60)
    lease_due(session, "w2", max_messages=1, lease_seconds=60)
    assert release_leases(session, "w1", [mine.id]) == 1
    owners = _lease_owners(session)
    assert owners[mine.address] is None
    assert set(owners.values()) == {None, "w2"}
    again = lease_due(session, "w3", max_messages=10, lease_seconds=60)
    assert [c.address for c in again] == [mine.address]


def test_retry_delay_follows_the_schedule_with_jitter_and_repeats_the_last_step():
    policy = OutcomePolicy(retry_schedule=[60, 300, 900], max_queue_lifetime=10,
                           send_bounces=True, reporting_mta="mta.test")
    rng = random.Random(7)
    for attempts, base in ((1, 60), (2, 300), (3, 900), (4, 900), (40, 900)):
        delays = [retry_delay(policy, attempts, rng) for _ in range(200)]
        assert min(delays) >= base * 0.9 and max(delays) <= base * 1.1
        assert max(delays) - min(delays) > base * 0.1  # really jittered


def test_heartbeat_is_created_refreshed_and_removed(session):
    started = utcnow()
    maintenance.beat(session, "w1", started)
    first = session.scalar(sa.select(WorkerHeartbeat.last_heartbeat))
    time.sleep(0.01)
    maintenance.beat(session, "w1", started)
    session.expire_all()
    row = session.scalar(sa.select(WorkerHeartbeat))
    assert row.last_heartbeat > first and row.started_at == started
    maintenance.remove_heartbeat(session, "w1")
    assert session.scalar(sa.select(sa.func.count()).select_from(WorkerHeartbeat)) == 0


def test_purge_removes_only_failed_messages_past_the_retention(session):
    old_failed = queue_message(session, state="failed")
    new_failed = queue_message(session, state="failed")
    old_deferred = queue_message(session, state="deferred")
    long_ago = utcnow() - dt.timedelta(days=8)
    session.execute(sa.update(Message).where(Message.id.in_([old_failed, old_deferred]))
                    .values(updated_at=long_ago))
    session.commit()
    assert purge_expired_failed(session, 7 * 86400) == 1
    assert state_of(session, old_failed) is None
    assert state_of(session, new_failed) == "failed"
    assert state_of(session, old_deferred) == "deferred"
    [event] = session.scalars(sa.select(DeliveryEvent).where(DeliveryEvent.event_type == "system"))
    assert (event.message_id, event.action, event.queue_state) == (old_failed, "purged", None)
    assert "purged" in event.message


def test_worker_beats_while_running_and_stops_cleanly(app, make_app, session):
    with Peer() as peer:
        worker_app = make_app(relay_host=peer.address)
        worker = Worker(worker_app)
        thread = threading.Thread(target=worker.run)
        thread.start()
        try:
            for _ in range(200):  # until the first heartbeat is visible
                session.expire_all()
                if session.scalar(sa.select(WorkerHeartbeat.worker_id)) == worker.worker_id:
                    break
                time.sleep(0.05)
            else:
                pytest.fail("no heartbeat")
            message_id = queue_message(session)
            for _ in range(200):  # a running worker picks up new mail by itself
                if peer.received:
                    break
                time.sleep(0.05)
        finally:
            worker.stop()
            thread.join(40)
    assert not thread.is_alive()
    assert peer.recipients_received() == ["bob@example.net"]
    assert state_of(session, message_id) is None
    assert session.scalar(sa.select(sa.func.count()).select_from(WorkerHeartbeat)) == 0
