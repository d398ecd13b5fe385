"""Worker housekeeping: the liveness heartbeat and the purge of expired failed messages."""

from __future__ import annotations

import datetime as dt
import os
import socket

import sqlalchemy as sa
import sqlalchemy.orm as so

from ..events import record_system_events
from ..models import Message, WorkerHeartbeat
from ..timeutil import utcnow

PURGE_CHUNK = 1000


def beat(session: so.Session, worker_id: str, started_at: dt.datetime) -> None:
    """Create or refresh this worker's heartbeat row (read by ``/api/health``); commits."""
    now = utcnow()
    updated = session.execute(
        sa.update(WorkerHeartbeat).where(WorkerHeartbeat.worker_id == worker_id)
        .values(last_heartbeat=now).execution_options(synchronize_session=False)
    ).rowcount
    if not updated:
        session.add(WorkerHeartbeat(worker_id=worker_id, hostname=socket.gethostname()[:255],
                                    pid=os.getpid(), started_at=started_at, last_heartbeat=now))
    session.commit()


def remove_heartbeat(session: so.Session, worker_id: str) -> None:
    """A worker that stops cleanly says so at once instead of going stale."""
    session.execute(sa.delete(WorkerHeartbeat).where(WorkerHeartbeat.worker_id == worker_id))
    session.commit()


def purge_failed(session: so.Session, retention_seconds: int,
                 now: dt.datetime | None = None) -> int:
    """Delete failed messages untouched for longer than the retention; a ``system`` event
    (action ``purged``) for each. Chunked, each chunk its own transaction; commits."""
    now = now or utcnow()
    cutoff = now - dt.timedelta(seconds=retention_seconds)
    total = 0
    while True:
        ids = list(session.scalars(
            sa.select(Message.id).where(Message.queue_state == "failed",
                                        Message.updated_at < cutoff)
            .order_by(Message.updated_at).limit(PURGE_CHUNK)))
        if not ids:
            session.commit()
            return total
        # The state is re-checked in the DELETE: a message retried meanwhile is kept.
        rows = session.execute(
            sa.delete(Message)
            .where(Message.id.in_(ids), Message.queue_state == "failed",
                   Message.updated_at < cutoff)
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
