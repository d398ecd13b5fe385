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
* ``check_idle_connection`` replaces ``pool_pre_ping``: an idle pooled connection to which the
  server has sent nothing is alive as far as a round trip could tell. A server that terminates a
  backend (``pg_terminate_backend``, a restart, ``idle_session_timeout``) sends a FATAL error and
  closes the socket, which makes it readable; only then is the connection really pinged, and a
  failed ping invalidates the pool exactly as ``pool_pre_ping`` does, so the first request after
  a database restart gets a fresh connection instead of an error.

SQLite is untouched: pysqlite begins no transaction before a SELECT, and nothing is remote.

The end of the module says what a database error means (a transient conflict, a database that
cannot be reached, anything else), names it for the logs, and retries a transaction that met
a transient conflict (``retry_on_conflict``).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import random
import select
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import flask_sqlalchemy.session
import sqlalchemy as sa
import sqlalchemy.exc as sa_exc
import sqlalchemy.orm as so
from flask import Flask, current_app, has_request_context, request

log = logging.getLogger("elemta.database")

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
    """``db.session``: autocommit reads for GET/HEAD requests on PostgreSQL (module docstring).

    The session reads on the engine's own connections: when its transaction begins on one
    (``after_begin``, before any statement) psycopg's autocommit flag is set directly, and the
    pool clears it when the connection comes back (``_clear_autocommit``). The same as an
    AUTOCOMMIT engine (``autocommit_engine``) without SQLAlchemy's isolation-level switch and
    reset on every checkout and checkin (docs/PERFORMANCE.md).
    """

    def __init__(self, db: Any, **kwargs: Any) -> None:
        super().__init__(db, **kwargs)
        self.autocommit_reads = reads_autocommit()

    def transactional_bind(self, **kwargs: Any) -> sa.Engine | sa.Connection:
        return super().get_bind(**kwargs)


@sa.event.listens_for(Session, "after_begin")
def _autocommit_read(session: Session, _transaction: Any, connection: sa.Connection) -> None:
    if session.autocommit_reads and connection.dialect.name == "postgresql":
        dbapi_connection: Any = connection.connection.dbapi_connection
        if not dbapi_connection.autocommit:
            dbapi_connection.autocommit = True


@sa.event.listens_for(sa.pool.Pool, "checkin")
def _clear_autocommit(dbapi_connection: Any, record: Any) -> None:
    """A connection goes back to the pool with its transactions, whoever set autocommit."""
    if (getattr(dbapi_connection, "pgconn", None) is not None  # psycopg, not SQLite's own flag
            and dbapi_connection.autocommit):
        try:
            dbapi_connection.autocommit = False
        except Exception as exc:  # a broken connection: replaced at its next checkout
            record.invalidate(exc)


@contextlib.contextmanager
def writable(session: so.Session | so.scoped_session[Any]) -> Iterator[so.Session]:
    """A session whose statements share one transaction, for a unit of work that must be atomic.

    ``session`` itself, unless it is an autocommit read session: then a short-lived session on
    the same engine (and pool) with a transaction of its own, closed at the end.
    """
    current: so.Session = session() if isinstance(session, so.scoped_session) else session
    if isinstance(current, Session) and current.autocommit_reads:
        bind = current.transactional_bind()
        if isinstance(bind, sa.Engine) and bind.dialect.name == "postgresql":
            with so.Session(bind=bind) as writer:
                yield writer
            return
    yield current


def reads_autocommit() -> bool:
    """Whether this is a GET/HEAD request, whose session reads on an autocommit connection."""
    return has_request_context() and request.method in AUTOCOMMIT_METHODS


