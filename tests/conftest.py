"""Fixtures: every database test runs on SQLite and, when configured, on PostgreSQL.

``ELEMTA_TEST_DATABASE_URL`` names a PostgreSQL server (any database on it). The tests create a
database of their own with a unique name, migrate it with the project's migrations, and drop it
at the end, so a run never depends on, or leaves, state on a shared server.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
import sqlalchemy.orm as so
from flask import Flask
from flask.testing import FlaskClient, FlaskCliRunner

from app import create_app
from app.auth.keys import hash_key
from app.config import normalise_database_url
from app.extensions import db
from app.models import ApiKey
from app.timeutil import utcnow

PG_URL_ENV = "ELEMTA_TEST_DATABASE_URL"
BACKENDS = ["sqlite", "postgresql"]
PG_SKIP_REASON = (f"PostgreSQL tests need {PG_URL_ENV} "
                  "(e.g. postgresql+psycopg://postgres@127.0.0.1:5432/test)")

# Tables emptied between tests; queue_counts is reset rather than emptied.
DATA_TABLES = [
    "recipients", "message_contents", "messages", "delivery_events", "delivery_rollup",
    "queue_count_deltas", "queue_shape_counts", "queue_shape_deltas", "system_logs", "api_keys",
    "worker_heartbeats", "dkim_keys",
    "webhook_attempts", "webhook_deliveries", "webhooks",
    "delivery_policies", "connection_slots", "rate_counters", "destination_backoff",
    "suppressions", "rules", "domain_rollup",
]


# Every test database holds this admin key, and every test client (``client``, and the test
# client of any app from ``make_app``) sends it: tests run under the real default auth mode
# ("admin") and their operator actions are recorded as done by TEST_ADMIN_NAME. Tests of
# authentication itself use ``anonymous_client`` and keys of their own.
TEST_ADMIN_NAME = "test-admin"
TEST_ADMIN_KEY = "elemta_test-admin-key-0123456789abcdefghijklmnopqrstuvwxyz"


class AdminKeyClient(FlaskClient):
    """A test client whose requests carry the test admin key unless told otherwise."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {TEST_ADMIN_KEY}"


def insert_test_admin_key(conn: sa.Connection) -> None:
    conn.execute(sa.insert(ApiKey.__table__).values(
        name=TEST_ADMIN_NAME, prefix=TEST_ADMIN_KEY[:12], key_hash=hash_key(TEST_ADMIN_KEY),
        role="admin", created_at=utcnow(), expires_at=None, revoked=False, last_used_at=None))


def _pg_admin_dsn(url: str, dbname: str | None = None) -> str:
    parsed = sa.make_url(normalise_database_url(url))
    if dbname:
        parsed = parsed.set(database=dbname)
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


def migrate_database(url: str) -> None:
    from flask_migrate import upgrade

    app = create_app({"DATABASE_URL": url, "TESTING": True})
    with app.app_context():
        upgrade()
        with db.engine.begin() as conn:
            insert_test_admin_key(conn)
        db.engine.dispose()


@dataclass(frozen=True)
class ScratchDatabase:
    url: str  # postgresql+psycopg://.../name
    admin: str  # libpq DSN of the server's maintenance database
    name: str


@contextmanager
def scratch_postgresql_database(prefix: str, *, migrate: bool = True,
                                server: str | None = None) -> Iterator[ScratchDatabase]:
    """A PostgreSQL database of its own on the test server, dropped (forcibly) afterwards.

    The server is shared and not reset between runs: the name is unique and nothing is left.
    """
    server = server or os.environ[PG_URL_ENV]
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = _pg_admin_dsn(server)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = sa.make_url(normalise_database_url(server)).set(database=name)
    try:
        scratch = ScratchDatabase(url.render_as_string(hide_password=False), admin, name)
        if migrate:
            migrate_database(scratch.url)
        yield scratch
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def backend_pids(admin: str, name: str) -> set[int]:
    """The server processes connected to database ``name`` right now."""
    with psycopg.connect(admin, autocommit=True) as conn:
        return {pid for (pid,) in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s", (name,))}


def terminate_backends(admin: str, pids: set[int] | list[int]) -> None:
    """Terminate these server processes and wait until they are gone (no time asserted):
    pg_terminate_backend only signals."""
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid",
                     (list(pids),))
        while conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)",
                           (list(pids),)).fetchone()[0]:
            time.sleep(0.05)


@pytest.fixture
def own_postgresql_database(database_url: str) -> Iterator[tuple[str, str, str]]:
    """(url, admin DSN, name) of a database of this test alone, whose backends it may
    terminate without hurting other tests; skipped on SQLite."""
    if not database_url.startswith("postgresql"):
        pytest.skip("terminates PostgreSQL backends")
    with scratch_postgresql_database("elemta_own") as scratch:
        yield scratch.url, scratch.admin, scratch.name


