"""How the API talks to PostgreSQL per request: few round trips, same answers.

A one-statement read such as ``/api/queue/stats`` used to cost four round trips to the server,
whose CPU sits on the same cores as the API's: ``pool_pre_ping``'s ping at checkout, psycopg's
``BEGIN`` (psycopg 3 sends it as a command of its own before the first statement), the statement
and the ``ROLLBACK`` at teardown (docs/PERFORMANCE.md). Two changes leave one:

* ``Session``: a session created for a GET or HEAD request reads on an AUTOCOMMIT connection
  (psycopg 3's autocommit is a client-side flag: no BEGIN, nothing to roll back). The project
  runs PostgreSQL at READ COMMITTED, where every statement of a transaction takes a snapshot of
  its own anyway, so a read sees exactly what it saw inside a transaction. Writes made by a GET
  are single statements (an API key's last-used time), atomic by themselves; the queue
  counters' fold, which must be one transaction, opens one of its own (``writable``). The mode
  is fixed when the session is created: sessions of the CLI, the worker, the listener, tests
  and non-GET requests keep their transactions.
* ``_check_idle_connection`` replaces ``pool_pre_ping``: an idle pooled connection to which the
  server has sent nothing is alive as far as a round trip could tell. A server that terminates a
  backend (``pg_terminate_backend``, a restart, ``idle_session_timeout``) sends a FATAL error and
  closes the socket, which makes it readable; only then is the connection really pinged, and a
  failed ping invalidates the pool exactly as ``pool_pre_ping`` does, so the first request after
  a database restart gets a fresh connection instead of an error.

SQLite is untouched: pysqlite begins no transaction before a SELECT, and nothing is remote.
"""

from __future__ import annotations

import contextlib
import select
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import flask_sqlalchemy.session
import sqlalchemy as sa
import sqlalchemy.exc as sa_exc
import sqlalchemy.orm as so
from flask import Flask, has_request_context, request

AUTOCOMMIT_METHODS = frozenset({"GET", "HEAD"})

_autocommit_engines: weakref.WeakKeyDictionary[sa.Engine, sa.Engine] = \
    weakref.WeakKeyDictionary()
_lock = threading.Lock()


def autocommit_engine(engine: sa.Engine) -> sa.Engine:
    """The same engine (and pool) with AUTOCOMMIT connections; made once per engine."""
    found = _autocommit_engines.get(engine)
    if found is None:
        with _lock:
            found = _autocommit_engines.get(engine)
            if found is None:
                found = engine.execution_options(isolation_level="AUTOCOMMIT")
                _autocommit_engines[engine] = found
    return found


class Session(flask_sqlalchemy.session.Session):
    """``db.session``: autocommit reads for GET/HEAD requests on PostgreSQL (module docstring)."""

    def __init__(self, db: Any, **kwargs: Any) -> None:
        super().__init__(db, **kwargs)
        self.autocommit_reads = has_request_context() and request.method in AUTOCOMMIT_METHODS

    def transactional_bind(self, **kwargs: Any) -> sa.Engine | sa.Connection:
        return super().get_bind(**kwargs)

    def get_bind(self, mapper: Any | None = None, clause: Any | None = None,
                 bind: sa.Engine | sa.Connection | None = None,
                 **kwargs: Any) -> sa.Engine | sa.Connection:
        engine = super().get_bind(mapper, clause, bind, **kwargs)
        if (self.autocommit_reads and bind is None and isinstance(engine, sa.Engine)
                and engine.dialect.name == "postgresql"):
            return autocommit_engine(engine)
        return engine


@contextlib.contextmanager
def writable(session: so.Session | so.scoped_session[Any]) -> Iterator[so.Session]:
    """A session whose statements share one transaction, for a unit of work that must be atomic.

    ``session`` itself, unless it is an autocommit read session: then a short-lived session on
    the same engine (and pool) with a transaction of its own, closed at the end.
    """
    if isinstance(session, so.scoped_session):
        session = session()
    if isinstance(session, Session) and session.autocommit_reads:
        bind = session.transactional_bind()
        if isinstance(bind, sa.Engine) and bind.dialect.name == "postgresql":
            with so.Session(bind=bind) as writer:
                yield writer
            return
    yield session


@contextlib.contextmanager
def unit_of_work(app: Flask) -> Iterator[so.scoped_session[Any]]:
    """One unit of work outside a request: the app context and its ``db.session``.

    Commits when the block ends, rolls back when it raises, and removes the session either
    way, so a failure leaves nothing half-written and no connection checked out. The worker,
    the SMTP listener's storage threads and the metrics scrape run their database work in one.
    Services called inside commit or not as their docstrings say; the final commit is the
    wrapper's, for the services that leave it to their caller.
    """
    with app.app_context():
        session = app.extensions["sqlalchemy"].session
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.remove()


@sa.event.listens_for(sa.pool.Pool, "checkout")
def _check_idle_connection(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """``pool_pre_ping`` without a round trip while the server has said nothing (docstring)."""
    pgconn = getattr(dbapi_connection, "pgconn", None)
    if pgconn is None:  # not psycopg (SQLite)
        return
    try:
        if dbapi_connection.closed:
            raise OSError("connection closed")
        fd = pgconn.socket  # raises when libpq has already seen the connection fail
    except Exception as exc:
        raise sa_exc.InvalidatePoolError(f"connection unusable: {exc}") from exc
    poller = select.poll()  # not select.select: a descriptor may be above FD_SETSIZE
    poller.register(fd, select.POLLIN)
    if not poller.poll(0):
        return
    # Something arrived on an idle connection: a FATAL before a close, the close itself, or a
    # harmless asynchronous notice. A real ping reads it and tells which.
    before = dbapi_connection.autocommit
    try:
        if not before:
            dbapi_connection.autocommit = True
        dbapi_connection.execute("SELECT 1")
        if not before:
            dbapi_connection.autocommit = False
    except Exception as exc:
        # As pool_pre_ping does: a server that dropped one connection most likely dropped them
        # all (a restart), so every pooled connection older than now is replaced.
        raise sa_exc.InvalidatePoolError(f"pre-checkout ping failed: {exc}") from exc
