"""What the streams read from the database and the JSON frames they send (SPEC 7).

Every read here is one short statement on a session the caller opens and closes right away;
nothing in this module keeps a connection.

Frames are JSON text: ``{"type": ..., "cursor": ..., "data": ...}``. ``data`` is serialised
once per row (by the hub) and shared by every socket; only the cursor differs per socket.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
import sqlalchemy.orm as so

from ..logs.schemas import MessageEventSchema, SystemLogSchema
from ..models import DeliveryEvent, SystemLog
from ..queue import counters

ROW_BATCH = 1000
IDS_PER_QUERY = 1000


# The same item shapes as GET /api/logs and GET /api/logs/messages.
_EVENT_ITEM = MessageEventSchema()
_LOG_ITEM = SystemLogSchema()


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class EventRow:
    """A delivery event as the streams need it: filter keys and its serialised frames' data."""

    id: int
    event_type: str
    action: str | None
    item_json: str  # SPEC 4.2 item
    queue_json: str | None  # {"message_id", "action", "queue"} when the event changed the queue


@dataclass(frozen=True, slots=True)
class LogRow:
    id: int
    levelno: int
    item_json: str  # SPEC 4.1 item


def event_row(row: Any) -> EventRow:
    queue_json = None
    if row.action:
        queue_json = _json({"message_id": row.message_id, "action": row.action,
                            "queue": row.queue_state})
    return EventRow(row.id, row.event_type, row.action, _json(_EVENT_ITEM.dump(row)), queue_json)


def log_row(row: Any) -> LogRow:
    return LogRow(row.id, row.levelno, _json(_LOG_ITEM.dump(row)))


def frame(frame_type: str, cursor: str | None, data_json: str) -> str:
    """The frame text; ``cursor`` is digits, dots and a dash, so it needs no escaping."""
    if cursor is None:
        return f'{{"type":"{frame_type}","data":{data_json}}}'
    return f'{{"type":"{frame_type}","cursor":"{cursor}","data":{data_json}}}'


def stats_json(stats: dict[str, int]) -> str:
    return _json(stats)


# --------------------------------------------------------------------------- reads

_EVENTS = DeliveryEvent.__table__
_LOGS = SystemLog.__table__


def max_ids(session: so.Session) -> tuple[int, int]:
    """The newest delivery event id and system log id (0 when empty)."""
    event_max = session.scalar(sa.select(sa.func.max(_EVENTS.c.id))) or 0
    log_max = session.scalar(sa.select(sa.func.max(_LOGS.c.id))) or 0
    return int(event_max), int(log_max)


def events_after(session: so.Session, after: int, limit: int = ROW_BATCH) -> list[EventRow]:
    rows = session.execute(
        sa.select(_EVENTS).where(_EVENTS.c.id > after).order_by(_EVENTS.c.id).limit(limit)
    )
    return [event_row(r) for r in rows]


def logs_after(session: so.Session, after: int, limit: int = ROW_BATCH) -> list[LogRow]:
    rows = session.execute(
        sa.select(_LOGS).where(_LOGS.c.id > after).order_by(_LOGS.c.id).limit(limit)
    )
    return [log_row(r) for r in rows]


def events_by_ids(session: so.Session, ids: Iterable[int]) -> list[EventRow]:
    return [event_row(r) for r in _rows_by_ids(session, _EVENTS, ids)]


def logs_by_ids(session: so.Session, ids: Iterable[int]) -> list[LogRow]:
    return [log_row(r) for r in _rows_by_ids(session, _LOGS, ids)]


def _rows_by_ids(session: so.Session, table: sa.Table, ids: Iterable[int]) -> list[Any]:
    wanted = sorted(ids)
    rows: list[Any] = []
    for start in range(0, len(wanted), IDS_PER_QUERY):
        chunk = wanted[start : start + IDS_PER_QUERY]
        rows.extend(session.execute(sa.select(table).where(table.c.id.in_(chunk))))
    rows.sort(key=lambda r: r.id)
    return rows


def event_page(
    session: so.Session,
    after: int,
    upto: int,
    *,
    event_type: str | None = None,
    queue_changes_only: bool = False,
    limit: int = ROW_BATCH,
) -> tuple[list[EventRow], int | None]:
    """Matching events with ``after < id <= upto``, oldest first; and the id to continue after
    (None when this was the last page)."""
    conds = [_EVENTS.c.id > after, _EVENTS.c.id <= upto]
    if event_type:
        conds.append(_EVENTS.c.event_type == event_type)
    if queue_changes_only:
        conds.append(_EVENTS.c.action.is_not(None))
    query = sa.select(_EVENTS).where(*conds).order_by(_EVENTS.c.id).limit(limit)
    rows = list(session.execute(query))
    following = rows[-1].id if len(rows) == limit else None
    return [event_row(r) for r in rows], following


def log_page(
    session: so.Session,
    after: int,
    upto: int,
    *,
    min_levelno: int | None = None,
    limit: int = ROW_BATCH,
) -> tuple[list[LogRow], int | None]:
    """Matching log records with ``after < id <= upto``, oldest first; and where to continue."""
    conds = [_LOGS.c.id > after, _LOGS.c.id <= upto]
    if min_levelno:
        conds.append(_LOGS.c.levelno >= min_levelno)
    rows = list(session.execute(sa.select(_LOGS).where(*conds).order_by(_LOGS.c.id).limit(limit)))
    following = rows[-1].id if len(rows) == limit else None
    return [log_row(r) for r in rows], following


def queue_stats(session: so.Session) -> dict[str, int]:
    """The queue counts (SPEC 2.2 shape); read-only, unlike the API's read which may fold."""
    return counters.queue_counts(session)