class DriverRead:
    """One fixed Core SELECT (no parameters) whose rows are read through the driver's cursor.

    Given the scoped ``db.session`` in a GET/HEAD request that has not used its session yet,
    the statement (compiled once per dialect) runs on a raw DBAPI connection of the engine's
    pool, in autocommit on PostgreSQL as that session's would be (psycopg's flag is set and
    restored directly, no SQLAlchemy isolation switch), without the ORM session, the Core
    ``Connection``, its execution context and result machinery: for ``/api/queue/stats`` those
    cost more CPU than the statement (docs/PERFORMANCE.md). A driver error takes SQLAlchemy's
    own path: translated by ``Connection._handle_dbapi_exception_noconnection`` into the same
    ``sqlalchemy.exc`` class (so the API still answers the contract's 503), and a lost
    connection invalidates the pool as a ``Connection`` would (``Pool._invalidate``). In every
    other case (a session in use, whose transaction and writes the read must see; outside
    requests; other methods) the statement runs on the session's connection, as before.
    """

    def __init__(self, statement: sa.Select[Any]) -> None:
        self.statement = statement
        self._sql: dict[str, str] = {}

    def rows(self, session: so.Session | so.scoped_session[Any]) -> Sequence[Sequence[Any]]:
        if isinstance(session, so.scoped_session):
            if not session.registry.has() and reads_autocommit():
                return self.on_driver(current_app.extensions["sqlalchemy"].engine)
            session = session()
        return session.connection().execute(self.statement).all()

    def sql(self, dialect: sa.Dialect) -> str:
        found = self._sql.get(dialect.name)
        if found is None:
            compiled = self.statement.compile(dialect=dialect)
            if compiled.params:
                raise ValueError("DriverRead runs statements without parameters only")
            found = self._sql[dialect.name] = str(compiled)
        return found

    def on_driver(self, engine: sa.Engine) -> Sequence[Sequence[Any]]:
        dialect = engine.dialect
        dbapi_error = dialect.loaded_dbapi.Error
        sql = self.sql(dialect)
        try:
            fairy = engine.raw_connection()
        except dbapi_error as exc:  # as Connection() does for a failed checkout
            sa.Connection._handle_dbapi_exception_noconnection(exc, dialect, engine)
        postgresql = dialect.name == "postgresql"
        connection: Any = fairy.dbapi_connection  # a checked-out fairy always has one
        try:
            if postgresql:
                connection.autocommit = True
            cursor = connection.cursor()
            try:
                cursor.execute(sql)
                rows: Sequence[Sequence[Any]] = cursor.fetchall()
            finally:
                cursor.close()
            if postgresql:
                connection.autocommit = False
        except dbapi_error as exc:
            lost = dialect.is_disconnect(exc, connection, None)
            if lost:  # every pooled connection of this generation is replaced, as SQLAlchemy does
                engine.pool._invalidate(fairy, exc)
            elif postgresql:
                try:
                    connection.autocommit = False
                except Exception:
                    fairy.invalidate(exc)
            fairy.close()
            sa.Connection._handle_dbapi_exception_noconnection(
                exc, dialect, engine, is_disconnect=lost)
        except BaseException:
            fairy.invalidate()
            fairy.close()
            raise
        fairy.close()
        return rows


@contextlib.contextmanager
def unit_of_work(app: Flask) -> Iterator[so.Session]:
    """One unit of work outside a request: the app context and its ``db.session``.

    Commits when the block ends, rolls back when it raises, and removes the session either
    way, so a failure leaves nothing half-written and no connection checked out. The worker,
    the SMTP listener's storage threads and the metrics scrape run their database work in one.
    Services called inside commit or not as their docstrings say; the final commit is the
    wrapper's, for the services that leave it to their caller.
    """
    with app.app_context():
        scoped: so.scoped_session[Any] = app.extensions["sqlalchemy"].session
        session = scoped()  # this context's Session, the object db.session stands for
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            scoped.remove()


@sa.event.listens_for(sa.pool.Pool, "checkout")
def check_idle_connection(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
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


# --------------------------------------------------------------------------- error classes
# What a database error means for the caller (docs/OPERATIONS.md, "Database errors"):
#  - a transient conflict (deadlock, serialization failure, lock timeout; SQLite busy): the
#    database is healthy, the same transaction run again will most likely succeed;
#  - unavailable: the server cannot be reached or cannot work at all (connection lost or
#    refused, shutting down, out of disk or connections): the API answers 503;
#  - anything else: a bug or bad data, 500.

CONFLICT_SQLSTATES = frozenset({"40001", "40P01", "55P03"})
# SQLSTATE classes of a server that cannot serve: 08 connection exception, 53 insufficient
# resources, 58 system error; 57P01-57P05: shut down, crashed, starting, dropped, idle timeout.
UNAVAILABLE_SQLSTATE_CLASSES = frozenset({"08", "53", "58"})
UNAVAILABLE_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "57P04", "57P05"})
SQLITE_BUSY, SQLITE_LOCKED = 5, 6


def error_code(error: BaseException) -> tuple[str, str] | None:
    """The driver's code for a database error: ``("SQLSTATE", "40P01")`` from PostgreSQL,
    ``("SQLite", "SQLITE_BUSY")`` from SQLite, None when the driver gave none."""
    origin = getattr(error, "orig", None) or error
    state = getattr(origin, "sqlstate", None)
    if state:
        return "SQLSTATE", str(state)
    name = getattr(origin, "sqlite_errorname", None)
    if name:
        return "SQLite", str(name)
    return None


