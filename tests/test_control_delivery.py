"""Destination policies, backoff and suppression against real SMTP peers on loopback.

Two workers share the database; one peer counts its concurrent sessions. Time is a
controllable clock (no sleeps): the workers claim, count rate windows and back off by it.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest
import sqlalchemy as sa

from app.control import policies, state
from app.extensions import db
from app.models import ConnectionSlot, Suppression
from app.timeutil import utcnow
from tests.control_helpers import Clock, queue_to, resolver_for, run_workers
from tests.delivery_helpers import Behaviour, Peer, events
from tests.smtpd_helpers import free_port

LIMITED, OTHER = "limited.example", "other.example"


@pytest.fixture
def mx_app(app, make_app):
    port = free_port()

    def factory(**config):
        settings = {"relay_host": "", "smtp_port": port, "smtp_timeout": 5,
                    "worker_concurrency": 6, "retry_schedule": "1"}
        settings.update(config)
        return make_app(**settings)

    factory.port = port
    return factory


def slow(seconds: float):
    return Behaviour(before_data_reply=lambda: time.sleep(seconds))


def add_policy(app, **values):
    with app.app_context():
        policy = policies.create_policy(db.session, {"kind": "domain", **values}, "test")
        db.session.remove()
        return policy.id


def delivered_to(peer: Peer) -> int:
    return len(peer.recipients_received())


def test_two_workers_never_exceed_the_connection_limit_nor_the_rate(mx_app):
    app = mx_app()
    add_policy(app, pattern=LIMITED, max_connections=2, messages_per_minute=12)
    queue_to(app, LIMITED, 30)
    queue_to(app, OTHER, 30)
    clock = Clock()
    minutes: Counter = Counter()  # deliveries per clock minute, as the peer saw them
    slices: Counter = Counter()  # and per ten seconds (the minute's limit is spread)

    def count_minute() -> None:
        time.sleep(0.02)  # a slow receiver: connections stay busy, so they are contended
        now = clock()
        minutes[now.replace(second=0, microsecond=0)] += 1
        slices[now.replace(second=now.second // 10, microsecond=0)] += 1

    resolver = resolver_for({LIMITED: "127.0.0.1", OTHER: "127.0.0.2"})
    with Peer(Behaviour(before_data_reply=count_minute), port=mx_app.port) as limited, \
            Peer(host="127.0.0.2", port=mx_app.port) as other:
        run_workers(app, resolver, clock)
        assert delivered_to(other) == 30  # the other destination is not held back
        for _ in range(200):
            if delivered_to(limited) == 30:
                break
            clock.advance(5)
            run_workers(app, resolver, clock)
    assert delivered_to(limited) == 30
    assert max(minutes.values()) <= 12  # the minute's budget, never more
    assert max(slices.values()) == 2  # a sixth of it per ten seconds: paced, not a burst
    assert len(minutes) >= 3
    assert limited.max_open <= 2
    assert other.max_open > 2  # concurrency was there to be limited
    with app.app_context():
        assert db.session.scalar(sa.select(sa.func.count()).select_from(ConnectionSlot)) == 0
        db.session.remove()
    # Postponed work is not an attempt: nothing failed, not even temporarily.
    assert not events(app, event_type="tempfail")


def test_the_connection_limit_holds_for_two_workers_without_a_rate(mx_app):
    app = mx_app()
    add_policy(app, pattern=LIMITED, max_connections=2, messages_per_connection=5)
    queue_to(app, LIMITED, 40)
    clock = Clock()
    resolver = resolver_for({LIMITED: "127.0.0.1"})
    with Peer(slow(0.02), port=mx_app.port) as limited:
        for _ in range(40):  # jobs that found every slot taken come back a second later
            run_workers(app, resolver, clock)
            if delivered_to(limited) == 40:
                break
            clock.advance(3)
    assert delivered_to(limited) == 40
    assert limited.max_open <= 2
    assert limited.connections >= 8  # at most five messages per connection


def test_a_crashed_workers_slots_free_themselves(app):
    from app.control import limits
    clock = Clock()
    with app.app_context():
        assert {limits.take_slot(db.session, "dest:x", 2, "dead", clock())
                for _ in range(2)} == {0, 1}
        assert limits.take_slot(db.session, "dest:x", 2, "alive", clock()) is None
        clock.advance(limits.SLOT_LEASE_SECONDS + 1)  # "dead" never renewed its leases
        assert limits.take_slot(db.session, "dest:x", 2, "alive", clock()) in (0, 1)
        assert limits.renew_slots(db.session, "alive", clock()) == 1
        db.session.remove()


def test_rate_counters_are_all_or_nothing(app):
    from app.control import limits
    # Early in an hour, so the minute's advance stays inside the same hourly window.
    clock = Clock(utcnow().replace(minute=5, second=0, microsecond=0))
    with app.app_context():
        windows = [("minute", 3), ("hour", 4)]
        assert [limits.consume(db.session, "k", windows, clock()) for _ in range(4)] == [
            None, None, None, "minute"]
        clock.advance(60)
        assert limits.consume(db.session, "k", windows, clock()) is None  # the 4th this hour
        assert limits.consume(db.session, "k", windows, clock()) == "hour"
        counts = limits.current_counts(db.session, clock())
        assert counts[("k", "minute")] == 1 and counts[("k", "hour")] == 4
        db.session.remove()


def test_threads_of_a_worker_share_one_reservation_and_a_full_window(app):
    """Eight threads admitting at once make one reservation between them, and once a window
    is full the others are postponed without asking the database again."""
    from concurrent.futures import ThreadPoolExecutor

    from app.control import limits
    from app.control.gate import DeliveryControl, Postpone
    from app.control.policies import Limits

    clock = Clock(utcnow().replace(second=1, microsecond=0))  # early in a ten-second slice
    control = DeliveryControl(app, "worker-a", 4, clock)
    generous = Limits("dest:generous.example", 1, 4, None, 600_000, None, False)
    with ThreadPoolExecutor(8) as pool:
        admitted = list(pool.map(lambda _: control.admit(generous), range(8)))
    assert len(admitted) == 8
    with app.app_context():
        counts = limits.current_counts(db.session, clock())
        db.session.remove()
    # one chunk for all eight (a twentieth of the 100,000 a slice, at most CHUNK_MAX)
    assert counts[("dest:generous.example", "minute")] == limits.CHUNK_MAX

    tight = Limits("dest:tight.example", 2, 4, None, 6, None, False)  # 1 per ten seconds
    control.admit(tight)
    statements = []
    with app.app_context():
        listen = sa.event.listens_for(db.engine, "before_cursor_execute")(
            lambda *args: statements.append(args[2]))
        for _ in range(3):
            with pytest.raises(Postpone):
                control.admit(tight)
        sa.event.remove(db.engine, "before_cursor_execute", listen)
        db.session.remove()
    assert len([s for s in statements if "rate_counters" in s]) == 1  # the first one asked
    clock.advance(10)  # the next slice: the database is asked again, and grants one
    assert control.admit(tight).limits is tight


def test_threads_meeting_an_expired_policy_cache_read_the_policies_once(app, monkeypatch):
    """Eight threads finding the policy cache expired at once: one reads the policies, the
    others go on with the book they have; before the first read they all wait for it, and
    every one of them sees the policy."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from app.control import gate
    from app.control.gate import DeliveryControl

    add_policy(app, pattern=LIMITED, max_connections=2)
    control = DeliveryControl(app, "worker-a", 4)
    reads = []
    release = threading.Event()
    real = gate.load_rows

    def slow_read(session):
        reads.append(1)
        release.wait(5)  # every other thread arrives meanwhile
        return real(session)

    monkeypatch.setattr(gate, "load_rows", slow_read)

    def limits(_):
        return control.limits_for(LIMITED, LIMITED).max_connections

    with ThreadPoolExecutor(8) as pool:
        first = [pool.submit(limits, n) for n in range(8)]
        time.sleep(0.2)
        release.set()
        assert [f.result(10) for f in first] == [2] * 8
    assert len(reads) == 1

    # The cache expires: one thread reads again, the others keep the book they have.
    add_policy(app, pattern=OTHER, max_connections=3)
    release.clear()
    control._loaded_at -= gate.REFRESH_SECONDS
    with ThreadPoolExecutor(8) as pool:
        again = [pool.submit(lambda _: control.limits_for(OTHER, OTHER).max_connections, n)
                 for n in range(8)]
        time.sleep(0.2)
        seen = [f.result(1) for f in again if f.done()]
        assert len(seen) == 7 and set(seen) == {4}  # not read yet: the default's limit
        release.set()
        assert again[0].result(10) in (3, 4)
    assert len(reads) == 2
    assert control.limits_for(OTHER, OTHER).max_connections == 3