@pytest.fixture(scope="session", params=BACKENDS)
def database_url(request: pytest.FixtureRequest,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A migrated, empty database of this test run, on each backend."""
    if request.param == "sqlite":
        path = tmp_path_factory.mktemp("db") / "elemta-test.db"
        url = f"sqlite:///{path}"
        migrate_database(url)
        yield url
        return
    server = os.environ.get(PG_URL_ENV)
    if not server:
        pytest.skip(PG_SKIP_REASON)
    with scratch_postgresql_database("elemta_test", server=server) as scratch:
        yield scratch.url


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator:
    """Every test skipped for want of PostgreSQL reports this file as its place.

    ``-ra`` (setup.cfg) folds skips by place and reason: a SQLite-only run then prints one
    ``SKIPPED [n] tests/conftest.py: PostgreSQL tests need ...`` line, not one per test module
    and line, while the other skip reasons keep their places.
    """
    report = yield
    if (report.skipped and isinstance(report.longrepr, tuple)
            and str(report.longrepr[2]).endswith(PG_SKIP_REASON)):
        report.longrepr = (__file__, None, report.longrepr[2])
    return report


def empty_database(app: Flask) -> None:
    with app.app_context():
        with db.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(sa.text(f"TRUNCATE {', '.join(DATA_TABLES)} RESTART IDENTITY"))
            else:
                for table in DATA_TABLES:
                    conn.execute(sa.text(f"DELETE FROM {table}"))
            conn.execute(sa.text("UPDATE queue_counts SET n = 0"))
            insert_test_admin_key(conn)


@pytest.fixture
def make_app(database_url: str) -> Iterator:
    """Build apps on this test's database with extra config; all are disposed afterwards."""
    apps: list[Flask] = []

    def factory(**config: object) -> Flask:
        settings = {"DATABASE_URL": database_url, "TESTING": True}
        settings.update({k.upper(): v for k, v in config.items()})
        app = create_app(settings)
        app.test_client_class = AdminKeyClient
        apps.append(app)
        return app

    yield factory
    for app in apps:
        with app.app_context():
            db.session.remove()
            db.engine.dispose()


@pytest.fixture
def fresh_app(make_app) -> Callable[..., Flask]:
    """``make_app`` on this test's database emptied first: a listener test starts from no rows."""

    def factory(**config: object) -> Flask:
        app = make_app(**config)
        empty_database(app)
        return app

    return factory


@pytest.fixture
def app(make_app) -> Iterator[Flask]:
    application = make_app()
    empty_database(application)
    yield application


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def anonymous_client(app: Flask) -> FlaskClient:
    """A client that sends no API key (for authentication tests)."""
    return FlaskClient(app, app.response_class, use_cookies=True)


@pytest.fixture
def runner(app: Flask) -> FlaskCliRunner:
    return app.test_cli_runner()


@pytest.fixture
def session(app: Flask) -> Iterator[so.Session]:
    """The test's own database session, for arranging and checking state.

    Not the app's ``db.session``, and no app context is held while the test runs: a request of
    the test client pushes its own context and gets its own session, as in production. Holding a
    context here made every request reuse it, so requests shared the test's session (identity
    map, transaction) and its ``g``, and state left by one request leaked into the next
    (docs/ARCHITECTURE.md, "Tests"). A test that calls something needing the app (a service
    reading ``current_app.config``) wraps that call in ``with app.app_context():``.
    """
    with app.app_context():
        engine = db.engine
    with so.Session(engine) as own:
        yield own


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request, tmp_path) -> Iterator[str]:
    """An empty, unmigrated database for a migration test (a PostgreSQL scratch one, or skip)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/migration.db"
        return
    if not os.environ.get(PG_URL_ENV):
        pytest.skip(f"PostgreSQL tests need {PG_URL_ENV}")
    with scratch_postgresql_database("elemta_mig", migrate=False) as scratch:
        yield scratch.url


def schema_drift(connection: sa.Connection, tables: set[str]) -> list:
    """Differences between the migrated schema and the models, for these tables only."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    diffs = compare_metadata(MigrationContext.configure(connection), db.metadata)
    return [d for d in diffs if any(table in repr(d) for table in tables)]


def assert_migration_round_trip(database_url: str, tables: set[str], down_to: str,
                                left_alone: set[str] = frozenset()) -> None:
    """The revision that adds ``tables``: after ``upgrade`` its schema is the models', a
    downgrade to ``down_to`` removes exactly them (``left_alone``, tables of the revisions
    below, stay), and an upgrade brings them back the same."""
    from flask_migrate import downgrade, upgrade

    app = create_app({"DATABASE_URL": database_url, "TESTING": True})
    with app.app_context():
        try:
            upgrade()
            with db.engine.connect() as conn:
                assert tables <= set(sa.inspect(conn).get_table_names())
                assert schema_drift(conn, tables) == []
            downgrade(revision=down_to)
            with db.engine.connect() as conn:
                names = set(sa.inspect(conn).get_table_names())
                assert not tables & names
                assert left_alone <= names
            upgrade()
            with db.engine.connect() as conn:
                assert schema_drift(conn, tables) == []
        finally:
            db.session.remove()
            db.engine.dispose()


def plan_of(client, session, url: str, marker: str) -> list[dict]:
    """The executed plan (EXPLAIN ANALYZE, no timing) of the statement of ``url`` that
    contains ``marker``: its nodes, flattened."""
    engine = session.get_bind()
    statements: list[tuple[str, Any]] = []

    def capture(conn, cursor, statement, parameters, context, executemany):
        if marker in statement:
            statements.append((statement, parameters))

    sa.event.listen(engine, "before_cursor_execute", capture)
    try:
        assert client.get(url).status_code == 200
    finally:
        sa.event.remove(engine, "before_cursor_execute", capture)
    [(statement, parameters)] = statements
    with engine.connect() as conn:
        [[plan]] = conn.exec_driver_sql(
            f"EXPLAIN (ANALYZE, TIMING OFF, FORMAT JSON) {statement}", parameters).all()

    def nodes(node):
        yield node
        for child in node.get("Plans", []):
            yield from nodes(child)

    return list(nodes(plan[0]["Plan"]))
