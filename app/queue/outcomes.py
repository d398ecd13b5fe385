"""Recording delivery attempts in the queue: recipient states, queue state, events, rollup.

The delivery worker judges what each SMTP result means (``delivery.outcomes.judge``: the retry
schedule, the queue lifetime) and hands the attempts here; this module is the only writer of
what an attempt changes. Per recipient: its new state and an event (``delivery``, ``tempfail``
or ``rejection``); then the message's queue state (``settle_message_state``); the hourly rollup
is bumped once for everything recorded. Nothing commits: the caller adds what belongs to the
same transaction (a bounce) and commits, so the queue, the history and the statistics never
disagree.

Operator actions that raced the attempt win: the message rows are locked first (an UPDATE,
which also takes SQLite's write lock up front); a message deleted meanwhile is not re-created,
only what the remote server accepted is still recorded; a held message stays held
(``settle_message_state`` keeps it).

The batch is read and written as plain rows (Core statements on the session's connection),
not as ORM objects: loading, tracking and flushing an object per message and recipient was
the largest part of the worker's CPU per delivered message (docs/PERFORMANCE.md, issue 13).
``Row``/``RecipientRow`` carry the columns ``settle_message_state`` and the queue shape read;
what changed is written back by one UPDATE per table (executemany: psycopg pipelines it).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import sqlalchemy as sa
import sqlalchemy.orm as so
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import psycopg as postgresql_psycopg

from ..control.suppression import suppress_after_failure, suppresses
from ..database import combined_writes, driver_read, driver_write
from ..events import Increments, event_row, insert_event_rows
from ..models import DeliveryEvent, Message, Recipient
from ..sqltypes import UTC, UTCDateTime
from . import shape
from .service import settle_message_state
from .states import RecipientStatus

log = logging.getLogger("elemta.delivery")

EVENT_OF_STATUS = {RecipientStatus.DELIVERED: "delivery", RecipientStatus.DEFERRED: "tempfail",
                   RecipientStatus.FAILED: "rejection"}
ACTION_OF_STATUS = {RecipientStatus.DELIVERED: "delivered",
                    RecipientStatus.DEFERRED: "deferred", RecipientStatus.FAILED: "failed"}
EXPIRED_CODE = "4.4.7"  # RFC 3463: delivery time expired


class AttemptResult(Protocol):
    """What one recipient's SMTP attempt gave (``delivery.smtp_client.RecipientResult``)."""

    recipient_id: int
    address: str
    kind: str  # delivered | tempfail | rejection
    text: str
    smtp_code: int | None
    enhanced_code: str | None
    remote_host: str | None
    remote_ip: str | None


@dataclass(frozen=True)
class Verdict:
    """What a result makes of its recipient, as the delivery policy judged it."""

    status: RecipientStatus
    last_error: str | None
    next_attempt_at: dt.datetime | None
    expired: bool = False  # a temporary failure at the end of the queue lifetime


DELIVERED = Verdict(RecipientStatus.DELIVERED, None, None)

# (result, the recipient's attempts counting this one, the message's acceptance, now) -> Verdict
Judge = Callable[[AttemptResult, int, dt.datetime, dt.datetime], Verdict]


@dataclass
class Attempt:
    """The results of one SMTP attempt (one job) waiting to be recorded."""

    message_id: str
    sender: str | None  # for the events should the message have been deleted meanwhile
    results: Sequence[AttemptResult]
    # Tried before, and the try failed: its commit may have reached the database all the
    # same (the connection was lost before the answer), so what looks like a lost lease or a
    # deleted message may be our own earlier record.
    retried: bool = False


@dataclass(frozen=True)
class Failure:
    """A recipient that failed for good in this attempt (what a bounce reports)."""

    result: AttemptResult
    text: str
    expired: bool


@dataclass
class Recorded:
    """What recording one attempt did (for the bounce, the metrics, logs and tests)."""

    message_id: str
    queue_state: str | None
    message_deleted: bool
    sender: str | None = None
    created_at: dt.datetime | None = None
    failures: list[Failure] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # seconds in the queue, per delivery
    bounce_id: str | None = None


