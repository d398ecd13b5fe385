"""``CopyInsert`` (app/copyinsert.py): a binary COPY writes what Core's INSERT writes."""

from __future__ import annotations

import datetime as dt
from typing import cast

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from app.copyinsert import CopyInsert, wire_type
from app.extensions import db
from app.models import DeliveryEvent, Message, MessageContent, Recipient, SystemLog

EVENTS = cast(sa.Table, DeliveryEvent.__table__)
COLUMNS = tuple(c.name for c in EVENTS.c if c.name != "id")


def _row(**values):  # type: ignore[no-untyped-def]
    row = dict.fromkeys(COLUMNS)
    row.update(values)
    return row


ROWS = [
    _row(timestamp=dt.datetime(2026, 12, 4, 14, 0, 1, 123456, tzinfo=dt.UTC),
         event_type="delivery", message_id="msg-a", sender="a-élodie@exämple.com",
         recipient="日本語@example.org", delivery_ip="192.0.2.1", delivery_host="mx.example",
         smtp_code=250, enhanced_code="2.0.0", spam_score=1.5, threats=["x", {"k": 1}],
         message="ok ✓ \\ \t tab", action="delivered", queue_state="pending",
         failure_class="none", domain="example.org", latency=0.25),
    _row(timestamp=dt.datetime(2026, 12, 4, 15, 0, tzinfo=dt.timezone(dt.timedelta(hours=2))),
         event_type="reception", threats=[], smtp_code=-32768, spam_score=0.0, latency=1e300),
]


def test_every_column_the_listener_copies_has_a_binary_wire_type():
    dialect = postgresql.psycopg.dialect()  # type: ignore[attr-defined]
    for model in (Message, MessageContent, Recipient, DeliveryEvent, SystemLog):
        table = cast(sa.Table, model.__table__)
        assert [wire_type(c, dialect) for c in table.c]  # raises for an unknown type


def test_a_copy_reads_back_as_the_same_rows_inserted_by_core(app, session):
    if session.get_bind().dialect.name != "postgresql":
        pytest.skip("COPY is PostgreSQL's")
    copy = CopyInsert(EVENTS, COLUMNS)
    with app.app_context():
        connection = db.session.connection()
        connection.execute(sa.insert(EVENTS), [dict(r, message_id="core") for r in ROWS])
        copy.execute(connection, [tuple(dict(r, message_id="copy")[c] for c in COLUMNS)
                                  for r in ROWS])
        db.session.commit()
        db.session.remove()

    def stored(message_id):  # type: ignore[no-untyped-def]
        rows = session.scalars(sa.select(DeliveryEvent).where(
            DeliveryEvent.message_id == message_id).order_by(DeliveryEvent.id)).all()
        return [{c: getattr(r, c) for c in COLUMNS if c != "message_id"} for r in rows]

    assert stored("copy") == stored("core")
    assert len(stored("copy")) == 2
    assert stored("copy")[1]["timestamp"] == dt.datetime(2026, 12, 4, 13, 0, tzinfo=dt.UTC)


def test_a_naive_datetime_is_refused_as_by_core(app, session):
    if session.get_bind().dialect.name != "postgresql":
        pytest.skip("COPY is PostgreSQL's")
    copy = CopyInsert(EVENTS, COLUMNS)
    naive = tuple(dict(ROWS[1], timestamp=dt.datetime(2026, 12, 4))[c] for c in COLUMNS)
    with app.app_context():
        with pytest.raises(ValueError, match="aware"):
            copy.execute(db.session.connection(), [naive])
        db.session.rollback()
        db.session.remove()


def test_a_value_too_long_for_its_column_fails_the_copy_and_its_transaction(app, session):
    """As Core's INSERT does (an unnest cast to varchar(n)[] cut it silently)."""
    if session.get_bind().dialect.name != "postgresql":
        pytest.skip("COPY is PostgreSQL's")
    copy = CopyInsert(EVENTS, COLUMNS)
    long = tuple(dict(ROWS[1], enhanced_code="x" * 17)[c] for c in COLUMNS)
    with app.app_context():
        with pytest.raises(Exception, match="too long"):
            copy.execute(db.session.connection(), [tuple(dict(ROWS[1])[c] for c in COLUMNS),
                                                   long])
        db.session.rollback()
        db.session.remove()
    assert session.scalar(sa.select(sa.func.count()).select_from(DeliveryEvent)) == 0
