"""The delivery recorder (app/delivery/recorder.py) and the pipeline its writes go in.

On PostgreSQL a group's outcomes are written in one psycopg pipeline (``database.pipelined``):
its statements must still read what they read, and an error that surfaces only when the
pipeline ends must be judged as SQLAlchemy's errors are (an outage is an outage).
"""

from __future__ import annotations

import datetime as dt
import threading
from collections import Counter

import pytest
import sqlalchemy as sa
import sqlalchemy.exc as sa_exc

from app.database import is_transient_conflict, is_unreachable, pipelined, unit_of_work
from app.delivery import recorder as recorder_module
from app.delivery.outcomes import OutcomePolicy, record_outcomes
from app.delivery.recorder import Recorder
from app.delivery.smtp_client import RecipientResult
from app.delivery.worker import Worker
from app.extensions import db
from app.models import DeliveryEvent, Message, Recipient
from app.queue.outcomes import Attempt
from app.timeutil import utcnow
from tests.delivery_helpers import (
    Peer,
    assert_each_delivered_once,
    bulk_queue,
    delivered_recipients,
    wait_for,
)
from tests.fault_helpers import SqliteLock, TcpProxy

WORKER = "recorder-test"
POLICY = OutcomePolicy(retry_schedule=[60], max_queue_lifetime=86400, send_bounces=False,
                       reporting_mta="mx.test")


def _leased(app, count: int) -> list[Attempt]:
    """``count`` queued messages whose recipient this worker holds, and their delivered
    attempts (not recorded yet)."""
    bulk_queue(app, count)
    with unit_of_work(app) as session:
        session.execute(sa.update(Recipient).values(
            lease_owner=WORKER, lease_expires_at=utcnow() + dt.timedelta(seconds=300)))
        rows = session.execute(sa.select(Recipient.id, Recipient.message_id, Recipient.address)
                               .order_by(Recipient.id)).all()
    return [Attempt(message_id, "alice@example.com",
                    [RecipientResult(rid, address, "delivered", "250 2.0.0 ok", 250, "2.0.0")])
            for rid, message_id, address in rows]


def _record_from_threads(recorder: Recorder, attempts: list[Attempt], threads: int) -> list[bool]:
    """Each of ``threads`` delivery threads records its share, one attempt at a time, as the
    worker's threads do (``begin`` then ``record``); what ``record`` answered, per attempt."""
    answers: list[bool] = []

    def deliver(share: list[Attempt]) -> None:
        for attempt in share:
            recorder.begin()
            answers.append(recorder.record(attempt))

    running = [threading.Thread(target=deliver, args=(attempts[n::threads],))
               for n in range(threads)]
    for thread in running:
        thread.start()
    for thread in running:
        thread.join(120)
    return answers


def _left(app) -> int:
    with unit_of_work(app) as session:
        return session.scalar(sa.select(sa.func.count()).select_from(Message)) or 0


def test_the_outcomes_of_many_threads_are_all_recorded_once(app):
    attempts = _leased(app, 160)
    recorder = Recorder(app, WORKER, POLICY, 300)
    recorder.start()
    try:
        answers = _record_from_threads(recorder, attempts, threads=8)
    finally:
        recorder.close(30)
    assert answers == [True] * 160
    assert recorder.recorded_attempts == 160
    assert recorder.transactions <= 160
    delivered = delivered_recipients(app)
    assert set(delivered) == {f"r{n}@example.net" for n in range(160)}
    assert max(delivered.values()) == 1
    assert _left(app) == 0