def test_throttling_slows_that_destination_only_and_it_recovers(mx_app):
    app = mx_app(worker_concurrency=1)
    queue_to(app, LIMITED, 5)
    queue_to(app, OTHER, 5)
    clock = Clock()
    resolver = resolver_for({LIMITED: "127.0.0.1", OTHER: "127.0.0.2"})
    throttling = Behaviour(data_reply="421 4.7.0 Too many messages, slow down")
    with Peer(throttling, port=mx_app.port) as limited, \
            Peer(host="127.0.0.2", port=mx_app.port) as other:
        probes = limited.connections  # the controller's own readiness check
        run_workers(app, resolver, clock, count=1)
        assert delivered_to(other) == 5
        assert delivered_to(limited) == 0
        # One throttling reply, then the destination paused.
        assert limited.connections - probes == 1
        with app.app_context():
            [row] = state.destination_states(db.session, clock())
            db.session.remove()
        assert (row["destination"], row["backoff_level"]) == (f"dest:{LIMITED}", 1)
        assert row["paused_until"] is not None and "421 4.7.0" in row["last_reply"]
        assert len(events(app, event_type="tempfail")) == 1  # the rest were not attempted

        limited.behaviour = Behaviour()  # the receiver is happy again
        run_workers(app, resolver, clock, count=1)
        assert delivered_to(limited) == 0  # still paused
        clock.advance(35)
        run_workers(app, resolver, clock, count=1)
        assert delivered_to(limited) == 5
    with app.app_context():
        [row] = state.destination_states(db.session, clock())
        assert (row["backoff_level"], row["paused_until"]) == (1, None)  # reduced limits
        clock.advance(61)  # a recovery step without throttling
        [row] = state.destination_states(db.session, clock())
        assert row["backoff_level"] == 0
        db.session.remove()