def is_transient_conflict(error: BaseException) -> bool:
    """A deadlock, serialization failure or lock timeout: run the transaction again."""
    if not isinstance(error, sa_exc.DBAPIError):
        return False
    origin = error.orig
    if getattr(origin, "sqlstate", None) in CONFLICT_SQLSTATES:
        return True
    code = getattr(origin, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (SQLITE_BUSY, SQLITE_LOCKED)


def is_unreachable(error: BaseException) -> bool:
    """The database cannot be reached or cannot work at all (not: it refused this statement)."""
    if isinstance(error, sa_exc.InterfaceError):
        return True
    if not isinstance(error, sa_exc.DBAPIError):
        return False
    if error.connection_invalidated:
        return True
    if not isinstance(error, sa_exc.OperationalError) or is_transient_conflict(error):
        return False
    state = getattr(error.orig, "sqlstate", None)
    if state is None:  # no server answer at all (psycopg), or SQLite's own I/O, open, full
        return True
    return state[:2] in UNAVAILABLE_SQLSTATE_CLASSES or state in UNAVAILABLE_SQLSTATES


def describe_error(error: BaseException) -> str:
    """For logs: the error's class, the driver's class and code, and the first line of the
    driver's message (without the SQL and parameters SQLAlchemy appends)."""
    origin = getattr(error, "orig", None) or error
    lines = str(origin).strip().splitlines()
    code = error_code(error)
    driver = f"{type(origin).__module__}.{type(origin).__qualname__}"
    if code is not None:
        driver += f", {code[0]} {code[1]}"
    text = f"{type(error).__name__} ({driver})" if origin is not error else type(error).__name__
    return f"{text}: {lines[0]}" if lines else text


# Tries of one transaction that meets transient conflicts, and the pause before the next try
# (doubled each time, with jitter, so two transactions that deadlocked do not meet again).
CONFLICT_TRIES = 5
CONFLICT_FIRST_PAUSE = 0.02

T = TypeVar("T")


def retry_on_conflict(session: so.Session, work: Callable[[], T], *, what: str,
                      tries: int = CONFLICT_TRIES) -> T:
    """Run ``work()`` and commit, as one transaction; on a transient conflict roll back and run
    it again (``tries`` times in all). Other errors, and the last conflict, are raised after
    the rollback. ``work`` must do everything the transaction does (it starts afresh)."""
    for attempt in range(1, tries + 1):
        try:
            result = work()
            session.commit()
            return result
        except Exception as exc:
            session.rollback()
            if attempt == tries or not is_transient_conflict(exc):
                raise
            pause = CONFLICT_FIRST_PAUSE * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)
            log.info("%s: %s; trying again in %.0f ms (%d of %d)", what, describe_error(exc),
                     pause * 1000, attempt + 1, tries)
            time.sleep(pause)
    raise AssertionError("unreachable")  # pragma: no cover


# --------------------------------------------------------------------------- pipelines


@contextlib.contextmanager
def pipelined(session: so.Session, *, commit: bool = False) -> Iterator[None]:
    """Run the block's statements on PostgreSQL in one psycopg pipeline; no-op on SQLite.

    Statements whose results nobody reads (UPDATE, INSERT, DELETE without RETURNING) are only
    queued: the server gets them with the next statement whose result is read, or with the
    COMMIT, so a transaction of a dozen writes costs two or three round trips instead of a
    dozen (the delivery recorder: docs/PERFORMANCE.md, "Delivery, the recorder in one
    pipeline"). What the statements do, and in which order, is unchanged.

    An error of a queued statement surfaces at the next synchronisation point: inside
    SQLAlchemy (a read, the COMMIT), which wraps it as usual, or at the end of the block, where
    it is wrapped here the same way (``sqlalchemy.exc.DBAPIError`` of the driver's class, the
    connection invalidated when it is lost), so the callers' judgement of database errors
    (``is_unreachable``, ``is_transient_conflict``) holds inside a pipeline too.

    ``commit``: when the block ends without an error, a COMMIT is queued behind its writes, so
    the pipeline's end answers both in one round trip instead of the end and then the COMMIT;
    the caller's ``session.commit()`` that follows finds the transaction committed (psycopg
    sends nothing for a connection with no transaction open) and only does the session's
    bookkeeping. The COMMIT goes on the DBAPI connection itself: the session's commit would
    hand the connection back to the pool with the pipeline still open on it. The session is
    flushed before it; whatever is written after the block (a ``before_commit`` hook's writes)
    would start a transaction of its own, so everything of the transaction belongs in the block
    (``shape.write_noted`` is called in it). A COMMIT that fails is raised at the block's end like
    any queued statement's error; on SQLite the caller's ``session.commit()`` commits as usual.
    """
    connection = session.connection()
    dbapi_connection: Any = connection.connection.dbapi_connection
    if connection.dialect.name != "postgresql" or not hasattr(dbapi_connection, "pipeline"):
        yield
        return
    driver_error: Any = connection.dialect.loaded_dbapi.Error
    _listen_for_pipelines(connection.engine)
    info = connection.connection.info  # the pooled connection's, where the listener looks
    try:
        with dbapi_connection.pipeline() as pipeline:
            info[_PIPELINE] = pipeline
            try:
                yield
                if commit:
                    # What the ORM holds (a suppression added by a failure's outcome) is
                    # flushed into the transaction first (its INSERT reads back the id: the
                    # listener syncs), not after the COMMIT by the session's commit.
                    session.flush()
            finally:
                info.pop(_PIPELINE, None)
            if commit:
                dbapi_connection.execute(b"COMMIT")  # answered at the pipeline's end
    except driver_error as exc:
        raise _wrapped(connection, dbapi_connection, exc) from exc