def test_nothing_is_lost_when_commits_fail(app, make_app, database_url, monkeypatch):
    # The database goes away while threads record; their outcomes are held, then written once.
    monkeypatch.setattr(recorder_module, "BACKOFF_MAX", 0.25)
    attempts = _leased(app, 60)
    proxy: TcpProxy | None = None
    if database_url.startswith("postgresql"):
        url = sa.make_url(database_url)
        proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432).__enter__()
        writer_app = make_app(database_url=proxy.url_for(database_url))
    else:
        writer_app = make_app(sqlalchemy_engine_options={"connect_args": {"timeout": 0.2}})
    recorder = Recorder(writer_app, WORKER, POLICY, 300)
    recorder.start()
    try:
        answers_first = _record_from_threads(recorder, attempts[:20], threads=4)
        if proxy is not None:
            proxy.cut()
            restore = proxy.restore
        else:
            restore = SqliteLock(database_url).take().release
        outage_over = threading.Event()
        later: list[bool] = []
        thread = threading.Thread(target=lambda: later.extend(
            _record_from_threads(recorder, attempts[20:], threads=4)))
        thread.start()
        wait_for(lambda: not recorder.is_healthy(), seconds=60)  # a write failed
        restore()
        outage_over.set()
        thread.join(120)
    finally:
        recorder.close(30)
        if proxy is not None:
            proxy.cut()
    assert answers_first == [True] * 20
    assert later == [True] * 40
    assert recorder.recorded_attempts == 60
    delivered = delivered_recipients(app)
    assert set(delivered) == {f"r{n}@example.net" for n in range(60)}
    assert max(delivered.values()) == 1
    assert _left(app) == 0


def test_a_group_waits_for_the_threads_the_last_commit_released_not_for_a_slow_job(
        app, monkeypatch):
    # So long that a group waiting for the slow job would never commit within the test.
    monkeypatch.setattr(recorder_module, "GATHER_MAX", 600.0)
    [a1, a2, b, slow] = _leased(app, 4)
    recorder = Recorder(app, WORKER, POLICY, 300)
    recorder.start()
    slow_begun, slow_go = threading.Event(), threading.Event()
    a_begun, a_go = threading.Event(), threading.Event()
    answers: dict[str, bool] = {}

    def slow_job() -> None:
        recorder.begin()
        slow_begun.set()
        slow_go.wait(120)
        answers["slow"] = recorder.record(slow)

    def thread_a() -> None:
        recorder.begin()
        answers["a1"] = recorder.record(a1)  # the first group: no thread to wait for
        recorder.begin()  # released by that commit, on its next job
        a_begun.set()
        a_go.wait(120)
        answers["a2"] = recorder.record(a2)

    def thread_b() -> None:
        recorder.begin()
        answers["b"] = recorder.record(b)

    slow_thread = threading.Thread(target=slow_job)
    slow_thread.start()
    slow_begun.wait(30)
    a = threading.Thread(target=thread_a)
    a.start()
    try:
        assert a_begun.wait(60), "a group waited for a job still under way"
        assert answers == {"a1": True}
        committed = recorder.transactions
        b_thread = threading.Thread(target=thread_b)
        b_thread.start()
        # b's outcome waits for a's (a was released by the last commit and is on a job)...
        wait_for(lambda: recorder.busy and recorder._queue.empty(), seconds=30)
        assert "b" not in answers
        a_go.set()
        a.join(60)
        b_thread.join(60)
        # ...and both go in one commit, the slow job still under way.
        assert answers == {"a1": True, "a2": True, "b": True}
        assert recorder.transactions == committed + 1
    finally:
        a_go.set()
        slow_go.set()
        slow_thread.join(60)
        recorder.close(30)
    assert answers["slow"] is True
    assert set(delivered_recipients(app)) == {f"r{n}@example.net" for n in range(4)}


def test_a_worker_with_eight_threads_delivers_every_recipient_once(app, make_app):
    bulk_queue(app, 200)
    with Peer() as peer:
        worker = Worker(make_app(relay_host=peer.address, worker_concurrency=8))
        worker.run(once=True)
    assert_each_delivered_once(app, peer, 200)
    assert worker.recorded_attempts == 200
    assert _left(app) == 0


def test_statements_in_a_pipeline_read_and_write_as_without(app):
    [first, second] = bulk_queue(app, 2)
    with unit_of_work(app) as session, pipelined(session):
        connection = session.connection()
        connection.execute(sa.update(Message).where(Message.id == first)
                           .values(last_error="one"))
        connection.execute(sa.update(Message).where(Message.id == second)
                           .values(last_error="two"))
        # A read inside the pipeline sees the writes queued before it.
        assert connection.execute(sa.select(Message.last_error).where(Message.id == first)
                                  ).scalar_one() == "one"
        assert session.scalars(sa.select(Message.id).where(Message.last_error.is_not(None))
                               .order_by(Message.id)).all() == sorted([first, second])
        connection.execute(sa.delete(Recipient).where(Recipient.message_id == second))
    with unit_of_work(app) as session:
        assert dict(session.execute(sa.select(Message.id, Message.last_error)).all()) == {
            first: "one", second: "two"}
        assert session.scalar(sa.select(sa.func.count()).select_from(Recipient)) == 1


