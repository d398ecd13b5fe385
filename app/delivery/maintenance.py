"""Worker housekeeping: the liveness heartbeat (``worker_heartbeats``, which delivery owns).

The webhook dispatcher (``flask webhook dispatch``) beats in the same table, its rows told apart
by their id (``DISPATCHER_PREFIX``): a dispatcher is not a delivery worker, so it never counts
as one in ``/api/health`` or in ``elemta_worker_heartbeat_age_seconds``.

The purge of expired failed mail is the queue's (``queue.retention.purge_expired_failed``).
"""

from __future__ import annotations

import datetime as dt
import os
import socket
from typing import Any, cast

import sqlalchemy as sa
import sqlalchemy.orm as so

from ..models import WorkerHeartbeat
from ..sqltypes import UTCDateTime
from ..timeutil import utcnow

DISPATCHER_PREFIX = "webhook-dispatcher/"


def dispatcher_heartbeat_id() -> str:
    """The heartbeat row id of this webhook dispatcher process."""
    return f"{DISPATCHER_PREFIX}{socket.gethostname()[:80]}:{os.getpid()}"


def beat(session: so.Session, worker_id: str, started_at: dt.datetime) -> None:
    """Create or refresh this worker's heartbeat row (read by ``/api/health``); commits."""
    now = utcnow()
    updated = cast(sa.CursorResult[Any], session.execute(
        sa.update(WorkerHeartbeat).where(WorkerHeartbeat.worker_id == worker_id)
        .values(last_heartbeat=now).execution_options(synchronize_session=False)
    )).rowcount
    if not updated:
        session.add(WorkerHeartbeat(worker_id=worker_id, hostname=socket.gethostname()[:255],
                                    pid=os.getpid(), started_at=started_at, last_heartbeat=now))
    session.commit()


def remove_heartbeat(session: so.Session, worker_id: str) -> None:
    """A worker that stops cleanly says so at once instead of going stale."""
    session.execute(sa.delete(WorkerHeartbeat).where(WorkerHeartbeat.worker_id == worker_id))
    session.commit()


def newest_heartbeat(session: so.Session, *, dispatcher: bool = False) -> dt.datetime | None:
    """When the most recently alive delivery worker (or webhook dispatcher, with
    ``dispatcher``) last beat; None without any. No commit."""
    is_dispatcher = WorkerHeartbeat.worker_id.startswith(DISPATCHER_PREFIX, autoescape=True)
    return session.scalar(
        sa.select(sa.type_coerce(sa.func.max(WorkerHeartbeat.last_heartbeat), UTCDateTime()))
        .where(is_dispatcher if dispatcher else ~is_dispatcher))
