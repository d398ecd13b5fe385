"""The database logging handler (API.md §4.1): every process's records, never in the way.

Each test installs the process's handler through ``create_app`` (``LOG_TO_DATABASE`` is off by
default under TESTING) and shuts it down afterwards; no thread survives a test.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from flask.testing import FlaskClient

from app.extensions import db
from app.logging_setup import detect_role
from app.logs.handler import (
    MAX_RETRY_PAUSE,
    DatabaseLogHandler,
    install_database_logging,
    installed_handler,
    set_process_role,
    shutdown_database_logging,
)
from app.models import SystemLog
from app.timeutil import utcnow

from .conftest import _pg_admin_dsn, empty_database
from .helpers import assert_error

ROOT = Path(__file__).resolve().parent.parent


def wait_until(predicate, timeout: float = 30.0) -> None:
    """Poll a condition (a deadline against hanging, not a speed assertion)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.02)


def drain_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "elemta-db-log"]


@pytest.fixture
def logging_app(make_app):
    """Apps whose process stores its log records in their database."""

    def factory(empty: bool = True, **config):
        settings = {"log_to_database": True, "log_flush_interval": 0.05}
        settings.update(config)
        app = make_app(**settings)
        if empty:
            empty_database(app)
        return app

    yield factory
    shutdown_database_logging()
    assert drain_threads() == []


def stored(app, logger: str) -> list[SystemLog]:
    with app.app_context():
        rows = db.session.scalars(sa.select(SystemLog).where(SystemLog.logger == logger)
                                  .order_by(SystemLog.id)).all()
        db.session.remove()
        return list(rows)


def test_records_reach_the_table_through_the_api(logging_app):
    app = logging_app()
    handler = installed_handler()
    log = logging.getLogger("elemta.test.api")
    log.info("first")
    log.error("second %s", "formatted")
    assert handler.drain()
    body = app.test_client().get("/api/logs?level=info").get_json()
    mine = [item for item in body["logs"] if item["logger"] == "elemta.test.api"]
    assert [(i["level"], i["message"]) for i in mine] == [("error", "second formatted"),
                                                          ("info", "first")]
    assert {i["process"] for i in mine} == {f"{detect_role()}:{os.getpid()}"}
    set_process_role("smtpd")
    log.warning("third")
    handler.flush()
    assert stored(app, "elemta.test.api")[-1].process == f"smtpd:{os.getpid()}"


def test_one_handler_per_process(logging_app, make_app):
    first = logging_app()
    handler = installed_handler()
    logging_app(empty=False)
    assert installed_handler() is handler
    assert install_database_logging(first) is handler
    make_app()  # TESTING without LOG_TO_DATABASE: leaves the process's handler alone
    make_app(log_to_database="false")
    assert installed_handler() is handler
    ours = [h for h in logging.getLogger().handlers if isinstance(h, DatabaseLogHandler)]
    assert ours == [handler]
    assert len(drain_threads()) == 1


def test_which_records_are_stored(logging_app):
    app = logging_app(log_level="info")
    handler = installed_handler()
    logging.getLogger("elemta.test.which").debug("app debug")
    logging.getLogger("elemta.test.which").info("app info")
    logging.getLogger("aiosmtpd.test").info("library info")
    logging.getLogger("aiosmtpd.test").warning("library warning")
    handler.flush()
    assert [r.message for r in stored(app, "elemta.test.which")] == ["app info"]
    assert [r.message for r in stored(app, "aiosmtpd.test")] == ["library warning"]


def test_debug_level_keeps_libraries_at_warning(logging_app):
    app = logging_app(log_level="debug")
    handler = installed_handler()
    logging.getLogger("elemta.test.debug").debug("app debug")
    logging.getLogger("gunicorn.test").info("library info")
    handler.flush()
    assert [(r.level, r.levelno) for r in stored(app, "elemta.test.debug")] == [("debug", 10)]
    assert stored(app, "gunicorn.test") == []