def _postgresql_only(database_url: str) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("pipelines are PostgreSQL's (a no-op on SQLite)")


def test_an_outage_met_at_the_end_of_a_pipeline_is_an_outage(app, make_app, database_url):
    _postgresql_only(database_url)
    [message_id] = bulk_queue(app, 1)
    url = sa.make_url(database_url)
    with TcpProxy(url.host or "127.0.0.1", url.port or 5432) as proxy:
        proxied = make_app(database_url=proxy.url_for(database_url))
        with proxied.app_context():
            session = db.session()
            with pytest.raises(sa_exc.DBAPIError) as caught:
                with pipelined(session):
                    session.connection().execute(sa.update(Message).where(
                        Message.id == message_id).values(last_error="x"))
                    # The UPDATE is queued, not answered: the connection is lost before its
                    # result, which the end of the pipeline waits for.
                    proxy.cut()
            session.rollback()
            db.session.remove()
        assert is_unreachable(caught.value), caught.value
        assert caught.value.connection_invalidated
        proxy.restore()
        # The pool recovers: the next unit of work gets a fresh connection.
        with unit_of_work(proxied) as session:
            assert session.scalar(sa.select(Message.last_error)) is None


def test_a_statement_refused_at_the_end_of_a_pipeline_is_not_an_outage(app, database_url):
    _postgresql_only(database_url)
    [message_id] = bulk_queue(app, 1)
    with pytest.raises(sa_exc.IntegrityError) as caught:
        with unit_of_work(app) as session, pipelined(session):
            session.connection().execute(
                sa.update(Recipient).where(Recipient.message_id == message_id)
                .values(address=None))
    assert not is_unreachable(caught.value)
    assert not is_transient_conflict(caught.value)
    assert not caught.value.connection_invalidated
    with unit_of_work(app) as session:  # rolled back; the connection still serves
        assert session.scalar(sa.select(Recipient.address)) == "r0@example.net"


def test_the_domain_rollup_bump_of_a_group_adds_to_existing_rows(app):
    # PostgreSQL bumps a group's rows with one upsert of arrays; counts add up as row by row.
    from app.events import bump_domain_rollup
    from app.models import DomainRollup

    hour = dt.datetime(2026, 3, 2, 10, tzinfo=dt.UTC)
    first = Counter({("hour", hour, "a.example", "delivered", "", 2): 3,
                     ("day", hour.replace(hour=0), "a.example", "delivered", "", 2): 3,
                     ("hour", hour, "b.example", "failed", "mailbox", -1): 1})
    second = Counter({("hour", hour, "a.example", "delivered", "", 2): 2,
                      ("hour", hour, "c.example", "deferred", "timeout", -1): 4})
    for increments in (first, second):
        with unit_of_work(app) as session:
            bump_domain_rollup(session, increments)
    with unit_of_work(app) as session:
        rows = {(r.grain, r.start, r.domain, r.outcome, r.failure_class, r.latency_bucket):
                r.count for r in session.scalars(sa.select(DomainRollup))}
    assert rows == dict(first + second)


def test_a_pipeline_that_commits_commits_with_its_end(app, database_url):
    # The COMMIT rides the pipeline: the write is durable when the block ends, before (and
    # whatever) the session does next; the session's own commit then sends nothing.
    _postgresql_only(database_url)
    [message_id] = bulk_queue(app, 1)
    with app.app_context():
        session = db.session()
        with pipelined(session, commit=True):
            session.connection().execute(sa.update(Message).where(Message.id == message_id)
                                         .values(last_error="committed"))
        session.rollback()  # too late: nothing left to roll back
        db.session.remove()
    with unit_of_work(app) as session:
        assert session.scalar(sa.select(Message.last_error)) == "committed"


