"""The delivery worker against real SMTP peers on loopback: every outcome ends right.

Each test checks the recipient state, the event (with code, enhanced code, host, IP), the
rollup bucket and, for temporary failures, the retry time.
"""

from __future__ import annotations

import datetime as dt
import email
import email.policy

import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY

from app.events import hour_floor
from app.extensions import db
from app.models import Message, Recipient
from app.queue import service
from app.timeutil import utcnow
from tests.delivery_helpers import (
    Behaviour,
    Peer,
    events,
    message_row,
    recipients_of,
    rollup,
    rollup_rows,
    run_worker,
)
from tests.helpers import queue_message


@pytest.fixture
def relay_app(app, make_app):
    """Apps whose worker relays to a given peer (the ``app`` fixture emptied the database)."""

    # The SMTP timeout bounds every wait for a reply, so it is long enough for a loaded machine:
    # at 1 s, a reply that came late was a failure the test did not ask for (a MAIL reply on a
    # reused connection counts as a stale connection and opens a new one; the hooks that act
    # while the client waits for the DATA reply write to the database meanwhile). The test of a
    # timeout sets its own, and its peer stalls far longer.
    def factory(peer: Peer | None = None, **config):
        settings = {"relay_host": peer.address if peer else "", "smtp_timeout": 15,
                    "retry_schedule": "60,300", "worker_concurrency": 2}
        settings.update(config)
        return make_app(**settings)

    return factory


def queue(app, sender="alice@example.com", recipients=("bob@example.net",), subject="Hello"):
    with app.app_context():
        message_id = queue_message(db.session, sender=sender, recipients=recipients,
                                   subject=subject)
        db.session.remove()
    return message_id


def test_accepted_mail_is_delivered_and_leaves_the_queue(relay_app):
    with Peer() as peer:
        app = relay_app(peer)
        message_id = queue(app)
        run_worker(app)
    assert [(m.mail_from, m.rcpt_tos) for m in peer.received] == [
        ("alice@example.com", ["bob@example.net"])]
    parsed = email.message_from_bytes(peer.received[0].content, policy=email.policy.default)
    assert parsed["Subject"] == "Hello"
    assert message_row(app, message_id) is None  # every recipient delivered: left the queue
    [event] = events(app, message_id, "delivery")
    assert (event.recipient, event.smtp_code, event.enhanced_code) == (
        "bob@example.net", 250, "2.0.0")
    assert (event.delivery_host, event.delivery_ip) == ("127.0.0.1", "127.0.0.1")
    assert (event.action, event.queue_state) == ("delivered", None)
    # Counted in the clock hour of the event.
    assert rollup_rows(app) == [(hour_floor(event.timestamp), "delivered", 1)]


def test_temporary_failure_defers_with_the_scheduled_retry(relay_app):
    with Peer(Behaviour(data_reply="451 4.3.0 Try again later")) as peer:
        app = relay_app(peer)
        message_id = queue(app)
        before = utcnow()
        run_worker(app)
        after = utcnow()
        run_worker(app)  # not due again yet: no second attempt
    assert peer.received == []
    message = message_row(app, message_id)
    assert message.queue_state == "deferred" and message.attempts == 1
    [recipient] = message.recipients
    assert recipient.status == "deferred" and recipient.attempts == 1
    assert recipient.lease_owner is None
    # First step of the schedule (60 s) with +-10% jitter.
    assert before + dt.timedelta(seconds=54) <= recipient.next_attempt_at
    assert recipient.next_attempt_at <= after + dt.timedelta(seconds=66)
    assert message.next_attempt_at == recipient.next_attempt_at
    assert recipient.last_error == "451 4.3.0 Try again later"
    [event] = events(app, message_id, "tempfail")
    assert (event.smtp_code, event.enhanced_code, event.delivery_ip) == (451, "4.3.0", "127.0.0.1")
    assert (event.action, event.queue_state) == ("deferred", "deferred")
    assert rollup_rows(app) == [(hour_floor(event.timestamp), "deferred", 1)]


