"""app/database.py: autocommit reads for GET requests, and the pre-ping that costs no round trip.

The guarantees kept from before: a read answers exactly as inside a transaction, a fold of the
queue counters stays one transaction, and the first request after the server dropped every
connection (a restart, pg_terminate_backend) succeeds instead of failing.
"""

from __future__ import annotations

import psycopg
import pytest
import sqlalchemy as sa
from flask.testing import FlaskClient

from app.database import DriverRead, Session, check_idle_connection, writable
from app.extensions import db
from app.models import QueueCountDelta
from app.queue import counters
from tests.conftest import backend_pids, terminate_backends
from tests.helpers import queue_message


def _dbapi_connection():
    return db.session.connection().connection.dbapi_connection


def test_get_requests_read_in_autocommit_on_postgresql_only(app, database_url) -> None:
    postgresql = database_url.startswith("postgresql")
    for method, autocommit in (("GET", True), ("HEAD", True), ("POST", False),
                               ("DELETE", False)):
        with app.test_request_context("/api/queue/stats", method=method):
            connection = _dbapi_connection()
            if postgresql:
                assert connection.autocommit is autocommit, method
            db.session.remove()
    # Outside a request (CLI, worker, tests): transactions as ever.
    with app.app_context():
        if postgresql:
            assert _dbapi_connection().autocommit is False
        db.session.remove()


def test_writable_gives_a_transaction_to_an_autocommit_session(app, database_url) -> None:
    with app.test_request_context("/api/queue/stats", method="GET"):
        with writable(db.session) as writer:
            if database_url.startswith("postgresql"):
                assert writer is not db.session()
                assert writer.connection().connection.dbapi_connection.autocommit is False
            else:
                assert writer is db.session()
        db.session.remove()
    with app.test_request_context("/api/queue/message/x/hold", method="POST"):
        with writable(db.session) as writer:
            assert writer is db.session()
        db.session.remove()


def test_a_get_request_folds_the_counters_in_one_transaction(app, client, monkeypatch) -> None:
    with app.app_context():
        for state in ("pending", "deferred", "held", "failed", "held"):
            queue_message(db.session, state=state)
        db.session.remove()
    monkeypatch.setattr(counters, "FOLD_THRESHOLD", 3)
    folds = []
    fold = counters.fold_deltas

    def spy(session):
        folds.append(session.connection().connection.dbapi_connection)
        return fold(session)

    monkeypatch.setattr(counters, "fold_deltas", spy)
    response = client.get("/api/queue/stats")
    assert response.status_code == 200
    assert response.get_json() == {"pending": 1, "deferred": 1, "held": 2, "failed": 1,
                                   "total": 5}
    assert len(folds) == 1
    assert getattr(folds[0], "autocommit", False) is False
    with app.app_context():
        assert db.session.scalar(sa.select(sa.func.count()).select_from(QueueCountDelta)) == 0
        db.session.remove()
    assert client.get("/api/queue/stats").get_json()["total"] == 5


def test_a_get_request_reads_the_counts_without_creating_a_session(
        app, client, anonymous_client, monkeypatch) -> None:
    with app.app_context():
        for state in ("pending", "held", "held"):
            queue_message(db.session, state=state)
        db.session.remove()
    made = []
    init = Session.__init__

    def spy(self, *args, **kwargs):
        made.append(self)
        init(self, *args, **kwargs)

    monkeypatch.setattr(Session, "__init__", spy)
    expected = {"pending": 1, "deferred": 0, "held": 2, "failed": 0, "total": 3}
    response = anonymous_client.get("/api/queue/stats")
    assert response.status_code == 200
    assert response.get_json() == expected
    assert made == []
    # With a key, the check already made the request's session: the read uses it.
    response = client.get("/api/queue/stats")
    assert response.get_json() == expected
    assert len(made) == 1


def test_a_driver_read_uses_the_pool_or_the_session_wherever_a_session_could_matter(
        app, database_url, monkeypatch) -> None:
    postgresql = database_url.startswith("postgresql")
    with app.app_context():
        engine = db.engine
    seen, modes = [], []
    read = DriverRead(sa.select(sa.literal_column("1")))
    checkout = engine.raw_connection

    def spy():
        fairy = checkout()
        seen.append(fairy)
        if postgresql and len(seen) == 1:
            dbapi = fairy.dbapi_connection
            execute = dbapi.cursor

            def cursor():  # autocommit while the statement runs, as the session's would be
                modes.append(dbapi.autocommit)
                return execute()

            monkeypatch.setattr(dbapi, "cursor", cursor)
        return fairy

    monkeypatch.setattr(engine, "raw_connection", spy)
    with app.test_request_context("/api/queue/stats", method="GET"):
        assert [tuple(row) for row in read.rows(db.session)] == [(1,)]
        assert not db.session.registry.has()
        [fairy] = seen
        assert fairy.dbapi_connection is None  # back to the pool
        assert modes == ([True] if postgresql else [])
        # A session already in use in this request: its connection (its transaction, its
        # uncommitted writes).
        mine = db.session().connection()
        checked_out = len(seen)
        assert [tuple(row) for row in read.rows(db.session)] == [(1,)]
        assert len(seen) == checked_out and not mine.closed
        db.session.remove()
    monkeypatch.undo()
    if postgresql:  # the pooled connection went back with its transactions
        with engine.connect() as connection:
            assert connection.connection.dbapi_connection.autocommit is False
    # Not a GET request, or no request at all: the session's own connection.
    for context in (app.test_request_context("/api/queue/message/x/hold", method="POST"),
                    app.app_context()):
        with context:
            assert [tuple(row) for row in read.rows(db.session)] == [(1,)]
            assert db.session.registry.has()
            db.session.remove()
    with pytest.raises(ValueError):
        DriverRead(sa.select(sa.literal(1))).sql(engine.dialect)