_PIPELINE = "elemta.pipeline"  # the open psycopg pipeline, in the pooled connection's info
_pipelined_engines: weakref.WeakSet[sa.Engine] = weakref.WeakSet()


def _listen_for_pipelines(engine: sa.Engine) -> None:
    """Install ``_read_now`` on the engine once. Listening on each group's connection and
    removing the listener again (as ``pipelined`` did) cost SQLAlchemy's event registry about
    a twentieth of the delivery recorder's CPU a group (docs/PERFORMANCE.md); the engine's
    listener finds the pipeline in the connection's ``info`` and does nothing without one."""
    if engine not in _pipelined_engines:
        with _lock:
            if engine not in _pipelined_engines:
                sa.event.listen(engine, "after_cursor_execute", _read_now)
                _pipelined_engines.add(engine)


def _read_now(conn: sa.Connection, _cursor: Any, _statement: str, _parameters: Any,
              context: Any, _many: bool) -> None:
    # SQLAlchemy reads the cursor's description as soon as the statement ran: inside a
    # pipeline, a statement whose rows are read must have its result now, not at the COMMIT.
    pipeline = conn.connection.info.get(_PIPELINE)
    if pipeline is not None and _returns_rows(context):
        pipeline.sync()


def _wrapped(connection: sa.Connection, dbapi_connection: Any, exc: Any) -> BaseException:
    """A driver's error as SQLAlchemy would raise it (the connection invalidated when lost)."""
    lost = bool(connection.dialect.is_disconnect(exc, dbapi_connection, None))
    if lost and not connection.invalidated:
        connection.invalidate(exc)
    return sa_exc.DBAPIError.instance(None, None, exc, connection.dialect.loaded_dbapi.Error,
                                      connection_invalidated=lost)


def json_rows(rows: Sequence[Any]) -> str:
    """Rows (dicts of column values) as one JSON parameter for ``driver_write``'s
    ``SELECT ... FROM json_populate_recordset(NULL::<table>, %s)``: the server converts each
    value with its column's type (a string too long for its ``varchar(n)`` is an error, as
    through Core), the client only runs ``json.dumps`` (in C). Datetimes go as ISO 8601 in
    UTC, as ``UTCDateTime`` binds them (a naive one is refused). One parameter whatever the
    number of rows: psycopg parses a query of more than 50 parameters again every time."""
    return json.dumps(rows, default=_json_value, separators=(",", ":"))


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            raise ValueError("UTCDateTime needs an aware datetime")
        return value.astimezone(datetime.UTC).isoformat()
    raise TypeError(f"{type(value).__name__} is not a column value")


def driver_write(connection: sa.Connection, sql: str, params: Sequence[Any]) -> None:
    """A write whose result nobody reads (INSERT, UPDATE, DELETE without RETURNING), its SQL
    written for psycopg, run on the driver's connection in the transaction of ``connection``
    (PostgreSQL only): inside ``pipelined`` it is only queued. SQLAlchemy's execution (a
    compiled statement's context, its bind processing: a few hundred Python calls a
    statement) is skipped, and so are its ``before_cursor_execute`` listeners and echo; the
    caller converts the values itself. A driver's error is raised as SQLAlchemy's would be."""
    combining = connection.connection.info.get(_COMBINE)
    if combining is not None:
        combining.append((sql, params))
        return
    dbapi_connection: Any = connection.connection.dbapi_connection
    try:
        dbapi_connection.execute(sql, params)
    except connection.dialect.loaded_dbapi.Error as exc:
        raise _wrapped(connection, dbapi_connection, exc) from exc


