"""Migration 0008 (queue shape): the schema is the models', it goes down and up cleanly, and
an upgrade of a database with queued mail fills the counts from it."""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from flask_migrate import downgrade, upgrade

from app import create_app
from app.extensions import db
from app.models import Message, MessageContent, Recipient
from app.queue import shape
from app.timeutil import utcnow
from tests.conftest import schema_drift

TABLES = {"queue_shape_counts", "queue_shape_deltas"}


def test_0008_matches_the_models_and_counts_the_queue_it_finds(empty_url):
    app = create_app({"DATABASE_URL": empty_url, "TESTING": True})
    now = utcnow()
    with app.app_context():
        try:
            upgrade(revision="0006")
            with db.engine.begin() as conn:  # mail queued before the shape existed
                for n, (state, sender, age) in enumerate([
                        ("deferred", "a@Example.COM", 30), ("held", "", 700),
                        ("failed", "b@example.org", 90000), ("pending", "postmaster", 0)]):
                    created = now - dt.timedelta(seconds=age)
                    conn.execute(sa.insert(Message.__table__).values(
                        id=f"msg-old{n:08d}", sender=sender, subject="s", size=1, priority=0,
                        queue_state=state, attempts=0, origin="api", created_at=created,
                        updated_at=created, next_attempt_at=created))
                    conn.execute(sa.insert(MessageContent.__table__).values(
                        message_id=f"msg-old{n:08d}", raw=b"x"))
                    for status, domain in (("deferred", "example.net"),
                                           ("delivered", "example.org")):
                        conn.execute(sa.insert(Recipient.__table__).values(
                            message_id=f"msg-old{n:08d}", address=f"x@{domain}",
                            domain=domain, status=status, attempts=0))
            upgrade()
            with db.engine.connect() as conn:
                assert schema_drift(conn, TABLES) == []
            for queue in shape.SHAPE_QUEUES:
                for by in ("domain", "sender_domain"):
                    kept = shape.read_shape(db.session, queue, by, top=1000, now=now)
                    assert {r.domain: r.buckets for r in kept.rows} == \
                        shape.direct_shape(db.session, queue, by, now), (queue, by)
            db.session.remove()
            downgrade(revision="0006")
            with db.engine.connect() as conn:
                assert not TABLES & set(sa.inspect(conn).get_table_names())
            upgrade()
        finally:
            db.session.remove()
            db.engine.dispose()
