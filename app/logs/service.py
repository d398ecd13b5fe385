"""Reading system logs and message events; pruning old system logs (API.md §4).

Both listings are newest first by id (the order rows were stored in) and read at most one
index range per branch, so the newest page costs the same at ten rows or ten million:

- system logs: ``ORDER BY id DESC LIMIT n``; with a minimum level, one branch per stored level
  at or above it, each walking ``ix_system_logs_levelno_id`` backwards, merged by id.
- message events: ``WHERE <filter> [AND id < cursor] ORDER BY id DESC LIMIT n + 1`` over
  ``ix_delivery_events_type_id`` / ``_message_id`` / ``_recipient`` (all end in ``id``); with an
  ``event_type``, the ids are selected first (``id IN (SELECT id ... LIMIT n + 1)``) so that
  PostgreSQL reads them from the ``(event_type, id)`` index instead of filtering the primary key.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import sqlalchemy as sa
import sqlalchemy.orm as so

from ..cursors import decode_cursor_payload, encode_cursor_payload
from ..errors import ValidationFailed
from ..models import DeliveryEvent, SystemLog
from ..timeutil import utcnow
from .levels import CANONICAL_LEVELNOS

CURSOR_VERSION = "e1"

# The columns of a API.md §4.2 item. Listings read plain rows (no ORM identity map): a page of
# a thousand events is serialised, never modified.
EVENT_ITEM_COLUMNS = (
    DeliveryEvent.id, DeliveryEvent.timestamp, DeliveryEvent.event_type,
    DeliveryEvent.message_id, DeliveryEvent.sender, DeliveryEvent.recipient,
    DeliveryEvent.delivery_ip, DeliveryEvent.delivery_host, DeliveryEvent.smtp_code,
    DeliveryEvent.spam_score, DeliveryEvent.threats, DeliveryEvent.message,
    DeliveryEvent.failure_class,
)
LOG_ITEM_COLUMNS = (
    SystemLog.id, SystemLog.timestamp, SystemLog.level, SystemLog.logger, SystemLog.message,
    SystemLog.process,
)


def list_system_logs(session: so.Session, *, min_levelno: int | None = None,
                     limit: int = 100) -> list[sa.RowMapping]:
    """The newest ``limit`` log records at ``min_levelno`` or above, newest first."""
    query = sa.select(*LOG_ITEM_COLUMNS).order_by(SystemLog.id.desc()).limit(limit)
    levels = [n for n in CANONICAL_LEVELNOS if min_levelno is None or n >= min_levelno]
    if len(levels) < len(CANONICAL_LEVELNOS):
        # One index range per level (levelno = L ORDER BY id DESC LIMIT n) instead of a range
        # scan over levelno that would have to sort: rare levels stay fast in a big table.
        branches = [
            sa.select(
                sa.select(SystemLog.id).where(SystemLog.levelno == number)
                .order_by(SystemLog.id.desc()).limit(limit).subquery().c.id
            )
            for number in levels
        ]
        newest_ids = sa.union_all(*branches).subquery()
        query = query.where(SystemLog.id.in_(sa.select(newest_ids.c.id)))
    return list(session.execute(query).mappings())


def prune_system_logs(executor: sa.Connection | so.Session, retention_seconds: int,
                      now: dt.datetime | None = None) -> int:
    """Delete log records older than the retention (0 keeps everything); the caller commits."""
    if retention_seconds <= 0:
        return 0
    cutoff = (now or utcnow()) - dt.timedelta(seconds=retention_seconds)
    result = cast(sa.CursorResult[Any],
                  executor.execute(sa.delete(SystemLog).where(SystemLog.timestamp < cutoff)))
    return int(result.rowcount or 0)


def prune_now(session: so.Session, retention_seconds: int) -> int:
    """``flask logs prune``: delete records older than the retention and commit.

    ``prune_system_logs`` leaves the commit to its caller because the handler runs it inside a
    transaction of its own engine.
    """
    count = prune_system_logs(session, retention_seconds)
    session.commit()
    return count


# --------------------------------------------------------------------------- message events


@dataclass
class EventPage:
    items: Sequence[sa.RowMapping]
    next_cursor: str | None


def encode_event_cursor(event_id: int) -> str:
    """Opaque to clients: the id of the last event of a page."""
    return encode_cursor_payload([CURSOR_VERSION, event_id])


def decode_event_cursor(cursor: str) -> int:
    """The event id a page continues below; 400 unless ``encode_event_cursor`` made it."""
    try:
        value = decode_cursor_payload(cursor)
        # Exactly [CURSOR_VERSION, id]; type() because True == 1 and 1.0 == 1 in Python.
        if not (isinstance(value, list) and len(value) == 2 and value[0] == CURSOR_VERSION
                and type(value[1]) is int and 0 < value[1] < 2**63):
            raise ValueError("not an event cursor")
        return value[1]
    except ValueError:
        raise ValidationFailed("Invalid cursor",
                               {"cursor": ["Not a cursor from this API."]}) from None


def list_message_events(
    session: so.Session,
    *,
    event_type: str | None = None,
    message_id: str | None = None,
    recipient: str | None = None,
    failure_class: str | None = None,
    limit: int = 100,
    cursor: str | None = None,
) -> EventPage:
    """One page of message events, newest first, by keyset on id.

    Events added while a client pages get higher ids, so they never shift later pages: no
    gap, no repeat. ``recipient`` and ``message_id`` are exact matches (index lookups);
    ``failure_class`` reads the partial index ``ix_delivery_events_failure_class``.
    """
    conditions: list[Any] = []
    if event_type:
        conditions.append(DeliveryEvent.event_type == event_type)
    if failure_class:
        conditions.append(DeliveryEvent.failure_class == failure_class)
    if message_id:
        conditions.append(DeliveryEvent.message_id == message_id)
    if recipient:
        conditions.append(DeliveryEvent.recipient == recipient)
    if cursor:
        conditions.append(DeliveryEvent.id < decode_event_cursor(cursor))
    query = sa.select(*EVENT_ITEM_COLUMNS)
    if event_type or failure_class:
        # Ids first, then the rows. Asked for whole rows, PostgreSQL walks the primary key
        # backwards filtering on event_type (a common type looks cheap to find that way),
        # and reads millions of rows when the newest events are of other types. Asked for
        # ids only, it reads them from ix_delivery_events_type_id (index-only, one range).
        newest_ids = (
            sa.select(DeliveryEvent.id).where(*conditions)
            .order_by(DeliveryEvent.id.desc()).limit(limit + 1).subquery()
        )
        query = query.where(DeliveryEvent.id.in_(sa.select(newest_ids.c.id)))
    else:
        query = query.where(*conditions)
    rows = session.execute(
        query.order_by(DeliveryEvent.id.desc()).limit(limit + 1)
    ).mappings().all()
    next_cursor = encode_event_cursor(rows[limit - 1]["id"]) if len(rows) > limit else None
    return EventPage(items=rows[:limit], next_cursor=next_cursor)


def message_event_pages(session: so.Session, *, page_size: int = 1000,
                        cursor: str | None = None, **filters: Any
                        ) -> Iterator[Sequence[sa.RowMapping]]:
    """Every event matching the filters, newest first, one keyset page at a time (exports):
    the pages ``list_message_events`` gives, followed to the end. A bad cursor is refused
    here, before the answer starts (a generator would only find out once streaming)."""
    if cursor:
        decode_event_cursor(cursor)
    return _event_pages(session, page_size, cursor, filters)


def _event_pages(session: so.Session, page_size: int, cursor: str | None,
                 filters: dict[str, Any]) -> Iterator[Sequence[sa.RowMapping]]:
    while True:
        page = list_message_events(session, limit=page_size, cursor=cursor, **filters)
        if page.items:
            yield page.items
        if page.next_cursor is None:
            return
        cursor = page.next_cursor