def test_a_pipeline_that_fails_does_not_commit(app, database_url):
    _postgresql_only(database_url)
    [message_id] = bulk_queue(app, 1)
    with pytest.raises(sa_exc.IntegrityError):
        with unit_of_work(app) as session, pipelined(session, commit=True):
            connection = session.connection()
            connection.execute(sa.update(Message).where(Message.id == message_id)
                               .values(last_error="not committed"))
            connection.execute(sa.update(Recipient).where(Recipient.message_id == message_id)
                               .values(address=None))
    with unit_of_work(app) as session:
        assert session.scalar(sa.select(Message.last_error)) is None
        assert session.scalar(sa.select(Recipient.address)) == "r0@example.net"


def test_a_suppression_commits_in_the_same_transaction_as_its_outcome(app, database_url):
    # The ORM's pending suppression is flushed inside the pipeline, before the COMMIT queued
    # there, not by the session's commit afterwards (which would be a transaction of its own).
    _postgresql_only(database_url)
    [delivered, refused] = _leased(app, 2)
    [result] = refused.results
    refused.results = [RecipientResult(result.recipient_id, result.address, "rejection",
                                       "550 5.1.1 User unknown", 550, "5.1.1")]
    with unit_of_work(app) as session:
        record_outcomes(session, WORKER, [delivered, refused], POLICY)
    with unit_of_work(app) as session:
        suppressed = session.execute(sa.text(
            "SELECT address, xmin::text FROM suppressions")).one()
        outcomes = set(session.scalars(sa.text(
            "SELECT xmin::text FROM delivery_events WHERE event_type IN "
            "('delivery', 'rejection')")))
    assert suppressed[0] == result.address
    assert outcomes == {suppressed[1]}  # one transaction wrote them all


OUTCOMES = {"delivered": (250, "2.0.0", "250 2.0.0 ok"),
            "tempfail": (451, "4.3.0", "451 4.3.0 try again later"),
            "rejection": (550, "5.7.1", "550 5.7.1 refused by policy")}


def _give_outcomes(attempts, kinds) -> None:
    """Each one-recipient attempt gets the outcome of its kind (``OUTCOMES``)."""
    for attempt, kind in zip(attempts, kinds, strict=True):
        [result] = attempt.results
        code, enhanced, text = OUTCOMES[kind]
        attempt.results = [RecipientResult(result.recipient_id, result.address, kind, text,
                                           code, enhanced, "mx.example.net", "192.0.2.7")]


def test_a_group_of_mixed_outcomes_writes_what_the_read_side_recounts(app):
    # On PostgreSQL the group's events, rollups, shape deltas and DELETE are bound by hand on
    # the driver's connection (database.driver_write): what they store must be what Core
    # stored, and the rollups what a recount of the events gives.
    from app.events import rebuild_rollup
    from app.models import DeliveryRollup, DomainRollup
    from app.queue import shape

    attempts = _leased(app, 7)
    with unit_of_work(app) as session:
        shape.rebuild(session)  # bulk_queue's messages counted, as accepting counts them
    kinds = ["delivered", "tempfail", "rejection", "delivered", "tempfail", "delivered",
             "delivered"]
    _give_outcomes(attempts, kinds)
    with unit_of_work(app) as session:
        record_outcomes(session, WORKER, attempts, POLICY)
    with unit_of_work(app) as session:
        events = session.scalars(sa.select(DeliveryEvent).where(
            DeliveryEvent.event_type.in_(["delivery", "tempfail", "rejection"]))
            .order_by(DeliveryEvent.id)).all()
        # One event per outcome, in the order the attempts were handed in.
        assert [e.recipient for e in events] == [a.results[0].address for a in attempts]
        assert [e.event_type for e in events] == [
            {"delivered": "delivery"}.get(k, k) for k in kinds]
        for event, kind in zip(events, kinds, strict=True):
            assert event.timestamp.tzinfo is not None
            assert event.threats == [] and event.domain == "example.net"
            assert (event.smtp_code, event.enhanced_code) == OUTCOMES[kind][:2]
            assert (event.delivery_host, event.delivery_ip) == ("mx.example.net", "192.0.2.7")
            assert (event.latency is not None) == (kind == "delivered")
            assert (event.failure_class is not None) == (kind != "delivered")
        assert len({e.timestamp for e in events}) == 1
        # The delivered messages left the queue with their recipients and content.
        assert session.scalar(sa.select(sa.func.count()).select_from(Message)) == 3
        assert session.scalar(sa.select(sa.func.count()).select_from(Recipient)) == 3

        def rollups() -> tuple[dict, dict]:
            return ({(r.hour, r.outcome): r.count
                     for r in session.scalars(sa.select(DeliveryRollup))},
                    {(r.grain, r.start, r.domain, r.outcome, r.failure_class,
                      r.latency_bucket): r.count
                     for r in session.scalars(sa.select(DomainRollup))})

        kept = rollups()
        assert sum(kept[0].values()) == 7 and sum(kept[1].values()) == 4 * 7
        rebuild_rollup(session)
        session.expire_all()
        assert rollups() == kept
        now = utcnow()
        for by in ("domain", "sender_domain"):
            counted = shape.read_shape(session, "all", by, top=1000, now=now)
            assert {r.domain: r.buckets for r in counted.rows} == shape.direct_shape(
                session, "all", by, now)


