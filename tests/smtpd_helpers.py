"""Running a real listener on a free loopback port for the SMTP listener tests."""

from __future__ import annotations

import smtplib
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from email.message import EmailMessage
from pathlib import Path

import sqlalchemy as sa
from flask import Flask

from app.extensions import db
from app.models import DeliveryEvent, Message, MessageContent, Recipient
from app.smtpd.server import ListenerSettings, ListenerThread


def free_port() -> int:
    """aiosmtpd cannot bind port 0: ask the kernel for a free port, then release it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Nothing listens on ``port`` of 127.0.0.1 (a stopped listener left it bindable)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@contextmanager
def running_listener(app: Flask) -> Iterator[int]:
    """The listener of ``app`` on 127.0.0.1:<free port>; yields the port."""
    settings = ListenerSettings.from_config(app.config, host="127.0.0.1", port=free_port(),
                                            hostname="mx.test.example")
    with ListenerThread(app, settings):
        yield settings.port


def make_certificate(directory: Path) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1/localhost, made with the openssl CLI."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True)
    return str(cert), str(key)


CLIENT_DATE = "Thu, 01 Jan 2026 12:00:00 +0000"


def email_message(sender: str = "alice@example.com", to: str = "bob@example.net",
                  subject: str = "Hello", body: str = "Hi there.\n",
                  message_id: str | None = "<client-id@example.com>",
                  date: str | None = CLIENT_DATE) -> EmailMessage:
    """A message as a mail client writes it (the listener adds Message-ID and Date when
    missing: ``message_id=None``, ``date=None`` leave them out)."""
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    if date:
        msg["Date"] = date
    if message_id:
        msg["Message-ID"] = message_id
    msg.set_content(body)
    return msg


def crlf(msg: EmailMessage) -> bytes:
    """The message with SMTP's CRLF line ends (smtplib sends bytes unchanged)."""
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))


class ProxiedSMTP(smtplib.SMTP):
    """An smtplib client that arrives through a PROXY-protocol proxy as ``source_ip``."""

    source_ip = "203.0.113.7"

    def _get_socket(self, host, port, timeout):  # type: ignore[no-untyped-def]
        sock = super()._get_socket(host, port, timeout)
        sock.sendall(f"PROXY TCP4 {self.source_ip} 127.0.0.1 40000 {port}\r\n".encode())
        return sock


def queued_id(reply: bytes) -> str:
    """The queue id in ``2.0.0 Ok: queued as msg-...``."""
    text = reply.decode()
    assert "queued as msg-" in text, text
    return text.rsplit(" ", 1)[1]


def stored(app: Flask) -> dict[str, list]:
    """Everything the listener may have written, to check what was (not) stored."""
    with app.app_context():
        session = db.session
        result = {
            "messages": list(session.scalars(sa.select(Message))),
            "recipients": list(session.scalars(
                sa.select(Recipient.address).order_by(Recipient.id))),
            "contents": list(session.scalars(sa.select(MessageContent.message_id))),
            "events": list(session.scalars(sa.select(DeliveryEvent).order_by(DeliveryEvent.id))),
        }
        session.expunge_all()
        db.session.remove()
        return result


def raw_of(app: Flask, message_id: str) -> bytes:
    with app.app_context():
        raw = db.session.scalar(sa.select(MessageContent.raw)
                                .where(MessageContent.message_id == message_id))
        db.session.remove()
        return raw
