"""What the worker reads of the messages it claimed: the envelope sender and the raw message.

Kept beside the claim as a service so the worker module orchestrates and does not query.
"""

from __future__ import annotations

from collections.abc import Iterable

import sqlalchemy as sa
import sqlalchemy.orm as so

from ..models import Message, MessageContent


def prefetch(session: so.Session, message_ids: Iterable[str],
             max_bytes: int) -> dict[str, tuple[str, bytes | None]]:
    """Senders, and the content of the messages up to ``max_bytes``, in one query; commits.

    Larger contents stay ``None`` (read by ``load`` when their job runs), so a claim does not
    hold many large messages in memory while its jobs wait for a thread.
    """
    ids = list(message_ids)
    if not ids:
        return {}
    rows = session.execute(
        sa.select(Message.id, Message.sender,
                  sa.case((Message.size <= max_bytes, MessageContent.raw), else_=None))
        .join(MessageContent, MessageContent.message_id == Message.id)
        .where(Message.id.in_(ids))
    ).all()
    session.commit()
    return {row[0]: (row[1], row[2]) for row in rows}


def raw(session: so.Session, message_id: str) -> bytes:
    """The raw content of one message, in the caller's transaction (a bounce's); no commit."""
    return session.scalar(sa.select(MessageContent.raw)
                          .where(MessageContent.message_id == message_id)) or b""


def load(session: so.Session, message_id: str) -> tuple[str, bytes] | None:
    """The sender and raw content of one message, ``None`` once it is deleted; commits."""
    row = session.execute(
        sa.select(Message.sender, MessageContent.raw)
        .join(MessageContent, MessageContent.message_id == Message.id)
        .where(Message.id == message_id)
    ).first()
    session.commit()
    return None if row is None else (row.sender, row.raw)