def bound_lock_waits(connection: sa.Connection, seconds: float | None) -> None:
    """PostgreSQL: the rest of ``connection``'s transaction waits at most ``seconds`` for a
    lock (``SET LOCAL lock_timeout``); a longer wait fails the statement with SQLSTATE 55P03,
    a transient conflict. For the delivery recorder, whose writes must not wait past its
    claims' lease (docs/DELIVERY.md, "A write that hangs"). Inside ``pipelined`` it is only
    queued with the transaction's first statements: no round trip of its own. ``LOCAL``: the
    setting ends with the transaction, so the pooled connection goes back as it came. SQLite:
    nothing (its busy timeout already bounds a wait for the write lock)."""
    if seconds is None or connection.dialect.name != "postgresql":
        return
    driver_write(connection, f"SET LOCAL lock_timeout = {max(1, int(seconds * 1000))}", ())


_COMBINE = "elemta.combine"  # the writes ``combined_writes`` holds, in the connection's info
_combined_sql: dict[tuple[str, ...], str] = {}


@contextlib.contextmanager
def combined_writes(connection: sa.Connection) -> Iterator[None]:
    """The block's ``driver_write`` statements sent as one statement when it ends (PostgreSQL;
    a no-op elsewhere): ``WITH w0 AS (first), w1 AS (second) ... last``, their parameters in
    order. One Execute (and psycopg's per-statement work) instead of one each: the delivery
    recorder's writes at the end of a group (events, the rollups, the DELETE, the queue-shape
    deltas) were five (docs/PERFORMANCE.md, "Delivery, the recorder's fixed cost a commit").

    Only for writes that do not depend on each other: PostgreSQL runs the sub-statements of
    one statement on one snapshot, none sees another's rows, and their order is unspecified
    (the same table must not be written twice). Nothing else may run on the connection inside
    the block (a read, a Core statement would come before the held writes). A statement's
    error fails the combined one, raised as ``driver_write`` raises it; on an error inside the
    block nothing held is sent."""
    if connection.dialect.name != "postgresql":
        yield
        return
    info = connection.connection.info
    if _COMBINE in info:  # inside another block: its writes join that block's statement
        yield
        return
    held: list[tuple[str, Sequence[Any]]] = []
    info[_COMBINE] = held
    try:
        yield
    finally:
        info.pop(_COMBINE, None)
    if not held:
        return
    if len(held) == 1:
        driver_write(connection, *held[0])
        return
    key = tuple(sql for sql, _ in held)
    sql = _combined_sql.get(key)
    if sql is None:
        *first, last = key
        sql = "WITH " + ", ".join(f"w{n} AS ({text})" for n, text in enumerate(first)) + \
            " " + last
        if len(_combined_sql) < 256:  # a handful of shapes in practice
            _combined_sql[key] = sql
    driver_write(connection, sql, [value for _, params in held for value in params])


def driver_read(connection: sa.Connection, sql: str, params: Sequence[Any]) -> list[Any]:
    """The rows of a read (a SELECT, a locking one included), its SQL written for psycopg, run
    on the driver's cursor in the transaction of ``connection`` (PostgreSQL only), as lists of
    the values psycopg loads: no SQLAlchemy execution context, no result processing (the caller
    converts what needs it; ``timestamptz`` comes in the session's zone). Inside ``pipelined``
    the fetch syncs the pipeline, so the writes queued before it are answered first. A
    driver's error is raised as SQLAlchemy's would be (``driver_write``)."""
    dbapi_connection: Any = connection.connection.dbapi_connection
    try:
        with dbapi_connection.cursor(row_factory=_list_row) as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall()
    except connection.dialect.loaded_dbapi.Error as exc:
        raise _wrapped(connection, dbapi_connection, exc) from exc


def _list_row(_cursor: Any) -> Callable[[Sequence[Any]], list[Any]]:
    return list


def _returns_rows(context: Any) -> bool:
    """Whether a statement's result is read (a SELECT, RETURNING, text that is not a plain
    write); the writes of ``pipelined`` need no answer before the next one."""
    compiled = getattr(context, "compiled", None)
    if compiled is None:
        return True
    if context.isinsert or context.isupdate or context.isdelete:
        # (Their statements count as returning rows in SQLAlchemy's class tree.)
        return bool(getattr(compiled, "effective_returning", None))
    statement = compiled.statement
    if isinstance(statement, sa.TextClause):
        text = statement.text.lstrip().upper()
        return not text.startswith(("INSERT", "UPDATE", "DELETE")) or "RETURNING" in text
    return bool(getattr(statement, "_is_returns_rows", False))