def test_second_failure_uses_the_next_step_and_the_last_step_repeats(relay_app):
    with Peer(Behaviour(rcpt_replies={"bob@example.net": "452 4.2.2 Mailbox full"})) as peer:
        app = relay_app(peer)
        message_id = queue(app)
        for expected_step in (60, 300, 300):
            with app.app_context():
                db.session.execute(sa.update(Recipient).values(next_attempt_at=utcnow()))
                db.session.execute(sa.update(Message).values(next_attempt_at=utcnow()))
                db.session.commit()
                db.session.remove()
            start = utcnow()
            run_worker(app)
            [recipient] = recipients_of(app, message_id).values()
            delay = (recipient.next_attempt_at - start).total_seconds()
            assert expected_step * 0.9 - 1 <= delay <= expected_step * 1.1 + 1
    assert recipient.attempts == 3
    assert rollup(app) == {"deferred": 3}


def test_permanent_failure_fails_the_message_and_bounces(relay_app):
    with Peer(Behaviour(rcpt_replies={"bob@example.net": "550 5.1.1 No such user"})) as peer:
        app = relay_app(peer)
        message_id = queue(app)
        run_worker(app)
    message = message_row(app, message_id)
    assert message.queue_state == "failed"
    assert message.next_attempt_at is None
    [recipient] = message.recipients
    assert (recipient.status, recipient.last_error) == ("failed", "550 5.1.1 No such user")
    [event] = events(app, message_id, "rejection")
    assert (event.smtp_code, event.enhanced_code, event.action, event.queue_state) == (
        550, "5.1.1", "failed", "failed")
    # The DSN was queued in the same run and delivered to the relay too (sender's domain).
    bounces = [m for m in peer.received if m.mail_from == ""]
    assert [b.rcpt_tos for b in bounces] == [["alice@example.com"]]
    assert rollup(app) == {"failed": 1, "delivered": 1}


def test_dropped_connection_is_a_temporary_failure(relay_app):
    with Peer(Behaviour(drop_at="rcpt")) as peer:
        app = relay_app(peer)
        message_id = queue(app)
        run_worker(app)
    [recipient] = recipients_of(app, message_id).values()
    assert recipient.status == "deferred"
    assert "lost" in recipient.last_error
    [event] = events(app, message_id, "tempfail")
    assert event.smtp_code is None and event.delivery_ip == "127.0.0.1"
    assert rollup(app) == {"deferred": 1}


def test_stalled_server_times_out_into_a_temporary_failure(relay_app):
    with Peer(Behaviour(stall_at="data", stall_seconds=5)) as peer:
        app = relay_app(peer, smtp_timeout=1)
        message_id = queue(app)
        run_worker(app)
    [recipient] = recipients_of(app, message_id).values()
    assert recipient.status == "deferred"
    assert "timed out" in recipient.last_error
    assert message_row(app, message_id).queue_state == "deferred"
    assert rollup(app) == {"deferred": 1}


def test_refused_connection_defers(relay_app):
    with Peer() as peer:
        port = peer.port
    app = relay_app(None, relay_host=f"127.0.0.1:{port}")  # nobody listens there any more
    message_id = queue(app)
    run_worker(app)
    [recipient] = recipients_of(app, message_id).values()
    assert recipient.status == "deferred"
    assert recipient.last_error.startswith("Could not connect to any server")