def test_records_made_while_writing_are_not_stored(logging_app):
    """No recursion: whatever the drain thread logs (SQL echo, drivers, listeners) is ignored."""
    app = logging_app()
    handler = installed_handler()

    def log_inside(*_args):
        logging.getLogger("elemta.test.inside").error("logged while writing")

    sa.event.listen(handler._engine, "before_cursor_execute", log_inside)
    # On PostgreSQL the batch is a binary COPY, which cursor events do not see: the
    # transaction's begin, also in the drain thread, logs there too.
    sa.event.listen(handler._engine, "begin", log_inside)
    sql_logger = logging.getLogger("sqlalchemy.engine")
    previous = sql_logger.level
    sql_logger.setLevel(logging.INFO)  # every INSERT of the handler is logged
    try:
        outside = logging.getLogger("elemta.test.outside")
        outside.error("one")
        assert handler.drain()
        logging.getLogger("sqlalchemy.pool").warning("never stored")
        logging.getLogger("elemta.logs.handler").error("never stored")
        outside.error("two")
        assert handler.drain()
    finally:
        sql_logger.setLevel(previous)
        sa.event.remove(handler._engine, "before_cursor_execute", log_inside)
        sa.event.remove(handler._engine, "begin", log_inside)
    assert [r.message for r in stored(app, "elemta.test.outside")] == ["one", "two"]
    assert stored(app, "elemta.test.inside") == []
    assert stored(app, "sqlalchemy.pool") == [] and stored(app, "elemta.logs.handler") == []
    assert handler.dropped == 0


def test_awkward_records_are_stored_safely(logging_app):
    app = logging_app()
    handler = installed_handler()
    log = logging.getLogger("elemta.test.awkward")
    # Bad %-arguments (pytest's own capture handler would raise on them, so the record goes
    # to this handler alone): stored as written, nothing raised into the caller.
    assert handler.handle(logging.LogRecord("elemta.test.awkward", logging.ERROR, __file__, 1,
                                            "%d items", ("not a number",), None))
    # A lone surrogate, straight to the handler too: in pytest's captured log it would reach
    # pytest-xdist's report to the controller, whose UTF-8 encoding raises (INTERNALERROR).
    assert handler.handle(logging.LogRecord("elemta.test.awkward", logging.WARNING, __file__, 1,
                                            "nul \x00 byte and a lone \udc80 surrogate", None,
                                            None))
    try:
        raise ValueError("bad thing")
    except ValueError:
        log.exception("it failed")
    log.info("x" * 10000)
    handler.flush()
    messages = [r.message for r in stored(app, "elemta.test.awkward")]
    assert messages[0].startswith("%d items")
    assert messages[1].startswith("nul \\0 byte and a lone ")
    assert messages[2] == "it failed [ValueError: bad thing]"
    assert len(messages[3]) == 4000


def test_records_of_another_process_reach_the_table(logging_app, database_url):
    app = logging_app()
    script = ("import logging\n"
              "from app import create_app\n"
              "create_app()\n"
              "logging.getLogger('elemta.test.child').warning('from the child process')\n")
    env = dict(os.environ, ELEMTA_DATABASE_URL=database_url, ELEMTA_PROCESS_ROLE="worker",
               ELEMTA_LOG_TO_DATABASE="true")
    child = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err.decode()
    # Written by the child's exit-time flush: nothing waits for it here but the child itself.
    [row] = stored(app, "elemta.test.child")
    assert (row.level, row.message, row.process) == ("warn", "from the child process",
                                                     f"worker:{child.pid}")


def test_a_forked_child_writes_through_its_own_thread(logging_app):
    """gunicorn with preload_app forks after create_app: the child starts its own drain."""
    app = logging_app()
    handler = installed_handler()
    logging.getLogger("elemta.test.fork").warning("parent before")
    handler.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            logging.getLogger("elemta.test.fork").warning("child")
            shutdown_database_logging()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    logging.getLogger("elemta.test.fork").warning("parent after")
    handler.flush()
    rows = stored(app, "elemta.test.fork")
    assert sorted((r.message, r.process.rsplit(":", 1)[1]) for r in rows) == sorted([
        ("parent before", str(os.getpid())), ("child", str(pid)),
        ("parent after", str(os.getpid()))])


def _unreachable_url(database_url: str, tmp_path: Path) -> str:
    if database_url.startswith("sqlite"):
        return f"sqlite:///{tmp_path}/no-such-directory/elemta.db"
    return "postgresql+psycopg://postgres@127.0.0.1:1/elemta"


def test_a_database_that_is_down_changes_nothing_for_the_application(logging_app, database_url,
                                                                     tmp_path):
    app = logging_app(empty=False, database_url=_unreachable_url(database_url, tmp_path),
                      log_queue_size=20)
    handler = installed_handler()
    log = logging.getLogger("elemta.test.down")
    log.error("the first record finds the database down")
    wait_until(lambda: handler.failures >= 1)
    for number in range(200):  # nothing raises, nothing waits: the queue fills, then drops
        log.error("record %d", number)
    assert handler.dropped_full >= 200 - 20
    client = FlaskClient(app, app.response_class)
    assert client.get("/livez").status_code == 200
    assert client.get("/api/openapi.json").status_code == 200
    assert_error(client.get("/api/logs"), 503, "SERVICE_UNAVAILABLE")
    assert handler.written == 0
    shutdown_database_logging()  # gives up on the queued records at once
    assert drain_threads() == []


