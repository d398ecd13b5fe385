"""The listener's database work, done in worker threads so the event loop never waits on it.

Every call is one unit of work (``database.unit_of_work``): its own application context and
SQLAlchemy session, committed completely at the end or rolled back: a failure leaves nothing
half-written. The functions run here do not commit; the unit of work does.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import sqlalchemy.orm as so
from flask import Flask

from ..database import autocommit_engine, unit_of_work
from ..dkim.signing import sign_outgoing
from ..events import record_event
from ..extensions import db
from ..queue.service import NewMessage, add_messages
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
        context. On PostgreSQL the connection is in autocommit, as a GET request's session
        (``database.py``): psycopg sends neither BEGIN nor COMMIT, and at READ COMMITTED each
        statement sees what it saw inside a transaction. On SQLite it is one transaction,
        committed at the end (rolled back on an error)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self._check, func, args)

    def _check(self, func: Callable[..., T], args: tuple[Any, ...]) -> T:
        with self._checks_engine.begin() as connection:
            return func(connection, *args)

    def _call(self, func: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
        with unit_of_work(self.app) as session:
            return func(session, *args, **kwargs)

    def close(self) -> None:
        self.executor.shutdown(wait=True)


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