def test_an_event_the_database_refuses_refuses_the_group(app, database_url):
    # A value too long for its column is an error on the hand-bound path too (not cut
    # silently), and a database error, judged as one: not an outage.
    from app.events import event_row, insert_event_rows

    _postgresql_only(database_url)  # SQLite does not check a varchar's length

    with pytest.raises(sa_exc.DBAPIError) as caught:
        with unit_of_work(app) as session:
            insert_event_rows(session.connection(), [
                event_row("delivery", message_id="m-ok", recipient="a@example.net",
                          message="fine"),
                event_row("delivery", message_id="m" * 65, recipient="b@example.net",
                          message="too long an id")])
    assert not is_unreachable(caught.value)
    with unit_of_work(app) as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(DeliveryEvent)) == 0


def test_the_locking_load_reads_what_core_reads(app):
    """``_lock_and_load`` (PostgreSQL: on the driver's cursor, with the timestamps converted
    by hand) gives the rows and values the Core SELECT with its result processing gives:
    aware UTC datetimes, None where NULL, recipients in id order, a missing id left out."""
    from app.queue.outcomes import _LOAD, _SPLIT, _lock_and_load

    attempts = _leased(app, 3)
    ids = sorted(a.message_id for a in attempts)
    with unit_of_work(app) as session:
        session.execute(sa.update(Recipient).where(Recipient.message_id == ids[0]).values(
            last_attempt_at=dt.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=dt.UTC),
            last_error="451 later"))
        # A second recipient on one message: rows of the join come in recipient id order.
        session.add(Recipient(message_id=ids[1], address="zed@example.net",
                              domain="example.net", status="deferred", attempts=2,
                              next_attempt_at=utcnow()))
    with unit_of_work(app) as session:
        expected: dict[str, list] = {}
        for row in session.execute(_LOAD, {"ids": ids}):
            expected.setdefault(row[0], [list(row[:_SPLIT])]).append(list(row[_SPLIT:]))
        session.rollback()
        loaded = _lock_and_load(session.connection(), [*ids, "no-such-id"], utcnow())
        got = {m.id: [[getattr(m, a) for a in ("id", "sender", "created_at", "queue_state",
                                              "attempts", "updated_at", "next_attempt_at",
                                              "last_error")]]
               + [[getattr(r, a) for a in RECIPIENT_FIELDS] for r in m.recipients]
               for m in loaded.values()}
    assert set(got) == set(ids)
    for message_id in ids:
        message, *recipients = got[message_id]
        # SQLite's touch moves updated_at to now: compare the rest there.
        assert message[:5] + message[6:] == expected[message_id][0][:5] + \
            expected[message_id][0][6:]
        assert recipients == expected[message_id][1:]
    assert len(got[ids[1]]) == 3
    for message, *recipients in got.values():
        for value in message + [v for r in recipients for v in r]:
            if isinstance(value, dt.datetime):
                assert value.tzinfo is dt.UTC
    assert got[ids[0]][1][RECIPIENT_FIELDS.index("last_attempt_at")] == dt.datetime(
        2026, 1, 2, 3, 4, 5, 678901, tzinfo=dt.UTC)


RECIPIENT_FIELDS = ("id", "address", "domain", "status", "attempts", "last_error",
                    "last_attempt_at", "next_attempt_at", "lease_owner", "lease_expires_at")


