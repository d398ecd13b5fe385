"""The delivery recorder (app/delivery/recorder.py) and the pipeline its writes go in.

On PostgreSQL a group's outcomes are written in one psycopg pipeline (``database.pipelined``):
its statements must still read what they read, and an error that surfaces only when the
pipeline ends must be judged as SQLAlchemy's errors are (an outage is an outage).
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa
import sqlalchemy.exc as sa_exc

from app.database import is_transient_conflict, is_unreachable, pipelined, unit_of_work
from app.extensions import db
from app.models import Message, Recipient
from tests.delivery_helpers import bulk_queue
from tests.fault_helpers import TcpProxy


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