def record_attempts(
    session: so.Session,
    worker_id: str,
    attempts: Sequence[Attempt],
    judge: Judge,
    now: dt.datetime,
    *,
    hold_back: Callable[[MessageRow, Sequence[AttemptResult]], bool] | None = None,
) -> tuple[list[Recorded], list[Attempt]]:
    """Record attempts in the session's transaction, with one rollup bump; no commit.

    ``hold_back(message, results)`` names attempts to leave out (the caller records them in
    transactions of their own); they are returned second, untouched.
    """
    ids = sorted({a.message_id for a in attempts})
    # The transaction's connection, asked for once: ``Session.connection()`` costs about as
    # much as building a statement's parameters, and a batch used it eight times.
    connection = session.connection()
    messages = _lock_and_load(connection, ids, now)
    increments = Increments()
    recorded: list[Recorded] = []
    held: list[Attempt] = []
    gone: list[str] = []  # every recipient delivered: the message leaves the queue
    events = Events(connection)
    for attempt in attempts:
        message = messages.get(attempt.message_id)
        if message is None:
            recorded.append(_record_for_deleted(attempt, now, increments, events,
                                                _already_recorded(session, attempt)))
        elif hold_back is not None and hold_back(message, attempt.results):
            held.append(attempt)
        else:
            recorded.append(_apply(session, worker_id, message, attempt, judge, now,
                                   increments, events))
            if recorded[-1].queue_state is None:
                # Settled, not deleted: _delete does it (its recipients go with it).
                gone.append(message.id)
    leaving = set(gone)
    changed = [m for m in messages.values() if m.changed and m.id not in leaving]
    _write_back(connection, changed)
    # PostgreSQL: the group's last writes (events, DELETE, the two rollups, the queue-shape
    # deltas) as one statement; they touch five different tables and read nothing written
    # before them in this statement (``database.combined_writes``).
    with combined_writes(connection):
        events.write()
        _delete(connection, gone)
        increments.bump(session, connection)
        shape.write_noted(session)
    return recorded, held


class RecipientRow:
    """A recipient of a message being recorded, as read (``_lock_and_load``)."""

    __slots__ = ("id", "address", "domain", "status", "attempts", "last_error",
                 "last_attempt_at", "next_attempt_at", "lease_owner", "lease_expires_at",
                 "changed")

    def __init__(self, values: Sequence[Any]) -> None:
        (self.id, self.address, self.domain, self.status, self.attempts, self.last_error,
         self.last_attempt_at, self.next_attempt_at, self.lease_owner,
         self.lease_expires_at) = values
        self.changed = False


class MessageRow:
    """A message being recorded with its recipients (in id order), as read; what
    ``settle_message_state`` and ``shape.contribution`` read and set of a ``Message``."""

    __slots__ = ("id", "sender", "created_at", "queue_state", "attempts", "updated_at",
                 "next_attempt_at", "last_error", "recipients", "changed")

    def __init__(self, values: Sequence[Any]) -> None:
        (self.id, self.sender, self.created_at, self.queue_state, self.attempts,
         self.updated_at, self.next_attempt_at, self.last_error) = values
        self.recipients: list[RecipientRow] = []
        self.changed = False


_M = cast(sa.Table, Message.__table__)
_R = cast(sa.Table, Recipient.__table__)
_MESSAGE_COLUMNS = (_M.c.id, _M.c.sender, _M.c.created_at, _M.c.queue_state, _M.c.attempts,
                    _M.c.updated_at, _M.c.next_attempt_at, _M.c.last_error)
_RECIPIENT_COLUMNS = (_R.c.id, _R.c.address, _R.c.domain, _R.c.status, _R.c.attempts,
                      _R.c.last_error, _R.c.last_attempt_at, _R.c.next_attempt_at,
                      _R.c.lease_owner, _R.c.lease_expires_at)
_SPLIT = len(_MESSAGE_COLUMNS)
# Built once (an expanding IN): the same statements every batch, compiled once.
_LOAD = (sa.select(*_MESSAGE_COLUMNS, *_RECIPIENT_COLUMNS)
         .select_from(_M.outerjoin(_R, _R.c.message_id == _M.c.id))
         .where(_M.c.id.in_(sa.bindparam("ids", expanding=True)))
         .order_by(_M.c.id, _R.c.id))