def test_busy_from_the_hand_over_until_the_commit_and_the_thread_woken_after_it(
        app, monkeypatch):
    """The hand-over (a one-shot lock per outcome, a SimpleQueue, a count of unsettled
    outcomes): ``busy`` holds from ``record`` until the group is committed, and the delivery
    thread returns only after the commit, with its outcome recorded."""
    [attempt] = _leased(app, 1)
    writing, go = threading.Event(), threading.Event()
    committed: list[bool] = []
    real = recorder_module.record_outcomes

    def slow_record(session, *args, **kwargs):
        writing.set()
        assert go.wait(60)
        real(session, *args, **kwargs)
        committed.append(True)

    monkeypatch.setattr(recorder_module, "record_outcomes", slow_record)
    recorder = Recorder(app, WORKER, POLICY, 300)
    recorder.start()
    answers: list[bool] = []
    try:
        assert not recorder.busy
        thread = threading.Thread(target=lambda: answers.append(recorder.record(attempt)))
        thread.start()
        assert writing.wait(30)
        assert recorder.busy and not answers
        go.set()
        thread.join(30)
        assert answers == [True] and committed == [True]
        wait_for(lambda: not recorder.busy, seconds=10)
    finally:
        go.set()
        recorder.close(30)
    assert delivered_recipients(app) == Counter({"r0@example.net": 1})


def test_the_pipeline_listener_is_the_engines_and_acts_only_inside_a_pipeline(
        app, database_url):
    """``pipelined`` installs its read listener on the engine once (not on each group's
    connection) and marks the open pipeline in the pooled connection's ``info``: reads inside
    each block see the writes queued before them, and the mark is gone after the block, also
    when the block failed."""
    _postgresql_only(database_url)
    from app.database import _PIPELINE

    [first] = bulk_queue(app, 1)
    for n in range(3):
        with unit_of_work(app) as session:
            with pipelined(session):
                connection = session.connection()
                connection.execute(sa.update(Message).where(Message.id == first)
                                   .values(last_error=f"try {n}"))
                assert connection.execute(sa.select(Message.last_error)
                                          .where(Message.id == first)).scalar_one() == f"try {n}"
                assert connection.connection.info[_PIPELINE] is not None
            assert _PIPELINE not in connection.connection.info
    with pytest.raises(sa_exc.DBAPIError), unit_of_work(app) as session:
        connection = session.connection()
        info = connection.connection.info
        with pipelined(session):
            connection.execute(sa.text("SELECT 1/0"))
    assert _PIPELINE not in info
    with unit_of_work(app) as session:
        assert session.scalar(sa.select(Message.last_error)) == "try 2"


def test_a_groups_last_writes_go_as_one_statement_and_store_what_they_stored(
        app, database_url, monkeypatch):
    """The group's events, DELETE, rollups and queue-shape deltas as one statement
    (``database.combined_writes``, PostgreSQL): the delivered messages leave with their
    recipients and content, the queue counts (the DELETE's statement trigger) equal a recount,
    the rollups a recount of the events, the shape the direct count."""
    from app import database
    from app.events import rebuild_rollup
    from app.models import DeliveryRollup, MessageContent
    from app.queue import counters, shape

    sent: list[str] = []
    real = database.driver_write

    def spy(connection, sql, params):
        if database._COMBINE not in connection.connection.info:
            sent.append(sql)
        return real(connection, sql, params)

    monkeypatch.setattr(database, "driver_write", spy)
    attempts = _leased(app, 6)
    with unit_of_work(app) as session:
        shape.rebuild(session)
        counters.recount(session)
        before = counters.queue_counts(session)
    assert before["pending"] == 6
    _give_outcomes(attempts, ["delivered", "tempfail"] * 3)
    with unit_of_work(app) as session:
        record_outcomes(session, WORKER, attempts, POLICY)
    if database_url.startswith("postgresql"):
        [combined] = sent  # one statement for the group's last writes
        assert combined.startswith("WITH w0 AS (INSERT INTO delivery_events")
        assert "DELETE FROM messages" in combined and "queue_shape_deltas" in combined
    gone = {a.message_id for a in attempts[::2]}
    with unit_of_work(app) as session:
        assert not set(session.scalars(sa.select(Message.id))) & gone
        assert not set(session.scalars(sa.select(Recipient.message_id))) & gone
        assert not set(session.scalars(sa.select(MessageContent.message_id))) & gone
        assert session.scalar(sa.select(sa.func.count()).select_from(MessageContent)) == 3
        counted = counters.queue_counts(session)
        assert counted["total"] == 3 and counted["deferred"] == 3
        actual = dict(session.execute(sa.select(Message.queue_state, sa.func.count())
                                      .group_by(Message.queue_state)).all())
        assert {k: v for k, v in counted.items() if v and k != "total"} == actual
    with unit_of_work(app) as session:
        assert counters.queue_counts(session) == counted
        kept = {(r.hour, r.outcome): r.count for r in session.scalars(sa.select(DeliveryRollup))}
        assert sum(kept.values()) == 6
        rebuild_rollup(session)
        session.expire_all()
        assert {(r.hour, r.outcome): r.count
                for r in session.scalars(sa.select(DeliveryRollup))} == kept
        now = utcnow()
        counted_shape = shape.read_shape(session, "all", "domain", top=1000, now=now)
        assert {r.domain: r.buckets for r in counted_shape.rows} == shape.direct_shape(
            session, "all", "domain", now)


