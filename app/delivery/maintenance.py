"""Worker housekeeping: the liveness heartbeat (``worker_heartbeats``, which delivery owns).

The purge of expired failed mail is the queue's (``queue.retention.purge_expired_failed``).
"""

from __future__ import annotations

import datetime as dt
import os
import socket

import sqlalchemy as sa
import sqlalchemy.orm as so

from ..models import WorkerHeartbeat
from ..sqltypes import UTCDateTime
from ..timeutil import utcnow


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


def newest_heartbeat(session: so.Session) -> dt.datetime | None:
    """When the most recently alive worker last beat (None without any worker); no commit."""
    return session.scalar(sa.select(
        sa.type_coerce(sa.func.max(WorkerHeartbeat.last_heartbeat), UTCDateTime())))