def test_partial_acceptance_never_resends_to_accepted_recipients(relay_app):
    behaviour = Behaviour(rcpt_replies={"carol@example.net": "550 5.1.1 Unknown user",
                                        "dave@example.net": "450 4.2.1 Busy, try later"})
    with Peer(behaviour) as peer:
        app = relay_app(peer, send_bounces=False)
        rcpts = ("bob@example.net", "carol@example.net", "dave@example.net")
        message_id = queue(app, recipients=rcpts)
        run_worker(app)
        state = {a: r.status for a, r in recipients_of(app, message_id).items()}
        assert state == {"bob@example.net": "delivered", "carol@example.net": "failed",
                         "dave@example.net": "deferred"}
        assert message_row(app, message_id).queue_state == "deferred"
        assert peer.recipients_received() == ["bob@example.net"]

        behaviour.rcpt_replies.clear()  # the server now accepts everyone
        with app.app_context():
            service.retry_message(db.session, message_id, "test")
            db.session.remove()
        run_worker(app)
    # Retry revived carol (an operator retry gives failed recipients another chance), but bob,
    # already delivered, was never sent again.
    assert sorted(peer.recipients_received()) == ["bob@example.net", "carol@example.net",
                                                  "dave@example.net"]
    assert peer.recipients_received().count("bob@example.net") == 1
    assert message_row(app, message_id) is None
    kinds = [(e.event_type, e.recipient) for e in events(app, message_id)
             if e.event_type != "system"]
    assert kinds[1:4] == [("delivery", "bob@example.net"), ("rejection", "carol@example.net"),
                          ("tempfail", "dave@example.net")]
    assert rollup(app) == {"delivered": 3, "failed": 1, "deferred": 1}


def test_recipients_sharing_a_destination_go_in_one_transaction(relay_app):
    with Peer() as peer:
        app = relay_app(peer)
        queue(app, recipients=("a@example.net", "b@example.org", "c@example.com"))
        run_worker(app)
    assert len(peer.received) == 1
    assert sorted(peer.received[0].rcpt_tos) == ["a@example.net", "b@example.org", "c@example.com"]


def test_connection_is_reused_across_messages(relay_app):
    with Peer() as peer:
        app = relay_app(peer, worker_concurrency=1)
        for n in range(5):
            queue(app, subject=f"m{n}")
        run_worker(app)
    assert len(peer.received) == 5
    assert len({m.session_id for m in peer.received}) == 1


def test_connections_per_destination_are_limited(relay_app):
    with Peer(Behaviour(stall_at="data", stall_seconds=0.2)) as peer:
        app = relay_app(peer, worker_concurrency=6, max_connections_per_domain=2, smtp_timeout=5)
        for n in range(12):
            queue(app, subject=f"m{n}")
        run_worker(app)
    assert len(peer.received) == 12
    assert peer.max_open <= 2


def test_no_bounce_for_a_null_sender(relay_app):
    with Peer(Behaviour(data_reply="554 5.6.0 Content rejected")) as peer:
        app = relay_app(peer)
        message_id = queue(app, sender="")
        run_worker(app)
    assert message_row(app, message_id).queue_state == "failed"
    with app.app_context():
        assert db.session.scalar(sa.select(sa.func.count()).select_from(Message)) == 1
        db.session.remove()
    assert peer.received == []


def test_bounces_can_be_turned_off(relay_app):
    with Peer(Behaviour(mail_reply="553 5.7.1 Sender refused")) as peer:
        app = relay_app(peer, send_bounces=False)
        message_id = queue(app)
        run_worker(app)
    assert message_row(app, message_id).queue_state == "failed"
    assert [e.event_type for e in events(app) if e.event_type != "reception"] == ["rejection"]


def test_queue_lifetime_expiry_fails_with_the_contract_text(relay_app):
    with Peer(Behaviour(data_reply="451 4.4.1 Not now")) as peer:
        app = relay_app(peer, max_queue_lifetime=3600)
        message_id = queue(app)
        with app.app_context():
            db.session.execute(sa.update(Message).values(
                created_at=utcnow() - dt.timedelta(hours=2)))
            db.session.commit()
            db.session.remove()
        run_worker(app)
    [recipient] = recipients_of(app, message_id).values()
    assert recipient.status == "failed"
    assert recipient.last_error.startswith("Queue lifetime expired")
    [event] = events(app, message_id, "rejection")
    assert event.enhanced_code == "4.4.7" and event.message.startswith("Queue lifetime expired")
    assert message_row(app, message_id).queue_state == "failed"
    [bounce] = [m for m in peer.received if m.mail_from == ""] or [None]
    assert bounce is None  # the relay refuses everything with 451: the DSN waits deferred
    assert rollup(app)["failed"] == 1