def test_a_driver_read_of_a_missing_table_is_the_contracts_503(make_app, tmp_path) -> None:
    """Not migrated: the driver's error reaches the handler as SQLAlchemy's, 503."""
    app = make_app(database_url=f"sqlite:///{tmp_path / 'empty.db'}")
    response = FlaskClient(app, app.response_class).get("/api/queue/stats")
    assert response.status_code == 503
    assert response.get_json()["code"] == "SERVICE_UNAVAILABLE"


def _terminate_backends(admin: str, name: str) -> None:
    """Every backend of the app's database gone, so the requests below meet dead connections."""
    pids = backend_pids(admin, name)
    assert pids, "the app's pool should hold a connection"
    terminate_backends(admin, pids)


def test_the_first_requests_after_the_server_dropped_every_connection_succeed(
        make_app, own_postgresql_database) -> None:
    url, admin, name = own_postgresql_database
    app = make_app(database_url=url)
    client = app.test_client()
    anonymous = FlaskClient(app, app.response_class)
    assert client.get("/api/queue/stats").status_code == 200
    assert client.post("/api/queue/pending/hold?dry_run=true").status_code == 200

    _terminate_backends(admin, name)
    # Without a key: a key check meeting a dead connection would be retried by the view's own
    # checkout, hiding what this is about.
    response = anonymous.get("/api/queue/stats")  # an autocommit read
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["total"] == 0

    _terminate_backends(admin, name)
    response = client.post("/api/queue/pending/hold?dry_run=true")  # a transaction
    assert response.status_code == 200, response.get_json()

    _terminate_backends(admin, name)
    response = anonymous.get("/api/health")
    assert response.status_code == 200
    assert response.get_json()["database"]["status"] == "ok"


def test_a_driver_read_on_a_dead_connection_is_503_and_invalidates_the_pool(
        make_app, own_postgresql_database) -> None:
    """The statement itself meets the dead connection (the checkout's check put aside): the
    driver's error is translated as SQLAlchemy translates it, the answer is the contract's
    503, and the pool is invalidated, so the next request reads on a fresh connection."""
    url, admin, name = own_postgresql_database
    app = make_app(database_url=url)
    anonymous = FlaskClient(app, app.response_class)  # no key: no session, the driver read
    assert anonymous.get("/api/queue/stats").status_code == 200
    with app.app_context():
        pool = db.engine.pool
    before = pool._invalidate_time
    _terminate_backends(admin, name)
    sa.event.remove(sa.pool.Pool, "checkout", check_idle_connection)
    try:
        response = anonymous.get("/api/queue/stats")
    finally:
        sa.event.listen(sa.pool.Pool, "checkout", check_idle_connection)
    assert response.status_code == 503, response.get_json()
    assert response.get_json()["code"] == "SERVICE_UNAVAILABLE"
    assert pool._invalidate_time > before
    response = anonymous.get("/api/queue/stats")
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["total"] == 0


def test_a_driver_read_error_is_sqlalchemys_with_the_connection_invalidated(
        make_app, own_postgresql_database) -> None:
    url, admin, name = own_postgresql_database
    app = make_app(database_url=url)
    read = DriverRead(sa.select(sa.literal_column("1")))
    with app.test_request_context("/api/queue/stats", method="GET"):
        assert [tuple(row) for row in read.rows(db.session)] == [(1,)]
        _terminate_backends(admin, name)
        sa.event.remove(sa.pool.Pool, "checkout", check_idle_connection)
        try:
            with pytest.raises(sa.exc.OperationalError) as raised:
                read.rows(db.session)
        finally:
            sa.event.listen(sa.pool.Pool, "checkout", check_idle_connection)
        assert raised.value.connection_invalidated is True
        assert isinstance(raised.value.orig, psycopg.OperationalError)
        assert [tuple(row) for row in read.rows(db.session)] == [(1,)]


def test_a_get_requests_session_sets_autocommit_itself_and_the_pool_clears_it(
        app, database_url, monkeypatch) -> None:
    """No SQLAlchemy isolation-level switch at checkout and reset at checkin: psycopg's flag
    is set when the session's transaction begins, and cleared when the connection is back."""
    if not database_url.startswith("postgresql"):
        pytest.skip("psycopg's autocommit")
    with app.app_context():
        dialect = db.engine.dialect
    switches = []
    for name in ("set_isolation_level", "reset_isolation_level"):
        monkeypatch.setattr(dialect, name, lambda *args, name=name: switches.append(name))
    with app.test_request_context("/api/queue/stats", method="GET"):
        connection = _dbapi_connection()
        assert connection.autocommit is True
        db.session.remove()
    assert connection.autocommit is False  # back in the pool, with its transactions
    with app.test_request_context("/api/queue/message/x/hold", method="POST"):
        assert _dbapi_connection() is connection and connection.autocommit is False
        db.session.remove()
    assert switches == []
