"""What the streams read from the database and the JSON frames they send (API.md §7).

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

import sqlalchemy.orm as so

from ..logs import feed
from ..logs.schemas import MessageEventSchema, SystemLogSchema
from ..queue import counters

ROW_BATCH = 1000


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
    item_json: str  # API.md §4.2 item
    queue_json: str | None  # {"message_id", "action", "queue"} when the event changed the queue


@dataclass(frozen=True, slots=True)
class LogRow:
    id: int
    levelno: int
    item_json: str  # API.md §4.1 item


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
# Through the logs area's reads (``logs.feed``) and the queue's counters.


def max_ids(session: so.Session) -> tuple[int, int]:
    """The newest delivery event id and system log id (0 when empty)."""
    return feed.newest_ids(session)


def events_after(session: so.Session, after: int, limit: int = ROW_BATCH) -> list[EventRow]:
    return [event_row(r) for r in feed.event_rows(session, after, limit)]


def logs_after(session: so.Session, after: int, limit: int = ROW_BATCH) -> list[LogRow]:
    return [log_row(r) for r in feed.log_rows(session, after, limit)]


def events_by_ids(session: so.Session, ids: Iterable[int]) -> list[EventRow]:
    return [event_row(r) for r in feed.event_rows_by_ids(session, ids)]


def logs_by_ids(session: so.Session, ids: Iterable[int]) -> list[LogRow]:
    return [log_row(r) for r in feed.log_rows_by_ids(session, ids)]


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
    rows = feed.event_rows(session, after, limit, upto=upto, event_type=event_type,
                           queue_changes_only=queue_changes_only)
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
    rows = feed.log_rows(session, after, limit, upto=upto, min_levelno=min_levelno)
    following = rows[-1].id if len(rows) == limit else None
    return [log_row(r) for r in rows], following


def queue_stats(session: so.Session) -> dict[str, int]:
    """The queue counts (API.md §2.2 shape); read-only, unlike the API's read which may fold."""
    return counters.queue_counts(session)
