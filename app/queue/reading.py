"""Reading the queue: stats, filtered keyset pages, one message with its content and timeline."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
import sqlalchemy.orm as so
from flask import Flask, current_app

from ..cursors import decode_cursor_payload, encode_cursor_payload
from ..errors import NotFound, ValidationFailed
from ..models import DeliveryEvent, Message, MessageContent, Recipient
from ..readcoalesce import ReadCoalescer
from ..sqltypes import UTCDateTime
from ..timeutil import parse_iso
from . import counters
from .states import QueueState

MESSAGE_ID = re.compile(r"^msg-[A-Za-z0-9_-]{8,60}$")
# The queues an operator names (plain words: click and marshmallow take them as choices).
LIST_TYPES: tuple[str, ...] = (*(state.value for state in QueueState), "all")
TIMELINE_LIMIT = 1000


@dataclass
class MessageFilters:
    """The listing filters of API.md §2.2; every one optional, combined with AND."""

    sender: str | None = None
    recipient: str | None = None
    domain: str | None = None
    before: dt.datetime | None = None
    after: dt.datetime | None = None

    def is_empty(self) -> bool:
        return not any((self.sender, self.recipient, self.domain, self.before, self.after))

    def conditions(self) -> list[sa.ColumnElement[bool]]:
        conds: list[sa.ColumnElement[bool]] = []
        if self.sender:
            conds.append(
                sa.func.lower(Message.sender).contains(self.sender.lower(), autoescape=True)
            )
        if self.recipient:
            conds.append(
                sa.exists().where(
                    Recipient.message_id == Message.id,
                    sa.func.lower(Recipient.address).contains(
                        self.recipient.lower(), autoescape=True
                    ),
                )
            )
        if self.domain:
            conds.append(
                sa.exists().where(
                    Recipient.message_id == Message.id,
                    Recipient.domain == self.domain.lower(),
                )
            )
        if self.before:
            conds.append(Message.created_at < self.before)
        if self.after:
            conds.append(Message.created_at > self.after)
        return conds


@dataclass
class Page:
    items: list[Message]
    total: int
    next_cursor: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def queue_stats(session: so.Session | so.scoped_session[Any]) -> dict[str, int]:
    """The counts per state (``counters.counts_folding``); given the scoped ``db.session``, a
    GET request reads them without creating its ORM session (``database.DriverRead``)."""
    return counters.counts_folding(session)


STATS_READS = "elemta_queue_stats_reads"  # the app's ReadCoalescer of queue_stats


def init_stats_reads(app: Flask) -> None:
    app.extensions[STATS_READS] = ReadCoalescer[dict[str, int]]("queue stats", copy=dict)


def shared_queue_stats(session: so.Session | so.scoped_session[Any]) -> dict[str, int]:
    """``queue_stats`` for ``GET /api/queue/stats``: the concurrent requests of this process
    share one read, which started after each of them arrived (app/readcoalesce.py); the
    leader's ``session`` reads for all of them."""
    reads: ReadCoalescer[dict[str, int]] = current_app.extensions[STATS_READS]
    return reads.read(lambda: queue_stats(session))


def oldest_per_state(session: so.Session) -> dict[str, dt.datetime | None]:
    """When the oldest message of each queue state was accepted (None for an empty state).

    One indexed MIN per state (``ix_messages_queue_state_created``): four index probes.
    """
    oldest = sa.select(*[
        sa.type_coerce(sa.select(sa.func.min(Message.created_at))
                       .where(Message.queue_state == state).scalar_subquery(),
                       UTCDateTime()).label(state.value)
        for state in QueueState
    ])
    return dict(session.execute(oldest).one()._mapping)


def state_condition(queue_type: str) -> list[sa.ColumnElement[bool]]:
    if queue_type not in LIST_TYPES:
        raise ValidationFailed(
            f"Unknown queue type {queue_type!r}", {
                "type": [f"Must be one of: {', '.join(LIST_TYPES)}."]}
        )
    return [] if queue_type == "all" else [Message.queue_state == queue_type]


def encode_cursor(message: Message) -> str:
    return encode_cursor_payload([message.created_at.isoformat(), message.id])


def decode_cursor(cursor: str) -> tuple[dt.datetime, str]:
    """The (created_at, id) after which a page starts; 400 unless ``encode_cursor`` made it."""
    try:
        value = decode_cursor_payload(cursor)
        # Exactly what encode_cursor writes: [ISO timestamp, message id], both strings.
        if not (isinstance(value, list) and len(value) == 2
                and all(isinstance(item, str) for item in value)):
            raise ValueError("not a queue cursor")
        created, message_id = value
        if not MESSAGE_ID.fullmatch(message_id):
            raise ValueError("bad id")
        return parse_iso(created), message_id
    except ValueError:
        raise ValidationFailed("Invalid cursor",
                               {"cursor": ["Not a cursor from this API."]}) from None