# PostgreSQL: the ids as one array parameter (``= ANY``), not an expanding IN: SQLAlchemy
# renders an expanding IN again for every batch (a tenth of the recorder's CPU for its two
# statements); the array's statement is the same text every time.
_IDS = sa.bindparam("ids", type_=postgresql.ARRAY(sa.String))
# PostgreSQL: the loading SELECT takes the message rows' locks itself, in id order, as
# lock_in_id_order takes them (FOR NO KEY UPDATE OF messages: the recipients are not locked).
_LOAD_LOCKING = (sa.select(*_MESSAGE_COLUMNS, *_RECIPIENT_COLUMNS)
                 .select_from(_M.outerjoin(_R, _R.c.message_id == _M.c.id))
                 .where(_M.c.id == sa.any_(_IDS))
                 .order_by(_M.c.id, _R.c.id)
                 .with_for_update(key_share=True, of=_M))
# The same on the driver's cursor (``database.driver_read``): SQLAlchemy's execution and its
# result processing (a ``UTCDateTime`` conversion a timestamp, the rows' description) cost
# about a quarter of the recorder's CPU a group. Fixed text: psycopg prepares it after five
# uses. The rows come back as lists; the timestamps are converted to UTC here.
_LOAD_LOCKING_SQL = str(_LOAD_LOCKING.compile(dialect=postgresql_psycopg.dialect())).replace(
    "%(ids)s", "%s")
_LOAD_TIMES = tuple(n for n, c in enumerate(_MESSAGE_COLUMNS + _RECIPIENT_COLUMNS)
                    if isinstance(c.type, UTCDateTime))
# SQLite: an UPDATE first takes the write lock at once, so the transaction cannot fail later
# on a lock upgrade.
_TOUCH = (sa.update(_M).where(_M.c.id.in_(sa.bindparam("ids", expanding=True)))
          .values(updated_at=sa.bindparam("now", type_=_M.c.updated_at.type))
          .returning(_M.c.id))
_WRITE_RECIPIENT = (
    sa.update(_R).where(_R.c.id == sa.bindparam("rid"))
    .values(status=sa.bindparam("v_status"), attempts=sa.bindparam("v_attempts"),
            last_error=sa.bindparam("v_last_error"),
            last_attempt_at=sa.bindparam("v_last_attempt_at", type_=_R.c.last_attempt_at.type),
            next_attempt_at=sa.bindparam("v_next_attempt_at", type_=_R.c.next_attempt_at.type),
            lease_owner=None, lease_expires_at=None))
_WRITE_MESSAGE = (
    sa.update(_M).where(_M.c.id == sa.bindparam("mid"))
    .values(queue_state=sa.bindparam("v_queue_state"), attempts=sa.bindparam("v_attempts"),
            last_error=sa.bindparam("v_last_error"),
            updated_at=sa.bindparam("v_updated_at", type_=_M.c.updated_at.type),
            next_attempt_at=sa.bindparam("v_next_attempt_at", type_=_M.c.next_attempt_at.type)))
_DELETE = sa.delete(_M).where(_M.c.id.in_(sa.bindparam("ids", expanding=True)))


def _write_back(connection: sa.Connection, messages: Sequence[MessageRow]) -> None:
    """The recipients the batch changed, then their messages: one executemany each."""
    recipients = [{"rid": r.id, "v_status": str(r.status), "v_attempts": r.attempts,
                   "v_last_error": r.last_error, "v_last_attempt_at": r.last_attempt_at,
                   "v_next_attempt_at": r.next_attempt_at}
                  for m in messages for r in m.recipients if r.changed]
    if recipients:
        connection.execute(_WRITE_RECIPIENT, recipients)
    if messages:
        connection.execute(_WRITE_MESSAGE, [
            {"mid": m.id, "v_queue_state": str(m.queue_state), "v_attempts": m.attempts,
             "v_last_error": m.last_error, "v_updated_at": m.updated_at,
             "v_next_attempt_at": m.next_attempt_at} for m in messages])