def create_log_table(url: str) -> None:
    # Not the migrations: alembic's env.py runs logging.config.fileConfig, which closes every
    # handler of the process (this one included) - fine for `flask db upgrade`, not here.
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            SystemLog.__table__.create(conn)
    finally:
        engine.dispose()


def _database_that_appears_later(database_url: str, tmp_path: Path):
    if database_url.startswith("sqlite"):
        path = tmp_path / "later" / "elemta.db"
        url = f"sqlite:///{path}"

        def create() -> None:
            path.parent.mkdir()
            create_log_table(url)

        return url, create, lambda: None
    name = f"elemta_test_later_{uuid.uuid4().hex[:8]}"
    url = sa.make_url(database_url).set(database=name).render_as_string(hide_password=False)

    def create_pg() -> None:
        with psycopg.connect(_pg_admin_dsn(database_url), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        create_log_table(url)

    def drop_pg() -> None:
        with psycopg.connect(_pg_admin_dsn(database_url), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return url, create_pg, drop_pg


def test_writing_resumes_when_the_database_is_back(logging_app, database_url, tmp_path):
    url, create, drop = _database_that_appears_later(database_url, tmp_path)
    try:
        app = logging_app(empty=False, database_url=url)
        handler = installed_handler()
        log = logging.getLogger("elemta.test.resume")
        log.error("logged while the database is missing")
        wait_until(lambda: handler.failures >= 1)
        create()
        # The handler retries with a growing pause (up to MAX_RETRY_PAUSE): on a loaded machine
        # creating the database takes long enough for the pause to reach its maximum.
        wait_until(lambda: handler.written >= 1, timeout=2 * MAX_RETRY_PAUSE + 30)
        log.error("logged after it came back")
        assert handler.drain()
        assert [r.message for r in stored(app, "elemta.test.resume")] == [
            "logged while the database is missing", "logged after it came back"]
        assert handler.failures == 0
        shutdown_database_logging()
    finally:
        drop()


def test_old_records_are_pruned_automatically(logging_app):
    app = logging_app(log_retention=3600, log_prune_interval=0.05)
    handler = installed_handler()
    with app.app_context():
        db.session.add_all([
            SystemLog(timestamp=utcnow() - dt.timedelta(hours=2),
                      levelno=20, level="info", logger="elemta.test.prune", message="old",
                      process="api:1"),
            SystemLog(timestamp=utcnow(), levelno=20, level="info", logger="elemta.test.prune",
                      message="recent", process="api:1"),
        ])
        db.session.commit()
        db.session.remove()
    wait_until(lambda: [r.message for r in stored(app, "elemta.test.prune")] == ["recent"])
    assert handler.pruned >= 1


def test_records_logged_close_together_share_a_transaction(logging_app, monkeypatch):
    """The drain thread lets a batch fill (``gather``) before writing it: a burst of records,
    as a busy listener logs one per message, goes in one INSERT, every record in its order.
    On PostgreSQL it is a binary COPY (app/copyinsert.py), which SQLAlchemy's cursor events
    do not see."""
    from app.logs import handler as handler_module

    app = logging_app()
    handler = installed_handler()
    handler.drain()
    inserts: list[int] = []
    copies: list[int] = []
    copy_insert = handler_module._COPY
    real_execute = copy_insert.execute

    def execute(conn, rows):  # type: ignore[no-untyped-def]
        copies.append(len(rows))
        real_execute(conn, rows)

    monkeypatch.setattr(copy_insert, "execute", execute)

    @sa.event.listens_for(handler._engine, "before_cursor_execute")
    def count(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("INSERT"):
            inserts.append(len(parameters) if executemany else 1)

    handler.gather = 60.0  # longer than any test: the drain below ends the pause
    log = logging.getLogger("elemta.test.burst")
    try:
        for n in range(20):
            log.info("queued %d", n)
        assert handler.drain()
    finally:
        sa.event.remove(handler._engine, "before_cursor_execute", count)
    postgres = handler._engine.dialect.name == "postgresql"
    assert (copies, inserts) == (([20], []) if postgres else ([], [20]))
    assert [r.message for r in stored(app, "elemta.test.burst")] == [
        f"queued {n}" for n in range(20)]
