"""Small builders shared by the tests."""

from __future__ import annotations

import datetime as dt
from email.message import EmailMessage

import sqlalchemy as sa
import sqlalchemy.orm as so

from app.models import DeliveryEvent, Message, Recipient
from app.queue import service


def raw_message(sender: str = "alice@example.com", to: str = "bob@example.net",
                subject: str = "Hello") -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = "<test@example.com>"
    msg.set_content("Hi there.\n")
    return msg.as_bytes()


def queue_message(session: so.Session, sender: str = "alice@example.com",
                  recipients: tuple[str, ...] = ("bob@example.net",), subject: str = "Hello",
                  state: str = "pending", created_at: dt.datetime | None = None) -> str:
    """Accept a message through the queue service, then put it in ``state``."""
    message = service.accept_message(
        session, sender=sender, recipients=list(recipients),
        raw=raw_message(sender, ", ".join(recipients), subject), origin="api")
    message_id = message.id
    if created_at is not None:
        session.execute(sa.update(Message).where(Message.id == message_id)
                        .values(created_at=created_at))
    if state == "deferred":
        session.execute(sa.update(Recipient).where(Recipient.message_id == message_id)
                        .values(status="deferred", attempts=1, last_error="451 try later",
                                next_attempt_at=message.created_at + dt.timedelta(hours=1)))
        session.execute(sa.update(Message).where(Message.id == message_id)
                        .values(queue_state="deferred", attempts=1, last_error="451 try later"))
    elif state == "failed":
        session.execute(sa.update(Recipient).where(Recipient.message_id == message_id)
                        .values(status="failed", attempts=1, last_error="550 no such user",
                                next_attempt_at=None))
        session.execute(sa.update(Message).where(Message.id == message_id)
                        .values(queue_state="failed", attempts=1, next_attempt_at=None,
                                last_error="550 no such user"))
    elif state == "held":
        session.execute(sa.update(Message).where(Message.id == message_id)
                        .values(queue_state="held"))
    session.commit()
    return message_id


def state_of(session: so.Session, message_id: str) -> str | None:
    session.expire_all()
    return session.scalar(sa.select(Message.queue_state).where(Message.id == message_id))


def system_events(session: so.Session, message_id: str) -> list[str]:
    session.expire_all()
    return list(session.scalars(
        sa.select(DeliveryEvent.message).where(DeliveryEvent.message_id == message_id,
                                               DeliveryEvent.event_type == "system")
        .order_by(DeliveryEvent.id)))


def assert_error(response, status: int, code: str) -> dict:
    """The contract's error body: exactly error, code, details."""
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert set(body) == {"error", "code", "details"}, body
    assert body["code"] == code
    assert isinstance(body["error"], str) and body["error"]
    return body