class Events:
    """The outcome events of a batch, written together in one INSERT (``events.record_events``)
    instead of one ORM object each, in the order they were added."""

    def __init__(self, connection: sa.Connection) -> None:
        self.connection = connection
        self.rows: list[dict[str, Any]] = []

    def add(self, event_type: str, **fields: Any) -> dict[str, Any]:
        row = event_row(event_type, **fields)
        self.rows.append(row)
        return row

    def write(self) -> None:
        """Insert what was added so far (before anything that records events of its own)."""
        insert_event_rows(self.connection, self.rows)
        self.rows = []


def _lock_and_load(connection: sa.Connection, ids: Sequence[str],
                   now: dt.datetime) -> dict[str, MessageRow]:
    """Lock the message rows first, then load those still queued with their recipients.

    On PostgreSQL the loading SELECT takes the row locks itself, in id order, as every writer
    of several messages does (locking.py). On SQLite an UPDATE comes first: it takes the write
    lock at once, so the transaction cannot fail later on a lock upgrade.
    """
    rows: Iterable[Sequence[Any]]
    if connection.dialect.name == "postgresql":  # locks rows (locking.locks_rows)
        # One statement instead of a locking SELECT, an UPDATE and a loading SELECT
        # (docs/PERFORMANCE.md, the recorder), read on the driver's cursor.
        rows = driver_read(connection, _LOAD_LOCKING_SQL, [list(ids)])
        for row in rows:
            for n in _LOAD_TIMES:
                if row[n] is not None:
                    row[n] = row[n].astimezone(UTC)  # as UTCDateTime reads it
    else:
        present = connection.execute(_TOUCH, {"ids": list(ids), "now": now}).scalars().all()
        if not present:
            return {}
        rows = connection.execute(_LOAD, {"ids": sorted(present)})
    messages: dict[str, MessageRow] = {}
    for row in rows:
        message = messages.get(row[0])
        if message is None:
            message = messages[row[0]] = MessageRow(row[:_SPLIT])
        if row[_SPLIT] is not None:
            message.recipients.append(RecipientRow(row[_SPLIT:]))
    return messages


def _delete(connection: sa.Connection, ids: Sequence[str]) -> None:
    """Delete the messages whose recipients are all delivered, in one statement.

    Their recipients and content go with them (``ON DELETE CASCADE``), and PostgreSQL's count
    trigger runs once for the batch: through the unit of work it was one DELETE per recipient
    and one per message, each firing the trigger. The rows are locked already.
    """
    if not ids:
        return
    if connection.dialect.name == "postgresql":
        # On the driver's connection: a fixed text, nothing to bind but the ids' array.
        driver_write(connection, "DELETE FROM messages WHERE id = ANY(%s::varchar[])",
                     [list(ids)])
    else:
        connection.execute(_DELETE, {"ids": list(ids)})


def _already_recorded(session: so.Session, attempt: Attempt) -> set[str]:
    """Recipients of a retried attempt whose delivery is recorded already (an ambiguous
    commit: see ``Attempt.retried``); empty for a first try."""
    if not attempt.retried:
        return set()
    return set(session.scalars(
        sa.select(DeliveryEvent.recipient).where(
            DeliveryEvent.message_id == attempt.message_id,
            DeliveryEvent.event_type == "delivery",
            DeliveryEvent.recipient.in_([r.address for r in attempt.results]))))


def _contribution(message: MessageRow) -> Counter[shape.Key]:
    """``shape.contribution`` of a row."""
    return shape.row_contribution(message.queue_state, message.sender, message.created_at,
                                  [r.domain for r in message.recipients
                                   if r.status != RecipientStatus.DELIVERED])


