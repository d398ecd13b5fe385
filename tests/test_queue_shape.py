"""The queue shape: kept counts equal a direct GROUP BY over the queue, whatever changed it."""

from __future__ import annotations

import datetime as dt
import functools
import secrets

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.control import rules
from app.delivery.outcomes import OutcomePolicy, judge
from app.delivery.smtp_client import RecipientResult
from app.models import (
    DeliveryEvent,
    Message,
    MessageContent,
    QueueShapeCount,
    QueueShapeDelta,
    Recipient,
)
from app.queue import service, shape
from app.queue.accepting import NewMessage, add_messages
from app.queue.bulk import accept_bulk, delete_bulk
from app.queue.leases import lease_due
from app.queue.outcomes import Attempt, record_attempts
from app.queue.retention import purge_expired_failed
from app.timeutil import utcnow
from tests.helpers import assert_error

KINDS = ("domain", "sender_domain")
POLICY = OutcomePolicy(retry_schedule=[60, 300], max_queue_lifetime=3600, send_bounces=False,
                       reporting_mta="mx.test")


def kept(session, queue: str, by: str, now: dt.datetime) -> dict[str, list[int]]:
    session.expire_all()
    result = shape.read_shape(session, queue, by, top=1000, now=now)
    assert result.other_domains == 0
    return {row.domain: row.buckets for row in result.rows}


def assert_exact(session, now: dt.datetime | None = None) -> None:
    """Every queue and kind: the kept counts (with the deltas, and again after a fold) equal
    the direct computation."""
    now = now or utcnow()
    for fold in (False, True):
        if fold:
            shape.fold(session)
        for queue in shape.SHAPE_QUEUES:
            for by in KINDS:
                expected = shape.direct_shape(session, queue, by, now)
                assert kept(session, queue, by, now) == expected, (queue, by, fold)


def insert(session, specs, now: dt.datetime) -> list[str]:
    """Messages through the queue's bulk entry: (age in seconds, state, sender, [(domain,
    status)]) each."""
    messages, recipients, contents = [], [], []
    for age, state, sender, rcpts in specs:
        message_id = "msg-t" + secrets.token_hex(8)
        created = now - dt.timedelta(seconds=age)
        messages.append(dict(id=message_id, sender=sender, subject="s", size=10, priority=0,
                             queue_state=state, attempts=0, origin="api", created_at=created,
                             updated_at=created, next_attempt_at=created, last_error=None))
        for n, (domain, status) in enumerate(rcpts):
            recipients.append(dict(message_id=message_id, address=f"u{n}@{domain}",
                                   domain=domain, status=status, attempts=0,
                                   next_attempt_at=created))
        contents.append(dict(message_id=message_id, raw=b"Subject: s\r\n\r\nx\r\n"))
    accept_bulk(session, messages, recipients, contents)
    session.commit()
    return [m["id"] for m in messages]


def empty(session) -> None:
    for model in (Recipient, MessageContent, Message, QueueShapeDelta, QueueShapeCount,
                  DeliveryEvent):
        session.execute(sa.delete(model))
    session.commit()


EDGES = [0, 1] + [m * 60 + d for m in shape.AGE_EDGES for d in (-61, -1, 0, 1, 59, 60)] + \
    [2 * 86400, 30 * 86400]
states = st.sampled_from(["pending", "deferred", "held", "failed"])
senders = st.sampled_from(["a@example.com", "B@Example.COM", "", "postmaster", "x@y@Z.org",
                           "user@"])
rcpt = st.tuples(st.sampled_from(["example.net", "example.org", "mail.example"]),
                 st.sampled_from(["pending", "deferred", "delivered", "failed"]))
message_specs = st.tuples(st.sampled_from(EDGES), states, senders,
                          st.lists(rcpt, min_size=1, max_size=3))


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(specs=st.lists(message_specs, min_size=1, max_size=25),
       later=st.sampled_from([0, 1, 4, 5, 300, 400]))
def test_counts_equal_a_direct_group_by_at_every_bucket_edge(session, specs, later):
    empty(session)
    now = utcnow()
    insert(session, specs, now)
    assert_exact(session, now)
    # Time passes: the same counts, read later, move along the buckets as the direct
    # computation does (the fold merged minutes old enough for the last bucket).
    assert_exact(session, now + dt.timedelta(minutes=later))
    shape.rebuild(session)
    assert_exact(session, now + dt.timedelta(minutes=later))


def _spec(n: int) -> list:
    return [(EDGES[(n * 7 + i) % len(EDGES)], ("pending", "deferred", "held", "failed")[i % 4],
             ("a@example.com", "b@example.org", "")[i % 3],
             [("example.net", "pending"), (("example.org", "mail.example")[i % 2], "deferred")])
            for i in range(n)]


def test_operator_actions_keep_the_counts_exact(app, session):
    now = utcnow()
    ids = insert(session, _spec(40), now)
    assert_exact(session)
    with app.app_context():
        service.hold_message(session, ids[0], "t")
        service.release_message(session, ids[2], "t")
        service.retry_message(session, ids[3], "t")
        service.delete_message(session, ids[5], "t")
        assert_exact(session)
        filters = service.MessageFilters()
        service.bulk_action(session, "hold", "deferred", filters, "t")
        assert_exact(session)
        service.bulk_action(session, "release", "held",
                            service.MessageFilters(domain="example.org"), "t")
        service.bulk_action(session, "retry", "failed", filters, "t")
        assert_exact(session)
        service.bulk_action(session, "flush", "held", filters, "t")
        assert_exact(session)
        # A rule defers queued mail (a bulk action of its own) and catches new mail.
        rules.create_rule(session, domain="example.net", action="defer",
                          expires_at=now + dt.timedelta(hours=1), actor="t")
        service.accept_message(session, sender="c@example.com",
                               recipients=["x@example.net", "y@other.example"], raw=b"x",
                               origin="api")
        assert_exact(session)