def test_combined_writes_nested_join_the_outer_statement_in_order(app, database_url):
    _postgresql_only(database_url)
    from app.database import _COMBINE, combined_writes, driver_write

    [first, second] = sorted(bulk_queue(app, 2))
    with unit_of_work(app) as session:
        connection = session.connection()
        with combined_writes(connection):
            driver_write(connection, "UPDATE messages SET last_error = %s WHERE id = %s",
                         ["one", first])
            with combined_writes(connection):
                driver_write(connection, "UPDATE recipients SET last_error = %s "
                             "WHERE message_id = %s", ["r", first])
            assert len(connection.connection.info[_COMBINE]) == 2
            driver_write(connection, "DELETE FROM message_contents WHERE message_id = %s",
                         [second])
        assert _COMBINE not in connection.connection.info
    with unit_of_work(app) as session:
        assert session.scalar(sa.select(Message.last_error).where(Message.id == first)) == "one"
        assert session.scalar(sa.select(Recipient.last_error)
                              .where(Recipient.message_id == first)) == "r"


def test_a_job_still_running_after_the_shutdown_grace_does_not_wait_for_ever(
        app, make_app, monkeypatch):
    # SIGTERM with a transaction that outlives the grace: the worker ends (its recorder too);
    # when the transaction ends at last, its thread must not wait for a commit that nothing
    # will make (the executor's threads are joined at exit: the process would never end).
    from app.delivery import worker as worker_module
    from tests.delivery_helpers import Behaviour

    monkeypatch.setattr(worker_module, "SHUTDOWN_GRACE", 0.0)
    bulk_queue(app, 1)
    in_data, let_go = threading.Event(), threading.Event()

    def hold_data() -> None:
        in_data.set()
        let_go.wait(30)

    with Peer(Behaviour(before_data_reply=hold_data)) as peer:
        worker = Worker(make_app(relay_host=peer.address, worker_concurrency=1))
        runner = threading.Thread(target=worker.run)
        runner.start()
        try:
            assert in_data.wait(30)
            worker.stop()
            runner.join(30)
            assert not runner.is_alive()
            worker.recorder._thread.join(30)  # it ended with the worker
            assert not worker.recorder._thread.is_alive()
            late = [t for t in threading.enumerate() if t.name.startswith("elemta-delivery")]
            assert late, "the transaction under way was not left running"
            let_go.set()
            for thread in late:
                thread.join(10)
            assert not any(t.is_alive() for t in late), "a delivery thread waits for ever"
            worker.pool.close_idle(0)  # the connection it gave back (the process would end)
        finally:
            let_go.set()
            # On failure: release the thread waiting for ever, or pytest would never end.
            while not worker.recorder._queue.empty():
                item = worker.recorder._queue.get_nowait()
                if item is not None:
                    item.release()
    assert peer.recipients_received() == ["r0@example.net"]
    assert worker.recorded_attempts == 0  # given up: its lease expires, as after a crash
    with app.app_context():
        recipient = db.session.scalars(sa.select(Recipient)).one()
        assert recipient.status == "pending" and recipient.lease_owner == worker.worker_id
        db.session.remove()