def list_messages(
    session: so.Session,
    queue_type: str,
    filters: MessageFilters,
    *,
    limit: int = 100,
    cursor: str | None = None,
    with_total: bool = True,
) -> Page:
    """One page of messages, oldest first, by keyset on (created_at, id); ``total`` is -1
    unless ``with_total`` (a COUNT with filters)."""
    conds = state_condition(queue_type) + filters.conditions()
    query = sa.select(Message).where(*conds)
    if cursor:
        created, last_id = decode_cursor(cursor)
        # A row-value comparison is an index range on (queue_state, created_at, id): a deep
        # page costs what the first does. The equivalent OR form is only a filter and makes
        # PostgreSQL walk every earlier entry of the queue (40 ms at 30k deep, seconds at 1M).
        query = query.where(
            sa.tuple_(Message.created_at, Message.id) > sa.tuple_(
                sa.literal(created, UTCDateTime()), sa.literal(last_id, Message.id.type))
        )
    query = (
        query.order_by(Message.created_at, Message.id)
        .limit(limit + 1)
        .options(so.selectinload(Message.recipients))
    )
    rows = list(session.scalars(query))
    next_cursor = encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    total = count_messages(session, queue_type, filters) if with_total else -1
    return Page(items=rows[:limit], total=total, next_cursor=next_cursor)


def message_pages(session: so.Session, queue_type: str, filters: MessageFilters, *,
                  page_size: int = 500, cursor: str | None = None) -> Iterator[list[Message]]:
    """Every matching message, oldest first, one keyset page at a time (exports). Each page
    leaves the session's identity map once the next is asked for, so memory stays one page.
    The type and the cursor are checked here, before the answer starts streaming."""
    state_condition(queue_type)
    if cursor:
        decode_cursor(cursor)
    return _message_pages(session, queue_type, filters, page_size, cursor)


def _message_pages(session: so.Session, queue_type: str, filters: MessageFilters,
                   page_size: int, cursor: str | None) -> Iterator[list[Message]]:
    while True:
        page = list_messages(session, queue_type, filters, limit=page_size, cursor=cursor,
                             with_total=False)
        if page.items:
            yield page.items
        session.expunge_all()
        if page.next_cursor is None:
            return
        cursor = page.next_cursor


def count_messages(session: so.Session, queue_type: str, filters: MessageFilters) -> int:
    """Messages matching the filters; without filters, from the O(1) counters."""
    conds = state_condition(queue_type) + filters.conditions()  # 400 for an unknown type
    if filters.is_empty():
        stats = queue_stats(session)
        return stats["total" if queue_type == "all" else queue_type]
    return session.scalar(sa.select(sa.func.count()).select_from(Message).where(*conds)) or 0


def get_message(session: so.Session, message_id: str) -> Message:
    """The message with its recipients; 404 ``MESSAGE_NOT_FOUND`` when unknown or malformed."""
    if not MESSAGE_ID.match(message_id or ""):
        raise NotFound(f"Message {message_id} not found", "MESSAGE_NOT_FOUND")
    message = session.scalar(
        sa.select(Message)
        .where(Message.id == message_id)
        .options(so.selectinload(Message.recipients))
    )
    if message is None:
        raise NotFound(f"Message {message_id} not found", "MESSAGE_NOT_FOUND")
    return message


def message_raw(session: so.Session, message_id: str) -> bytes:
    get_message(session, message_id)
    return session.scalar(
        sa.select(MessageContent.raw).where(MessageContent.message_id == message_id)
    ) or b""


def message_timeline(session: so.Session, message_id: str) -> list[DeliveryEvent]:
    """This message's events, newest first."""
    return list(
        session.scalars(
            sa.select(DeliveryEvent)
            .where(DeliveryEvent.message_id == message_id)
            .order_by(DeliveryEvent.id.desc())
            .limit(TIMELINE_LIMIT)
        )
    )


def messages_by_ids(session: so.Session, ids: Iterable[str]) -> list[Message]:
    return list(
        session.scalars(
            sa.select(Message).where(Message.id.in_(list(ids)))
            .options(so.selectinload(Message.recipients))
        )
    )


def message_detail(session: so.Session, message_id: str) -> Message:
    """The message with recipients and its timeline (``.timeline``, newest first)."""
    message = get_message(session, message_id)
    message.timeline = message_timeline(session, message.id)
    return message
