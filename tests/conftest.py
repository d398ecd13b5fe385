"""Fixtures: every database test runs on SQLite and, when configured, on PostgreSQL.

``ELEMTA_TEST_DATABASE_URL`` names a PostgreSQL server (any database on it). The tests create a
database of their own with a unique name, migrate it with the project's migrations, and drop it
at the end, so a run never depends on, or leaves, state on a shared server.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg
import pytest
import sqlalchemy as sa
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

# Tables emptied between tests; queue_counts is reset rather than emptied.
DATA_TABLES = [
    "recipients", "message_contents", "messages", "delivery_events", "delivery_rollup",
    "queue_count_deltas", "system_logs", "api_keys", "worker_heartbeats", "dkim_keys",
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
        pytest.skip(f"PostgreSQL tests need {PG_URL_ENV} "
                    "(e.g. postgresql+psycopg://postgres@127.0.0.1:5432/test)")
    with scratch_postgresql_database("elemta_test", server=server) as scratch:
        yield scratch.url


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
def session(app: Flask) -> Iterator:
    """A database session inside an app context, for arranging and checking state."""
    with app.app_context():
        yield db.session
        db.session.remove()