def test_what_the_remote_accepted_stays_delivered_when_saving_a_backoff_fails(
        app, make_app, monkeypatch):
    # One recipient throttled (4.7.0), the other accepted, in one transaction; saving the
    # destination's backoff then meets a database error. The accepted recipient was sent:
    # recorded as a temporary failure it would be sent again at its retry.
    from app.control import limits as shared
    from app.queue.service import add_message
    from tests.delivery_helpers import Behaviour
    from tests.helpers import raw_message

    with unit_of_work(app) as session:
        message_id = add_message(session, sender="alice@example.com",
                                 recipients=["slow@example.net", "ok@example.net"],
                                 raw=raw_message(), origin="api").id

    def outage(*_args, **_kwargs):
        raise sa_exc.OperationalError("INSERT INTO backoff", {}, Exception("connection lost"))

    monkeypatch.setattr(shared, "save_backoff", outage)
    throttled = Behaviour(rcpt_replies={"slow@example.net": "450 4.7.0 Rate limited, slow down"})
    with Peer(throttled) as peer:
        worker = Worker(make_app(relay_host=peer.address))
        worker.run(once=True)
        assert peer.recipients_received() == ["ok@example.net"]
    with app.app_context():
        recipients = {r.address: r for r in db.session.scalars(
            sa.select(Recipient).where(Recipient.message_id == message_id))}
        assert recipients["ok@example.net"].status == "delivered"
        assert recipients["slow@example.net"].status == "deferred"
        db.session.remove()
    assert delivered_recipients(app) == Counter({"ok@example.net": 1})


def _lease_expiry(app) -> dt.datetime:
    with unit_of_work(app) as session:
        expiry = session.scalar(sa.select(Recipient.lease_expires_at))
    assert expiry is not None
    return expiry


def test_a_write_stuck_behind_a_lock_fails_renews_the_leases_then_records_once(
        app, database_url, monkeypatch):
    # Another session holds a claimed message's row lock (an operator's transaction, a stuck
    # client). The recorder's write must not wait for it silently past the lease (no renewal,
    # claims going on, then another worker sending again what was delivered): it fails after
    # its bound, takes the outage path (leases renewed, delivery paused), and records the
    # outcome once the lock is gone.
    if not database_url.startswith("postgresql"):
        pytest.skip("lock_timeout is PostgreSQL's; on SQLite the busy timeout (30 s) already "
                    "bounds a wait for the write lock")
    monkeypatch.setattr(recorder_module, "BACKOFF_MAX", 0.25)
    [attempt] = _leased(app, 1)
    with unit_of_work(app) as session:
        session.execute(sa.update(Recipient).values(
            lease_expires_at=utcnow() + dt.timedelta(seconds=60)))
    claimed_until = _lease_expiry(app)
    locker_engine = sa.create_engine(database_url)
    locker = locker_engine.connect()
    locker.execute(sa.select(Message.id).where(Message.id == attempt.message_id)
                   .with_for_update())
    recorder = Recorder(app, WORKER, POLICY, 300)
    recorder.lock_wait = 0.2  # the test's bound (300 s leases: 30 s)
    answers: list[bool] = []

    def deliver() -> None:
        recorder.begin()
        answers.append(recorder.record(attempt))

    thread = threading.Thread(target=deliver, daemon=True)
    recorder.start()
    try:
        thread.start()
        # Without a bound the write waits for the lock, nothing is renewed: this fails.
        wait_for(lambda: _lease_expiry(app) > claimed_until + dt.timedelta(seconds=120), 30)
        assert not recorder.is_healthy()  # the outage path: no claiming meanwhile
        assert answers == []  # still held
    finally:
        locker.rollback()
        locker.close()
        locker_engine.dispose()
        thread.join(30)
        recorder.close(30)
    assert not thread.is_alive()
    assert answers == [True]
    assert recorder.is_healthy()
    assert delivered_recipients(app) == Counter({"r0@example.net": 1})
    assert _left(app) == 0
    # SET LOCAL: the bound ended with the recorder's transactions, the pool's connections
    # came back without it.
    with unit_of_work(app) as session:
        assert session.scalar(sa.text("SHOW lock_timeout")) == "0"