def _results(session, claimed, kinds):
    by_message: dict[str, list[RecipientResult]] = {}
    for n, c in enumerate(claimed):
        kind = kinds[n % len(kinds)]
        code = {"delivered": 250, "tempfail": 451, "rejection": 550}[kind]
        by_message.setdefault(c.message_id, []).append(RecipientResult(
            recipient_id=c.id, address=c.address, kind=kind, text=f"{code} reply",
            smtp_code=code, remote_host="mx.test"))
    return [Attempt(message_id, None, results) for message_id, results in by_message.items()]


def test_deliveries_expiry_and_purge_keep_the_counts_exact(app, session):
    now = utcnow()
    # Pending mail of every age, some past the queue lifetime (3600 s here).
    insert(session, [(age, "pending", "a@example.com",
                      [("example.net", "pending"), ("example.org", "pending")])
                     for age in (10, 400, 2000, 4000, 90000)] * 3, now)
    for kinds in (("delivered", "tempfail", "rejection"), ("delivered",), ("tempfail",)):
        claimed = lease_due(session, "w1", max_messages=100, lease_seconds=60,
                            now=utcnow() + dt.timedelta(hours=1))
        record_attempts(session, "w1", _results(session, claimed, kinds),
                        functools.partial(judge, POLICY), utcnow())
        session.commit()
        assert_exact(session)
    purge_expired_failed(session, 0, now=utcnow() + dt.timedelta(seconds=1))
    assert_exact(session)
    assert session.scalar(sa.select(sa.func.count()).select_from(Message)
                          .where(Message.queue_state == "failed")) == 0


def test_bulk_delete_and_rebuild(session):
    insert(session, _spec(30), utcnow())
    delete_bulk(session, origin="api", id_prefix="msg-t", chunk=7)
    assert_exact(session)
    assert shape.read_shape(session, "all", "domain").total.total == 0
    insert(session, _spec(10), utcnow())
    session.execute(sa.update(QueueShapeCount).values(n=QueueShapeCount.n + 5))
    session.commit()
    shape.rebuild(session)
    assert_exact(session)


def test_top_and_other(session):
    now = utcnow()
    insert(session, [(30, "deferred", f"s@d{n}.example", [(f"d{n}.example", "deferred")] * n)
                     for n in range(1, 6)], now)
    result = shape.read_shape(session, "deferred", "domain", top=2, now=now)
    assert [(row.domain, row.total) for row in result.rows] == [("d5.example", 5),
                                                               ("d4.example", 4)]
    assert (result.other_domains, result.other.total) == (3, 6)
    assert result.total.total == 15 and result.total.buckets[0] == 15


def test_shape_endpoint(client, session):
    now = utcnow()
    insert(session, [(30, "deferred", "a@Example.com", [("example.net", "deferred")]),
                     (700, "deferred", "a@example.com", [("example.net", "delivered"),
                                                          ("example.org", "deferred")]),
                     (30, "held", "", [("example.net", "pending")])], now)
    body = client.get("/api/queue/shape?queue=deferred&top=1").get_json()
    assert body["buckets"] == list(shape.BUCKETS)
    assert body["counts"] == "recipients"
    assert body["domains"] == [{"domain": "example.net", "count": 1,
                                "buckets": [1, 0, 0, 0, 0, 0, 0, 0]}]
    assert body["other"] == {"domains": 1, "count": 1, "buckets": [0, 0, 1, 0, 0, 0, 0, 0]}
    assert body["total"] == {"count": 2, "buckets": [1, 0, 1, 0, 0, 0, 0, 0]}
    assert body["as_of"].endswith("Z")
    senders = client.get("/api/queue/shape?by=sender_domain").get_json()
    assert senders["counts"] == "messages"
    assert {row["domain"]: row["count"] for row in senders["domains"]} == {"example.com": 2,
                                                                           "": 1}


@pytest.mark.parametrize("query", ["queue=active", "by=recipient", "top=0", "top=x",
                                   "top=1001"])
def test_shape_bad_input_is_400(client, query):
    assert_error(client.get(f"/api/queue/shape?{query}"), 400, "VALIDATION_ERROR")


def test_shape_cli(runner, session):
    insert(session, [(30, "deferred", "a@example.com", [("example.net", "deferred")])],
           utcnow())
    result = runner.invoke(args=["queue", "shape", "--queue", "deferred"])
    assert result.exit_code == 0, result.output
    assert "example.net" in result.output and "TOTAL" in result.output
    result = runner.invoke(args=["queue", "shape", "--by", "sender_domain", "--json"])
    assert result.exit_code == 0, result.output
    assert '"counts": "messages"' in result.output


def test_group_commit_and_rules_keep_the_counts_exact(session):
    """The SMTP listener's path (``add_messages``: a batch in one transaction), with a rule
    holding part of it; and a rolled-back batch counts nothing."""
    rules.create_rule(session, domain="example.org", action="hold",
                      expires_at=utcnow() + dt.timedelta(hours=1), actor="t")
    batch = [NewMessage(sender=f"s{n}@Sender.example",
                        recipients=[f"a{n}@example.net", f"b{n}@example.org"][:1 + n % 2],
                        raw=b"Subject: x\r\n\r\nx\r\n", origin="smtp") for n in range(10)]
    add_messages(session, batch)
    session.commit()
    assert_exact(session)
    add_messages(session, [NewMessage(sender="x@y.example", recipients=["r@z.example"],
                                      raw=b"x", origin="smtp")])
    session.rollback()
    assert_exact(session)
    assert shape.read_shape(session, "held", "domain").total.total == 10