def test_a_511_suppresses_the_address_and_the_next_message_is_refused(mx_app, client):
    app = mx_app()
    address = f"user0@{LIMITED}"
    reply = "550 5.1.1 <user0@limited.example>: Recipient address rejected: User unknown"
    resolver = resolver_for({LIMITED: "127.0.0.1"})
    with Peer(Behaviour(rcpt_replies={address: reply}), port=mx_app.port) as peer:
        probes = peer.connections
        [message_id] = queue_to(app, LIMITED, 1)
        clock = Clock()  # (after queueing: the mail is due by it)
        run_workers(app, resolver, clock, count=1)
        with app.app_context():
            [entry] = db.session.scalars(sa.select(Suppression))
            assert (entry.address, entry.source, entry.enhanced_code) == (
                address, "bounce", "5.1.1")
            db.session.remove()
        # The history (and the webhook feed) records it, with the message that bounced.
        [event] = [e for e in events(app, message_id, "system") if e.action == "suppressed"]
        assert (event.recipient, event.sender, event.enhanced_code, event.queue_state) == (
            address, "alice@example.com", "5.1.1", "failed")
        # The next message to it is refused by send-test: nothing queued, no attempt.
        response = app.test_client().post("/api/send-test", json={
            "from": "alice@example.com", "to": address.upper()})
        assert response.status_code == 400
        assert response.get_json()["code"] == "VALIDATION_ERROR"
        assert "suppressed" in response.get_json()["details"]["to"][0]
        run_workers(app, resolver, clock, count=1)
        assert peer.connections - probes == 1
    [refusal] = [e for e in events(app, event_type="rejection") if e.message_id is None]
    assert refusal.recipient == address.upper() and refusal.smtp_code == 550


def test_a_tls_requirement_refuses_a_server_without_starttls(mx_app):
    app = mx_app()
    add_policy(app, pattern=LIMITED, require_tls=True)
    queue_to(app, LIMITED, 1)
    clock = Clock()
    with Peer(port=mx_app.port) as peer:  # offers no STARTTLS
        run_workers(app, resolver_for({LIMITED: "127.0.0.1"}), clock, count=1)
    assert not peer.received
    [event] = events(app, event_type="tempfail")
    assert "TLS required by the destination policy" in event.message