def test_retry_is_capped_at_the_queue_lifetime(relay_app):
    with Peer(Behaviour(data_reply="451 4.4.1 Not now")) as peer:
        app = relay_app(peer, max_queue_lifetime=100, retry_schedule="3600")
        message_id = queue(app)
        run_worker(app)
    message = message_row(app, message_id)
    [recipient] = message.recipients
    assert recipient.status == "deferred"
    assert recipient.next_attempt_at <= message.created_at + dt.timedelta(seconds=100)


def test_held_messages_are_never_delivered(relay_app):
    with Peer() as peer:
        app = relay_app(peer)
        with app.app_context():
            message_id = queue_message(db.session, state="held")
            db.session.remove()
        run_worker(app)
    assert peer.received == []
    assert message_row(app, message_id).queue_state == "held"


def test_hold_during_delivery_wins(relay_app, make_app):
    operator = make_app()
    state = {}

    def hold_now() -> None:
        with operator.app_context():
            service.hold_message(db.session, state["id"], "operator")
            db.session.remove()

    with Peer(Behaviour(rcpt_replies={"carol@example.net": "451 4.3.0 later"},
                        before_data_reply=hold_now)) as peer:
        app = relay_app(peer)
        state["id"] = message_id = queue(app, recipients=("bob@example.net", "carol@example.net"))
        run_worker(app)
    message = message_row(app, message_id)
    assert message.queue_state == "held"
    assert {r.address: r.status for r in message.recipients} == {
        "bob@example.net": "delivered", "carol@example.net": "deferred"}
    delivery = events(app, message_id, "delivery")
    assert [(e.recipient, e.queue_state) for e in delivery] == [("bob@example.net", "held")]


def test_delete_during_delivery_is_not_undone(relay_app, make_app):
    operator = make_app()
    state = {}

    def delete_now() -> None:
        with operator.app_context():
            service.delete_message(db.session, state["id"], "operator")
            db.session.remove()

    with Peer(Behaviour(before_data_reply=delete_now)) as peer:
        app = relay_app(peer)
        state["id"] = message_id = queue(app)
        run_worker(app)
    assert message_row(app, message_id) is None
    assert peer.recipients_received() == ["bob@example.net"]
    kinds = [(e.event_type, e.action) for e in events(app, message_id)]
    assert kinds == [("reception", "queued"), ("system", "deleted"), ("delivery", "delivered")]
    assert rollup(app) == {"delivered": 1}
    with app.app_context():
        assert db.session.scalar(sa.select(sa.func.count()).select_from(Recipient)) == 0
        db.session.remove()


def _latency_sample(suffix: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(f"elemta_delivery_latency_seconds_{suffix}", labels) or 0.0


def test_each_delivered_recipient_feeds_the_latency_histogram(relay_app):
    # API.md §5's histogram, as app.metrics defines it: acceptance into the queue -> delivered,
    # per recipient. Batched recording (plain deliveries) and the one-by-one path (a message
    # that bounces) both observe; a refused recipient does not.
    behaviour = Behaviour(rcpt_replies={"dave@example.net": "550 5.1.1 No such user"})
    count, within_1h, within_3h = (_latency_sample("count"),
                                   _latency_sample("bucket", le="3600.0"),
                                   _latency_sample("bucket", le="10800.0"))
    with Peer(behaviour) as peer:
        app = relay_app(peer)
        queue(app)
        queue(app, recipients=("carol@example.net", "dave@example.net"))
        with app.app_context():
            # Queued two hours ago: its latency falls between the 3600 and 10800 s bounds.
            queue_message(db.session, recipients=("erin@example.net",),
                          created_at=utcnow() - dt.timedelta(hours=2))
            db.session.remove()
        run_worker(app)

    delivered = events(app, event_type="delivery")
    # bob, carol, erin and the bounce to alice.
    assert len(delivered) == 4 and len(peer.recipients_received()) == 4
    assert _latency_sample("count") == count + 4
    assert _latency_sample("bucket", le="3600.0") == within_1h + 3
    assert _latency_sample("bucket", le="10800.0") == within_3h + 4
