"""How long failed mail stays: the purge of failed messages past their retention."""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
import sqlalchemy.orm as so

from ..events import record_system_events
from ..models import Message
from ..timeutil import utcnow
from . import shape
from .locking import lock_in_id_order, locks_rows
from .states import QueueState

PURGE_CHUNK = 1000


def purge_expired_failed(session: so.Session, retention_seconds: int,
                         now: dt.datetime | None = None) -> int:
    """Delete failed messages untouched for longer than the retention; a ``system`` event
    (action ``purged``) for each. Chunked, each chunk its own transaction; commits."""
    now = now or utcnow()
    cutoff = now - dt.timedelta(seconds=retention_seconds)
    total = 0
    while True:
        ids = list(session.scalars(
            sa.select(Message.id).where(Message.queue_state == QueueState.FAILED,
                                        Message.updated_at < cutoff)
            .order_by(Message.updated_at).limit(PURGE_CHUNK)))
        if not ids:
            session.commit()
            return total
        # The state is re-checked in the DELETE: a message retried meanwhile is kept.
        where = [Message.id.in_(ids), Message.queue_state == QueueState.FAILED,
                 Message.updated_at < cutoff]
        if locks_rows(session):  # what the shape takes out is what the DELETE removes
            where = [Message.id.in_(lock_in_id_order(session, where, for_delete=True))]
        shape.leaving(session, sa.and_(*where))
        rows = session.execute(
            sa.delete(Message)
            .where(*where)
            .returning(Message.id, Message.sender)
            .execution_options(synchronize_session=False)
        ).mappings().all()
        record_system_events(
            session, rows,
            f"Message {{id}} purged: failed and kept longer than the retention "
            f"({retention_seconds} s)",
            action="purged", queue_state=None, timestamp=now)
        session.commit()
        total += len(rows)
        if len(ids) < PURGE_CHUNK:
            return total
