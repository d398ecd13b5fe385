"""The listener's set-based acceptance (``add_messages``) writes exactly the rows that the
one-message path (``add_message``) writes: message, content, recipients, events, rule hits."""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa

from app.control.rules import create_rule
from app.errors import ValidationFailed
from app.extensions import db
from app.models import DeliveryEvent, Message, MessageContent, Recipient, Rule
from app.queue import service
from app.queue.counters import queue_counts
from app.timeutil import utcnow
from tests.helpers import raw_message

# (sender, recipients): caught by no rule, by the hold rule, by the defer rule; duplicates of
# one mailbox in other spellings are queued once.
CASES = [
    ("alice@example.com", ["bob@example.net", "BOB@example.net", "carol@example.org"]),
    ("mallory@spam.example", ["dave@example.net"]),
    ("erin@example.com", ["frank@slow.example", "Frank@SLOW.example"]),
]


def rows_of(session, message_id: str) -> dict:
    """Everything stored for one message, minus what differs by nature (ids, times)."""
    message = session.get(Message, message_id)
    assert message is not None
    times = {"created": message.created_at}
    return {
        "message": {c: getattr(message, c) for c in (
            "sender", "subject", "size", "priority", "queue_state", "attempts", "origin",
            "last_error")} | {"due_is_created": message.next_attempt_at == times["created"],
                              "updated_is_created": message.updated_at == times["created"]},
        "due": message.next_attempt_at if message.next_attempt_at != times["created"] else None,
        "raw": session.get(MessageContent, message_id).raw,
        "recipients": [
            (r.address, r.domain, r.status, r.attempts, r.last_error, r.last_attempt_at,
             r.next_attempt_at == message.next_attempt_at, r.lease_owner, r.lease_expires_at)
            for r in session.scalars(sa.select(Recipient).where(Recipient.message_id == message_id)
                                     .order_by(Recipient.id))],
        "events": [
            (e.event_type, e.sender, e.recipient, e.message.replace(message_id, "ID"),
             e.timestamp == times["created"], e.action, e.queue_state, e.delivery_ip,
             e.delivery_host, e.smtp_code, e.threats)
            for e in session.scalars(sa.select(DeliveryEvent)
                                     .where(DeliveryEvent.message_id == message_id)
                                     .order_by(DeliveryEvent.id))],
    }


def test_a_batch_stores_what_one_message_at_a_time_stores(app, session):
    until = (utcnow() + dt.timedelta(hours=2)).replace(microsecond=0)
    with app.app_context():
        hold = create_rule(db.session, action="hold", expires_at=until,
                           sender="mallory@spam.example", actor="test").id
        defer = create_rule(db.session, action="defer", expires_at=until, domain="slow.example",
                            actor="test").id
        db.session.remove()
    fields = {"delivery_ip": "192.0.2.1", "delivery_host": "client.example"}
    singles, batch = [], []
    with app.app_context():
        for sender, recipients in CASES:
            singles.append(service.accept_message(
                db.session, sender=sender, recipients=recipients,
                raw=raw_message(sender, recipients[0]), origin="smtp", reception_note="note",
                event_fields=dict(fields)).id)
        batch = service.add_messages(db.session, [
            service.NewMessage(sender=sender, recipients=recipients,
                               raw=raw_message(sender, recipients[0]), origin="smtp",
                               reception_note="note", event_fields=dict(fields))
            for sender, recipients in CASES])
        db.session.commit()
        db.session.remove()

    assert len(set(batch)) == 3 and all(i.startswith("msg-") for i in batch)
    for one, many in zip(singles, batch, strict=True):
        assert rows_of(session, many) == rows_of(session, one)
    states = [session.get(Message, i).queue_state for i in batch]
    assert states == ["pending", "held", "deferred"]
    assert session.get(Message, batch[2]).next_attempt_at == until
    hits = {rule_id: n for rule_id, n in session.execute(sa.select(Rule.id, Rule.hits))}
    assert hits == {hold: 2, defer: 2}
    counts = queue_counts(session)
    assert (counts["pending"], counts["held"], counts["deferred"]) == (2, 2, 2)


