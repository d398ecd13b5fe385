"""The listener's database work, done in worker threads so the event loop never waits on it.

Every call is one unit of work (``database.unit_of_work``): its own application context and
SQLAlchemy session, committed completely at the end or rolled back: a failure leaves nothing
half-written. The functions run here do not commit; the unit of work does.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import sqlalchemy as sa
import sqlalchemy.orm as so
from flask import Flask

from ..database import autocommit_engine, check_idle_connection, unit_of_work
from ..dkim.signing import sign_outgoing
from ..events import record_event
from ..extensions import db
from ..queue.service import NewMessage, add_messages
from .recipient_checks import RecipientChecks
from .stamping import Trace, stamp

log = logging.getLogger("elemta.smtpd")

T = TypeVar("T")
_REPLY = re.compile(r"^(\d{3})[ -](?:(\d\.\d{1,3}\.\d{1,3}) )?(.*)$", re.DOTALL)
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1: Unicode category Cc


class Storage:
    """Runs database functions ``func(session, ...)`` on a small thread pool."""

    def __init__(self, app: Flask, threads: int) -> None:
        self.app = app
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="smtpd-db")
        with app.app_context():
            engine = db.engine
        # Checks (a recipient against suppressions and rules) run on a Core connection:
        # see ``run_check``.
        self._checks_engine = (autocommit_engine(engine) if engine.dialect.name == "postgresql"
                               else engine)
        self._own_connections = engine.dialect.name == "postgresql"
        self._local = threading.local()
        self._connections: set[sa.Connection] = set()
        self._lock = threading.Lock()
        # The RCPT check of all sessions, coalesced into one run_check at a time.
        self.recipient_checks = RecipientChecks(self.run_check)

    async def run(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, lambda: self._call(func, args, kwargs))

    async def run_plain(self, func: Callable[..., T], *args: Any) -> T:
        """``func(*args)`` on the pool, without a context: it manages its own."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, func, *args)

    async def run_check(self, func: Callable[..., T], *args: Any) -> T:
        """``func(connection, *args)`` on a plain Core connection, for a check that reads and
        writes at most single statements (a rule's hit count): no ORM session, no app
        context.

        On PostgreSQL the connection is in autocommit, as a GET request's session
        (``database.py``): psycopg sends neither BEGIN nor COMMIT, and at READ COMMITTED each
        statement sees what it saw inside a transaction, so nothing stale is ever read. Each
        storage thread keeps its connection for all its checks (no pool checkout, isolation
        switch and reset per RCPT; docs/PERFORMANCE.md, "Intake, a connection per storage
        thread for the RCPT check"). Before each use it is checked as the pool checks a
        connection at checkout (``database.check_idle_connection``, no round trip): one the
        server has dropped (a restart, a terminated backend) is replaced by a fresh one
        first. A connection on which a check fails is discarded, and the error surfaces as
        it did through the pool. ``close`` closes them all.

        On SQLite it is one transaction on a pooled connection, committed at the end (rolled
        back on an error)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self._check, func, args)

    def _check(self, func: Callable[..., T], args: tuple[Any, ...]) -> T:
        if not self._own_connections:
            with self._checks_engine.begin() as connection:
                return func(connection, *args)
        connection = self._thread_connection()
        try:
            result = func(connection, *args)
            connection.commit()  # autocommit: ends SQLAlchemy's transaction, no round trip
        except BaseException:
            self._discard(connection)
            raise
        return result

    def _thread_connection(self) -> sa.Connection:
        """This thread's connection, alive as far as can be told without a round trip."""
        connection: sa.Connection | None = getattr(self._local, "connection", None)
        if connection is not None:
            try:
                check_idle_connection(connection.connection.dbapi_connection, None, None)
            except Exception:
                log.info("Replacing a dropped database connection of the RCPT checks")
                self._discard(connection)
                connection = None
        if connection is None:
            connection = self._checks_engine.connect()
            with self._lock:
                self._connections.add(connection)
            self._local.connection = connection
        return connection

    def _discard(self, connection: sa.Connection) -> None:
        """Close ``connection`` for good: out of the pool, never used again."""
        if getattr(self._local, "connection", None) is connection:
            self._local.connection = None
        with self._lock:
            self._connections.discard(connection)
        try:
            connection.invalidate()  # closes the DBAPI connection; the pool forgets it
            connection.close()
        except Exception:
            log.debug("Closing a database connection of the RCPT checks failed", exc_info=True)

    def _call(self, func: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
        with unit_of_work(self.app) as session:
            return func(session, *args, **kwargs)

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        self.recipient_checks.log_summary()
        # The threads are gone: their connections can be closed from here.
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            self._discard(connection)


def prepare_message(session: so.Session, *, sender: str, recipients: Sequence[str], raw: bytes,
                    trace: Trace) -> NewMessage:
    """The message as it will be queued: stamped and signed.

    Every client whose mail the listener accepts is trusted (the relay policy refuses the
    others), so its mail is signed when a key signs for its From: domain."""
    stamped = sign_outgoing(session, stamp(raw, trace))
    return NewMessage(
        sender=sender,
        recipients=tuple(recipients),
        raw=stamped,
        origin="smtp",
        reception_note=f"Message accepted over SMTP from {trace.client_ip} ({len(stamped)} bytes)",
        event_fields={"delivery_ip": trace.client_ip[:64], "delivery_host": _safe(trace.helo, 255)},
    )


def queue_message(session: so.Session, *, sender: str, recipients: Sequence[str], raw: bytes,
                  trace: Trace) -> str:
    """Stamp, sign and add the message to the queue; returns its queue id. No commit: the
    caller's unit of work commits it."""
    new = prepare_message(session, sender=sender, recipients=recipients, raw=raw, trace=trace)
    return add_messages(session, [new])[0]


def split_reply(reply: str) -> tuple[int | None, str | None, str]:
    """``"554 5.7.1 Relay access denied"`` -> ``(554, "5.7.1", "Relay access denied")``."""
    match = _REPLY.match(reply)
    if not match:
        return None, None, reply
    return int(match.group(1)), match.group(2), match.group(3)


def _safe(text: str | None, limit: int) -> str | None:
    """Client-supplied text as storable UTF-8 (undecodable bytes arrive as surrogates), with
    control characters written out as ``\\xNN``: PostgreSQL text cannot hold NUL at all (the
    event of a refused ``<a\\0b@c>`` was lost), and the others would reach an operator's
    terminal through the logs and the CLI."""
    if text is None:
        return None
    text = text.encode("utf-8", errors="replace").decode("utf-8")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)[:limit]


def record_refusal(session: so.Session, *, stage: str, reply: str, client_ip: str, helo: str,
                   sender: str | None, recipient: str | None) -> None:
    """A ``rejection`` event for a refused command; not a delivery outcome (no rollup).
    No commit (``Storage.run``'s unit of work commits)."""
    code, enhanced, text = split_reply(reply)
    record_event(
        session,
        "rejection",
        sender=_safe(sender, 320),
        recipient=_safe(recipient, 320),
        message=_safe(f"SMTP {stage} refused from {client_ip}: {text}", 2000),
        smtp_code=code,
        enhanced_code=enhanced,
        delivery_ip=client_ip[:64],
        delivery_host=_safe(helo, 255) or None,
        counts_as_outcome=False,
    )