def _apply(session: so.Session, worker_id: str, message: MessageRow,
           attempt: Attempt, judge: Judge, now: dt.datetime,
           increments: Increments, events: Events) -> Recorded:
    """Recipient states, the message's queue state and the events of one attempt.

    Adds the rollup increments to ``increments`` (the caller bumps the rollup once for
    everything it records). The recorded latencies are for the caller to observe once its
    transaction has committed, so a rolled-back batch is not counted.
    """
    message_id = message.id
    results = attempt.results
    counted_before = _contribution(message)
    by_id = {r.id: r for r in message.recipients}
    applied: list[tuple[AttemptResult, Verdict]] = []
    for result in results:
        recipient = by_id.get(result.recipient_id)
        if recipient is None:
            continue
        if recipient.lease_owner != worker_id:
            # Our lease expired and another worker took the recipient over: its state is
            # that worker's to write. What the remote accepted is still a fact worth recording
            # (unless it is recorded already: our own earlier commit, see Attempt.retried).
            if recipient.lease_owner is None and result.kind == "delivered" \
                    and result.address in _already_recorded(session, attempt):
                continue
            log.warning("lease of %s (%s) lost before the outcome was recorded",
                        recipient.address, message_id)
            if result.kind == "delivered":
                applied.append((result, DELIVERED))
            continue
        recipient.attempts += 1
        verdict = judge(result, recipient.attempts, message.created_at, now)
        recipient.last_attempt_at = now
        recipient.lease_owner = None
        recipient.lease_expires_at = None
        recipient.status = verdict.status
        recipient.last_error = verdict.last_error
        recipient.next_attempt_at = verdict.next_attempt_at
        recipient.changed = True
        applied.append((result, verdict))

    recorded = Recorded(message_id=message_id, message_deleted=False, sender=message.sender,
                        created_at=message.created_at,
                        queue_state=settle_message_state(session, message, now,
                                                         remove=False))
    message.changed = True
    shape.note(session, counted_before,
               None if recorded.queue_state is None
               else _contribution(message))
    for result, verdict in applied:
        text = (verdict.last_error or result.text) if verdict.expired else result.text
        event_type = EVENT_OF_STATUS[verdict.status]
        latency = (now - message.created_at).total_seconds()
        row = events.add(
            event_type, message_id=message_id, sender=message.sender,
            recipient=result.address, message=text, timestamp=now,
            delivery_ip=result.remote_ip, delivery_host=result.remote_host,
            smtp_code=result.smtp_code,
            enhanced_code=EXPIRED_CODE if verdict.expired else result.enhanced_code,
            action=ACTION_OF_STATUS[verdict.status], queue_state=recorded.queue_state,
            latency=latency,
        )
        increments.add_row(row)
        if verdict.status == RecipientStatus.DELIVERED:
            recorded.latencies.append(latency)
        elif verdict.status == RecipientStatus.FAILED:
            recorded.failures.append(Failure(result, text, verdict.expired))
            # A mailbox that does not exist: no new mail is sent to it (docs/DELIVERY.md).
            if not verdict.expired and suppresses(result.smtp_code, result.enhanced_code,
                                                  result.text):
                events.write()  # the suppression's own event comes after this outcome's
                suppress_after_failure(session, result.address, result.text,
                                       result.enhanced_code, message_id, now,
                                       sender=message.sender,
                                       queue_state=recorded.queue_state)
    return recorded


def _record_for_deleted(attempt: Attempt, now: dt.datetime,
                        increments: Increments, events: Events,
                        already_recorded: set[str]) -> Recorded:
    """The message was deleted while we delivered: record only what the remote accepted
    (and, for a retried attempt, what is not recorded yet: it may have been us who deleted it,
    the last delivery removing the message)."""
    for result in attempt.results:
        if result.kind != "delivered" or result.address in already_recorded:
            continue
        row = events.add(
            "delivery", message_id=attempt.message_id, sender=attempt.sender,
            recipient=result.address,
            message=f"{result.text} (message deleted from the queue during delivery)",
            timestamp=now, delivery_ip=result.remote_ip, delivery_host=result.remote_host,
            smtp_code=result.smtp_code, enhanced_code=result.enhanced_code,
            action="delivered", queue_state=None,
        )
        increments.add_row(row)  # latency unknown: the message, and its age, are gone
    return Recorded(message_id=attempt.message_id, queue_state=None, message_deleted=True,
                    sender=attempt.sender)
