"""Queueing many new messages at once: the SMTP listener's group commit.

``add_messages`` writes what ``service.add_message`` writes for each message (the message,
its content, its recipients, its ``reception`` event, and when a ``hold``/``defer`` rule in
force catches it, the rule's effect, hit and ``system`` event), but for a whole batch with one
statement per table (a binary COPY on PostgreSQL, a multi-row INSERT on SQLite) instead of
the ORM's unit of work: the rows are plain tuples, the rules in force are read once per batch,
and nothing is flushed per message. On PostgreSQL that
also means one run of the statement-level queue-count trigger per batch instead of one per
message (docs/PERFORMANCE.md, "Side by side with Postfix"). No commit: the caller's
transaction makes the batch durable, and the listener answers 250 only after that commit.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import sqlalchemy as sa
import sqlalchemy.orm as so

from ..control import rulebook
from ..copyinsert import SMALL_BATCH_BYTES, CopyInsert, supported
from ..errors import ValidationFailed
from ..models import DeliveryEvent, Message, MessageContent, Recipient, Rule
from ..rawselect import RawSelect
from ..timeutil import isoformat_z, utcnow
from . import shape
from .content import subject_of
from .states import QueueState, RecipientStatus

# RETURNING makes SQLAlchemy render one multi-row INSERT per batch ("insertmanyvalues")
# instead of handing psycopg an executemany, which runs the statement once per row.
# Executed on the session's connection: Core, without the ORM's bulk-insert bookkeeping.
_INSERT_MESSAGES = sa.insert(Message).returning(Message.id)
_INSERT_CONTENTS = sa.insert(MessageContent).returning(MessageContent.message_id)
_INSERT_RECIPIENTS = sa.insert(Recipient).returning(Recipient.id)
_INSERT_EVENTS = sa.insert(DeliveryEvent).returning(DeliveryEvent.id)
# rulebook.in_force(session, now, ("hold", "defer")) as a prebuilt Core statement: rows with
# the fields matching reads (rulebook.RuleFields), once per batch.
_HOLD_DEFER_RULES = sa.select(Rule.id, Rule.sender, Rule.recipient, Rule.domain, Rule.action,
                              Rule.expires_at).where(
    Rule.expires_at > sa.bindparam("now"),
    sa.or_(Rule.action == "hold", Rule.action == "defer")).order_by(Rule.id)
# On PostgreSQL on the raw psycopg cursor of the batch's transaction (app/rawselect.py).
_HOLD_DEFER_READ = RawSelect(_HOLD_DEFER_RULES)
HOLD_DEFER_RULES = _HOLD_DEFER_RULES  # for a caller that reads them with its own (``rules``)
# Every row of one executemany must name the same columns.
_EVENT_COLUMNS = tuple(c.name for c in DeliveryEvent.__table__.c if c.name != "id")
# On PostgreSQL, the same four tables written by one binary COPY each (app/copyinsert.py):
# psycopg formats the rows in C, no arrays built in Python, less CPU per accepted message in
# the listener and the database (docs/PERFORMANCE.md, "Intake, storage side: binary COPY").
# They run on the raw psycopg cursor of the session's transaction, so SQLAlchemy's
# before_cursor_execute events do not see them. Batches with more than SMALL_BATCH_BYTES of
# content, and SQLite, keep the statements above. Rows are tuples in the order of each COPY's
# columns.
_COPY_MESSAGES = CopyInsert(cast(sa.Table, Message.__table__))
_COPY_CONTENTS = CopyInsert(cast(sa.Table, MessageContent.__table__))
_COPY_RECIPIENTS = CopyInsert(cast(sa.Table, Recipient.__table__))
_COPY_EVENTS = CopyInsert(cast(sa.Table, DeliveryEvent.__table__), _EVENT_COLUMNS)
_EVENT_INDEX = {name: index for index, name in enumerate(_EVENT_COLUMNS)}
_NO_EVENT: tuple[Any, ...] = tuple([] if name == "threats" else None for name in _EVENT_COLUMNS)


@dataclass(frozen=True)
class NewMessage:
    """One message to queue, as ``service.add_message`` takes it."""

    sender: str
    recipients: Sequence[str]
    raw: bytes
    origin: str
    priority: int = 0
    reception_note: str | None = None
    event_fields: Mapping[str, Any] | None = None
    id: str = field(default_factory=lambda: new_message_id())


def new_message_id() -> str:
    return "msg-" + secrets.token_urlsafe(16)


def unique_recipients(recipients: Sequence[str]) -> list[str]:
    """One delivery per mailbox, as every MTA does: the first spelling of each address."""
    seen: set[str] = set()
    unique = []
    for address in recipients:
        if address.lower() not in seen:
            seen.add(address.lower())
            unique.append(address)
    return unique


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


def _event(**values: Any) -> tuple[Any, ...]:
    """An event row in ``_EVENT_COLUMNS`` order: the given values, None or [] elsewhere."""
    row = list(_NO_EVENT)
    for name, value in values.items():
        row[_EVENT_INDEX[name]] = value
    return tuple(row)


def _as_dicts(copy: CopyInsert, rows: Sequence[tuple[Any, ...]]) -> list[dict[str, Any]]:
    return [dict(zip(copy.columns, row, strict=True)) for row in rows]


def add_messages(session: so.Session, new: Sequence[NewMessage],
                 rules: Sequence[Any] | None = None) -> list[str]:
    """Queue every message of ``new``; returns their ids, in order. No commit.

    ``rules``: the hold and defer rules in force, when the caller read them in this
    transaction (``HOLD_DEFER_RULES``'s rows, in its order); otherwise they are read here."""
    if not new:
        return []
    if any(not item.recipients for item in new):
        raise ValidationFailed("A message needs at least one recipient")
    connection = session.connection()
    if rules is None:
        rules = _HOLD_DEFER_READ.rows(connection, {"now": utcnow()})
    messages: list[tuple[Any, ...]] = []
    contents: list[tuple[Any, ...]] = []
    recipients: list[tuple[Any, ...]] = []
    events: list[tuple[Any, ...]] = []
    hits: Counter[int] = Counter()
    counted: Counter[shape.Key] = Counter()  # the queue shape's deltas (shape.note)
    for item in new:
        now = utcnow()
        addresses = unique_recipients(item.recipients)
        rule = rulebook.first_match([r for r in rules if r.expires_at > now], item.sender,
                                    addresses)
        state, due = QueueState.PENDING, now
        if rule is not None:
            state = QueueState.HELD if rule.action == "hold" else QueueState.DEFERRED
            due = now if rule.action == "hold" else rule.expires_at
        # In the order of the tables' columns (_COPY_*.columns).
        messages.append((item.id, item.sender, subject_of(item.raw)[:998], len(item.raw),
                         item.priority, state, 0, item.origin, now, now, due, None))
        contents.append((item.id, item.raw))
        recipients.extend((item.id, address, domain_of(address), RecipientStatus.PENDING, 0,
                           None, None, due, None, None) for address in addresses)
        # The reception says what acceptance did (queued, pending); a rule's effect follows
        # as an event of its own, as in service.add_message.
        events.append(_event(
            **(item.event_fields or {}), timestamp=now, event_type="reception",
            message_id=item.id, sender=item.sender, recipient=", ".join(addresses)[:320],
            message=item.reception_note or f"Message accepted ({item.origin}, "
                                           f"{len(item.raw)} bytes)",
            action="queued", queue_state=QueueState.PENDING))
        if rule is not None:
            hits[rule.id] += 1
            events.append(_rule_event(item, rule, state, now))
        counted.update(shape.row_contribution(state, item.sender, now,
                                              [domain_of(a) for a in addresses]))
    if supported(connection) and sum(len(item.raw) for item in new) <= SMALL_BATCH_BYTES:
        _COPY_MESSAGES.execute(connection, messages)
        _COPY_CONTENTS.execute(connection, contents)
        _COPY_RECIPIENTS.execute(connection, recipients)
        _COPY_EVENTS.execute(connection, events)
    else:
        connection.execute(_INSERT_MESSAGES, _as_dicts(_COPY_MESSAGES, messages))
        connection.execute(_INSERT_CONTENTS, _as_dicts(_COPY_CONTENTS, contents))
        connection.execute(_INSERT_RECIPIENTS, _as_dicts(_COPY_RECIPIENTS, recipients))
        connection.execute(_INSERT_EVENTS, _as_dicts(_COPY_EVENTS, events))
    for rule_id, count in sorted(hits.items()):  # a stable order: concurrent batches lock alike
        connection.execute(sa.update(Rule).where(Rule.id == rule_id)
                           .values(hits=Rule.hits + count))
    shape.note(session, None, counted)
    return [item.id for item in new]


def _rule_event(item: NewMessage, rule: rulebook.RuleFields, state: str,
                now: dt.datetime) -> tuple[Any, ...]:
    action = "held" if state == QueueState.HELD else "deferred"
    return _event(timestamp=now, event_type="system", message_id=item.id, sender=item.sender,
                  message=f"Message {item.id} {action} by rule {rule.id} (until "
                          f"{isoformat_z(rule.expires_at)})",
                  action=action, queue_state=state)