def test_a_batch_with_a_message_without_recipients_stores_nothing(app, session):
    with app.app_context():
        with pytest.raises(ValidationFailed):
            service.add_messages(db.session, [
                service.NewMessage(sender="a@example.com", recipients=["b@example.net"],
                                   raw=raw_message(), origin="smtp"),
                service.NewMessage(sender="a@example.com", recipients=[], raw=raw_message(),
                                   origin="smtp")])
        db.session.rollback()
        db.session.remove()
    assert session.scalar(sa.select(sa.func.count()).select_from(Message)) == 0


def _batch(tag: str) -> list[service.NewMessage]:
    """Several recipients, non-ASCII text, NULL event fields, every byte value, large bodies."""
    body = bytes(range(256)) * 64
    return [
        service.NewMessage(
            sender=f"{tag}-élodie@exämple.com", recipients=[
                "bob@example.net", "ünïcødé@exämple.org", "carol@example.org", "Bob@Example.net"],
            raw=raw_message(subject="Grüße — 日本語") + b"\r\n" + body, origin="smtp",
            reception_note=f"note {tag} ✓", event_fields={"delivery_ip": "192.0.2.1",
                                                          "delivery_host": None}),
        service.NewMessage(sender="", recipients=["postmaster@example.net"],
                           raw=raw_message() + b"x" * 300_000, origin="bounce", priority=3),
        service.NewMessage(sender=f"{tag}@example.com", recipients=[f"r{n}@d{n % 3}.example"
                                                                   for n in range(12)],
                           raw=raw_message(subject="") + b"\0\xff\xfe", origin="api"),
    ]


def _inserts_seen(app, batch: list[service.NewMessage]) -> tuple[list[str], list[str]]:
    """Queue ``batch``; returns its ids and the INSERT statements SQLAlchemy's events saw."""
    seen: list[str] = []

    def record(_conn, _cursor, statement, *_args):  # type: ignore[no-untyped-def]
        if statement.lstrip().upper().startswith("INSERT"):
            seen.append(statement)

    with app.app_context():
        engine = db.engine
        sa.event.listen(engine, "before_cursor_execute", record)
        try:
            ids = service.add_messages(db.session, batch)
            db.session.commit()
        finally:
            sa.event.remove(engine, "before_cursor_execute", record)
            db.session.remove()
    return ids, seen


def test_a_small_batch_goes_in_by_copy_on_postgresql_and_reads_back_the_same(
        app, session, monkeypatch):
    """PostgreSQL: a batch of up to 1 MiB of content is written by one binary COPY per table
    (app/copyinsert.py, unseen by before_cursor_execute); the rows read back exactly as those
    of the same batch written by the Core INSERTs, which SQLite and larger batches use."""
    from app.queue import accepting

    postgres = session.get_bind().dialect.name == "postgresql"
    copied, seen_copied = _inserts_seen(app, _batch("a"))
    monkeypatch.setattr(accepting, "SMALL_BATCH_BYTES", 0)
    core, seen_core = _inserts_seen(app, _batch("a"))
    tables = ("messages", "message_contents", "recipients", "delivery_events")
    assert [t for t in tables if any(f"INTO {t} " in s for s in seen_core)] == list(tables)
    assert [t for t in tables if any(f"INTO {t} " in s for s in seen_copied)] == (
        [] if postgres else list(tables))
    for one, other in zip(copied, core, strict=True):
        assert rows_of(session, one) == rows_of(session, other)
    stored = rows_of(session, copied[0])
    assert stored["message"]["sender"] == "a-élodie@exämple.com"
    assert stored["message"]["subject"] == "Grüße — 日本語"
    assert [r[0] for r in stored["recipients"]] == [
        "bob@example.net", "ünïcødé@exämple.org", "carol@example.org"]
    assert stored["events"][0][3] == "note a ✓" and stored["events"][0][8] is None
    assert stored["events"][0][10] == []
    assert rows_of(session, copied[2])["raw"].endswith(b"\0\xff\xfe")
    assert len(rows_of(session, copied[2])["recipients"]) == 12
    counts = queue_counts(session)
    assert counts["pending"] == 6
