"""Message events and system logs in the order they were stored: what the live streams read.

Oldest first by id, from a position on (``after``), up to a limit; plain rows (no ORM identity
map). Every read is one short statement (a few for a long list of ids).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
import sqlalchemy.orm as so

from ..models import DeliveryEvent, SystemLog

IDS_PER_QUERY = 1000

_EVENTS = DeliveryEvent.__table__
_LOGS = SystemLog.__table__


def newest_ids(session: so.Session) -> tuple[int, int]:
    """The newest delivery event id and system log id (0 when empty)."""
    event_max = session.scalar(sa.select(sa.func.max(_EVENTS.c.id))) or 0
    log_max = session.scalar(sa.select(sa.func.max(_LOGS.c.id))) or 0
    return int(event_max), int(log_max)


def event_rows(session: so.Session, after: int, limit: int, *, upto: int | None = None,
               event_type: str | None = None, queue_changes_only: bool = False) -> list[Any]:
    """Events with ``after < id [<= upto]``, oldest first; ``queue_changes_only``: those with
    an ``action`` (the events that changed a queue entry)."""
    conds = [_EVENTS.c.id > after]
    if upto is not None:
        conds.append(_EVENTS.c.id <= upto)
    if event_type:
        conds.append(_EVENTS.c.event_type == event_type)
    if queue_changes_only:
        conds.append(_EVENTS.c.action.is_not(None))
    return list(session.execute(
        sa.select(_EVENTS).where(*conds).order_by(_EVENTS.c.id).limit(limit)))


def log_rows(session: so.Session, after: int, limit: int, *, upto: int | None = None,
             min_levelno: int | None = None) -> list[Any]:
    """Log records with ``after < id [<= upto]`` at ``min_levelno`` or above, oldest first."""
    conds = [_LOGS.c.id > after]
    if upto is not None:
        conds.append(_LOGS.c.id <= upto)
    if min_levelno:
        conds.append(_LOGS.c.levelno >= min_levelno)
    return list(session.execute(
        sa.select(_LOGS).where(*conds).order_by(_LOGS.c.id).limit(limit)))


def event_rows_by_ids(session: so.Session, ids: Iterable[int]) -> list[Any]:
    return _rows_by_ids(session, _EVENTS, ids)


def log_rows_by_ids(session: so.Session, ids: Iterable[int]) -> list[Any]:
    return _rows_by_ids(session, _LOGS, ids)


def _rows_by_ids(session: so.Session, table: sa.FromClause, ids: Iterable[int]) -> list[Any]:
    wanted = sorted(ids)
    rows: list[Any] = []
    for start in range(0, len(wanted), IDS_PER_QUERY):
        chunk = wanted[start : start + IDS_PER_QUERY]
        rows.extend(session.execute(sa.select(table).where(table.c.id.in_(chunk))))
    rows.sort(key=lambda r: r.id)
    return rows
