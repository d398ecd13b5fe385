"""The listener's RCPT check (``Storage.run_check``): on PostgreSQL each storage thread keeps
one autocommit connection for its checks. It sees every change at once, survives the server
dropping it, and is closed when the storage shuts down (docs/PERFORMANCE.md, "Intake, a
connection per storage thread for the RCPT check")."""

from __future__ import annotations

import asyncio
import datetime as dt
import smtplib
import time

import pytest

from app.control.intake import refusal
from app.control.rules import create_rule
from app.control.suppression import add_suppression
from app.extensions import db
from app.smtpd.storage import Storage
from app.timeutil import utcnow
from tests.conftest import backend_pids, terminate_backends
from tests.smtpd_helpers import crlf, email_message, running_listener


def _check(storage: Storage, address: str, sender: str = "alice@example.com") -> str | None:
    return asyncio.run(storage.run_check(refusal, sender, address))


def _suppress(app, address: str) -> None:
    with app.app_context():
        add_suppression(db.session, address, "user unknown", None, "test")
        db.session.remove()


def test_the_checks_see_new_suppressions_and_rules_at_once(app) -> None:
    storage = Storage(app, 1)
    try:
        assert _check(storage, "gone@example.net") is None
        assert _check(storage, "x@bounced.example") is None
        _suppress(app, "gone@example.net")
        assert _check(storage, "gone@example.net").startswith("550")
        with app.app_context():
            create_rule(db.session, action="bounce", domain="bounced.example",
                        expires_at=utcnow() + dt.timedelta(hours=1), actor="test")
            db.session.remove()
        assert _check(storage, "x@bounced.example").startswith("550")
        assert _check(storage, "fine@example.net") is None
    finally:
        storage.close()


def _thread_pids(storage: Storage) -> set[int]:
    return {c.connection.dbapi_connection.info.backend_pid for c in storage._connections}


def test_a_check_after_the_server_killed_the_threads_backend_answers(
        make_app, own_postgresql_database) -> None:
    url, admin, name = own_postgresql_database
    app = make_app(database_url=url)
    _suppress(app, "gone@example.net")
    storage = Storage(app, 1)
    try:
        assert _check(storage, "gone@example.net").startswith("550")
        pids = _thread_pids(storage)
        assert len(pids) == 1
        assert _check(storage, "gone@example.net").startswith("550")
        assert _thread_pids(storage) == pids  # the same connection, kept
        terminate_backends(admin, pids)
        # Not an error (which the listener answers with 451): a fresh connection.
        assert _check(storage, "gone@example.net").startswith("550")
        assert _thread_pids(storage).isdisjoint(pids)
        assert _check(storage, "fine@example.net") is None
    finally:
        storage.close()


def test_shutdown_closes_the_threads_connections(make_app, own_postgresql_database) -> None:
    url, admin, name = own_postgresql_database
    app = make_app(database_url=url)
    storage = Storage(app, 2)
    _check(storage, "a@example.net")
    pids = _thread_pids(storage)
    assert pids and pids <= backend_pids(admin, name)
    connections = list(storage._connections)
    storage.close()
    assert all(c.closed for c in connections)
    assert not storage._connections
    deadline = time.monotonic() + 30
    while pids & backend_pids(admin, name) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pids & backend_pids(admin, name)


def test_a_check_that_fails_discards_its_connection(make_app, own_postgresql_database) -> None:
    """The error surfaces as before (the listener then answers 451); the next check runs on a
    fresh connection."""
    url, _admin, _name = own_postgresql_database
    app = make_app(database_url=url)
    _suppress(app, "gone@example.net")
    storage = Storage(app, 1)

    def failing(connection, *_args):
        connection.exec_driver_sql("SELECT 1 / 0")

    try:
        assert _check(storage, "gone@example.net").startswith("550")
        pids = _thread_pids(storage)
        with pytest.raises(Exception, match="division by zero"):
            asyncio.run(storage.run_check(failing))
        assert not storage._connections
        assert _check(storage, "gone@example.net").startswith("550")
        assert _thread_pids(storage).isdisjoint(pids)
    finally:
        storage.close()


def test_rcpt_over_smtp_after_the_server_killed_every_backend(
        make_app, own_postgresql_database) -> None:
    """End to end: the listener's answers to RCPT (and the message's queueing) are the same
    before and after the server dropped every connection of the listener."""
    url, admin, name = own_postgresql_database
    app = make_app(database_url=url)
    _suppress(app, "gone@example.net")
    with running_listener(app) as port, smtplib.SMTP("127.0.0.1", port) as client:
        client.ehlo("client.example")
        client.mail("alice@example.com")
        assert client.rcpt("gone@example.net")[0] == 550
        assert client.rcpt("bob@example.net")[0] == 250
        client.rset()
        terminate_backends(admin, backend_pids(admin, name))
        for _ in range(3):  # whichever storage threads serve them
            client.mail("alice@example.com")
            assert client.rcpt("gone@example.net")[0] == 550
            assert client.rcpt("bob@example.net")[0] == 250
            client.rset()
        client.mail("alice@example.com")
        assert client.rcpt("bob@example.net")[0] == 250
        code, _reply = client.data(crlf(email_message()))
        assert code == 250
