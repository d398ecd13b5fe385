"""Real SMTP peers on loopback and an injected DNS resolver for the delivery tests."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import dns.exception
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import pytest
import sqlalchemy as sa
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP
from flask import Flask

from app.delivery.worker import Worker
from app.extensions import db
from app.models import DeliveryEvent, DeliveryRollup, Message, Recipient
from tests.smtpd_helpers import free_port


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    session_id: int
    tls: bool = False
    login: bytes | None = None
    mail_options: list[str] = field(default_factory=list)  # as MAIL FROM carried them


@dataclass
class Behaviour:
    """How a peer answers. Replies are full SMTP reply lines (code and text)."""

    mail_reply: str | None = None
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    data_reply: str = "250 2.0.0 Ok: queued"
    drop_at: str | None = None  # "mail" | "rcpt" | "data": close without answering
    drops: int | None = None  # how many times drop_at drops (None: every time)
    stall_at: str | None = None  # same points: wait (longer than the client's timeout)
    stall_seconds: float = 3.0
    before_data_reply: Callable[[], None] | None = None  # runs before DATA is answered


class _Handler:
    def __init__(self, peer: Peer) -> None:
        self.peer = peer

    async def _maybe(self, point: str, server: Any) -> bool:
        b = self.peer.behaviour
        if b.stall_at == point:
            try:
                await asyncio.wait_for(self.peer.release_stall.wait(), b.stall_seconds)
            except TimeoutError:
                pass
        if b.drop_at == point and b.drops != 0:
            if b.drops is not None:
                b.drops -= 1
            server.transport.abort()
            return True
        return False

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:
        if await self._maybe("mail", server):
            return "421 dropped"
        if self.peer.behaviour.mail_reply:
            return self.peer.behaviour.mail_reply
        envelope.mail_from = address  # "<>" for the null sender, as aiosmtpd keeps it
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:
        if await self._maybe("rcpt", server):
            return "421 dropped"
        reply = self.peer.behaviour.rcpt_replies.get(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if await self._maybe("data", server):
            return "421 dropped"
        hook = self.peer.behaviour.before_data_reply
        if hook:
            await asyncio.get_running_loop().run_in_executor(None, hook)
        reply = self.peer.behaviour.data_reply
        if reply.startswith("2"):
            with self.peer.lock:
                sender = "" if envelope.mail_from == "<>" else envelope.mail_from
                self.peer.received.append(Received(sender, list(envelope.rcpt_tos),
                                                   envelope.original_content or b"",
                                                   id(session), bool(session.ssl),
                                                   session.auth_data,
                                                   list(envelope.mail_options)))
        return reply


class _PipeliningHandler(_Handler):
    """Advertises PIPELINING (RFC 2920); aiosmtpd reads commands line by line, so it copes."""

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname  # aiosmtpd leaves it to a handler with this hook
        return [*responses[:-1], "250-PIPELINING", responses[-1]]


class _CountingSMTP(SMTP):
    """Counts connections: all of them and the most open at once; with ``peer.record_reads``,
    keeps every chunk read from the socket (what the client sent in one write arrives as one
    chunk on loopback)."""

    def __init__(self, *args: Any, peer: Peer, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.peer = peer

    def connection_made(self, transport: Any) -> None:
        with self.peer.lock:
            self.peer.connections += 1
            self.peer.open_now += 1
            self.peer.max_open = max(self.peer.max_open, self.peer.open_now)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        with self.peer.lock:
            self.peer.open_now -= 1
        super().connection_lost(error)

    def data_received(self, data: bytes) -> None:
        if self.peer.record_reads:
            with self.peer.lock:
                self.peer.reads.append(data)
        super().data_received(data)


class _Controller(Controller):
    def __init__(self, peer: Peer, **kwargs: Any) -> None:
        self.peer = peer
        super().__init__((_PipeliningHandler if peer.pipelining else _Handler)(peer), **kwargs)

    def factory(self) -> SMTP:
        return _CountingSMTP(self.handler, peer=self.peer, **self.SMTP_kwargs)


class Peer:
    """An aiosmtpd server on 127.0.0.1:<free port> that records what it accepted."""

    def __init__(self, behaviour: Behaviour | None = None, *, host: str = "127.0.0.1",
                 port: int | None = None, pipelining: bool = False,
                 record_reads: bool = False, **smtp_kwargs: Any) -> None:
        self.behaviour = behaviour or Behaviour()
        self.pipelining = pipelining
        self.record_reads = record_reads
        self.reads: list[bytes] = []
        self.host = host
        self.port = port or free_port()
        self.received: list[Received] = []
        self.lock = threading.Lock()
        self.connections = 0
        self.open_now = 0
        self.max_open = 0
        self._controller = _Controller(self, hostname=host, port=self.port, **smtp_kwargs)
        self.release_stall: asyncio.Event

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def __enter__(self) -> Peer:
        self._controller.start()
        loop = self._controller.loop
        self.release_stall = asyncio.run_coroutine_threadsafe(_make_event(), loop).result()
        return self

    def __exit__(self, *exc: object) -> None:
        loop = self._controller.loop
        loop.call_soon_threadsafe(self.release_stall.set)
        self._controller.stop()

    def recipients_received(self) -> list[str]:
        with self.lock:
            return [r for m in self.received for r in m.rcpt_tos]


async def _make_event() -> asyncio.Event:
    return asyncio.Event()


class FakeResolver:
    """Answers from a table {(name, type): [rdata text] | exception}; other names: NXDOMAIN.

    The root zone resolves (as on any working resolver) unless ``broken``.
    """

    def __init__(self, records: dict[tuple[str, str], Any] | None = None,
                 broken: bool = False) -> None:
        self.records = {(n.rstrip(".").lower(), t): v for (n, t), v in (records or {}).items()}
        if not broken:
            self.records.setdefault(("", "NS"), ["a.root-servers.net."])
        self.queries: list[tuple[str, str]] = []

    def resolve(self, qname: str, rdtype: str, **_kwargs: Any) -> list[Any]:
        name = str(qname).rstrip(".").lower()
        self.queries.append((name, rdtype))
        value = self.records.get((name, rdtype))
        if isinstance(value, Exception):
            raise value
        if value is None:
            if any(n == name for n, _ in self.records):
                raise dns.resolver.NoAnswer()
            raise dns.resolver.NXDOMAIN()
        kind = dns.rdatatype.from_text(rdtype)
        return [dns.rdata.from_text(dns.rdataclass.IN, kind, text) for text in value]


def mx_to(peer_host: str = "127.0.0.1", domain: str = "example.net",
          mx: str = "mx.example.net") -> dict[tuple[str, str], Any]:
    return {(domain, "MX"): [f"10 {mx}."], (mx, "A"): [peer_host]}


def run_worker(app: Flask, resolver: Any = None) -> Worker:
    """``flask worker --once`` in this process, with an injected resolver."""
    worker = Worker(app, resolver=resolver)
    worker.run(once=True)
    return worker


def delivered_recipients(app: Flask) -> Counter[str]:
    """Each recipient with a ``delivery`` event, and how many it has."""
    with app.app_context():
        delivered = Counter(db.session.scalars(sa.select(DeliveryEvent.recipient).where(
            DeliveryEvent.event_type == "delivery")))
        db.session.remove()
        return delivered


def assert_each_delivered_once(app: Flask, peer: Peer, count: int) -> None:
    """``bulk_queue``'s ``count`` recipients: the peer received each exactly once, and each
    was recorded as delivered exactly once."""
    expected = {f"r{n}@example.net" for n in range(count)}
    received = Counter(peer.recipients_received())
    assert set(received) == expected
    assert max(received.values()) == 1, "a recipient was delivered twice"
    delivered = delivered_recipients(app)
    assert set(delivered) == expected
    assert max(delivered.values()) == 1, "a delivery was recorded twice"


def events(app: Flask, message_id: str | None = None,
           event_type: str | None = None) -> list[DeliveryEvent]:
    with app.app_context():
        query = sa.select(DeliveryEvent).order_by(DeliveryEvent.id)
        if message_id:
            query = query.where(DeliveryEvent.message_id == message_id)
        if event_type:
            query = query.where(DeliveryEvent.event_type == event_type)
        rows = list(db.session.scalars(query))
        db.session.expunge_all()
        db.session.remove()
        return rows


def rollup(app: Flask) -> dict[str, int]:
    with app.app_context():
        rows = db.session.execute(sa.select(DeliveryRollup.outcome,
                                            sa.func.sum(DeliveryRollup.count))
                                  .group_by(DeliveryRollup.outcome)).all()
        db.session.remove()
        return {outcome: int(n) for outcome, n in rows}


def message_row(app: Flask, message_id: str) -> Message | None:
    with app.app_context():
        message = db.session.scalar(sa.select(Message).where(Message.id == message_id))
        if message is not None:
            _ = list(message.recipients)
            db.session.expunge_all()
        db.session.remove()
        return message


def recipients_of(app: Flask, message_id: str) -> dict[str, Recipient]:
    with app.app_context():
        rows = list(db.session.scalars(
            sa.select(Recipient).where(Recipient.message_id == message_id)))
        db.session.expunge_all()
        db.session.remove()
        return {r.address: r for r in rows}


def bulk_queue(app: Flask, count: int, prefix: str = "m") -> list[str]:
    """Queue ``count`` one-recipient messages (r<n>@example.net) shaped as ``accept_message``
    makes them, in a few statements: for tests about many messages, where one transaction per
    message would be most of the test's time."""
    from app.models import MessageContent
    from app.queue.service import new_message_id
    from app.timeutil import utcnow
    from tests.helpers import raw_message

    now = utcnow()
    ids = [new_message_id() for _ in range(count)]
    with app.app_context():
        db.session.execute(sa.insert(Message), [
            {"id": i, "sender": "alice@example.com", "subject": f"{prefix}{n}", "size": 200,
             "priority": 0, "queue_state": "pending", "attempts": 0, "origin": "api",
             "created_at": now, "updated_at": now, "next_attempt_at": now}
            for n, i in enumerate(ids)])
        db.session.execute(sa.insert(MessageContent), [
            {"message_id": i, "raw": raw_message(subject=f"{prefix}{n}")}
            for n, i in enumerate(ids)])
        db.session.execute(sa.insert(Recipient), [
            {"message_id": i, "address": f"r{n}@example.net", "domain": "example.net",
             "status": "pending", "attempts": 0, "next_attempt_at": now}
            for n, i in enumerate(ids)])
        db.session.commit()
        db.session.remove()
    return ids


def rollup_rows(app: Flask) -> list[tuple[dt.datetime, str, int]]:
    """(hour, outcome, count) rows of the hourly rollup."""
    with app.app_context():
        rows = [(r.hour, r.outcome, r.count) for r in db.session.scalars(
            sa.select(DeliveryRollup).order_by(DeliveryRollup.hour, DeliveryRollup.outcome))]
        db.session.remove()
        return rows


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker_process(database_url: str, *args: str, **env: str) -> subprocess.Popen[bytes]:
    """``flask worker [args]`` as a process of its own (to be killed), settings as
    ELEMTA_<KEY>."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("ELEMTA_")}
    environment.update({"FLASK_APP": "wsgi.py", "ELEMTA_DATABASE_URL": database_url,
                        "ELEMTA_LOG_LEVEL": "warning"})
    environment.update({f"ELEMTA_{k.upper()}": v for k, v in env.items()})
    flask = os.path.join(os.path.dirname(sys.executable), "flask")
    return subprocess.Popen([flask, "worker", *args], cwd=ROOT, env=environment,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_for(condition: Callable[[], bool], seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    pytest.fail("condition not reached")


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(10)
    if process.stderr:
        process.stderr.close()
