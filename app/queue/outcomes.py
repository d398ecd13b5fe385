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
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import sqlalchemy as sa
import sqlalchemy.orm as so

from ..events import bump_rollup, outcome_increments, record_event
from ..models import Message
from .locking import lock_in_id_order, locks_rows
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
    hold_back: Callable[[Message, Sequence[AttemptResult]], bool] | None = None,
) -> tuple[list[Recorded], list[Attempt]]:
    """Record attempts in the session's transaction, with one rollup bump; no commit.

    ``hold_back(message, results)`` names attempts to leave out (the caller records them in
    transactions of their own); they are returned second, untouched.
    """
    ids = sorted({a.message_id for a in attempts})
    present = _lock(session, ids, now)
    messages = {m.id: m for m in _load(session, sorted(present))} if present else {}
    increments: Counter[tuple[dt.datetime, str]] = Counter()
    recorded: list[Recorded] = []
    held: list[Attempt] = []
    for attempt in attempts:
        message = messages.get(attempt.message_id)
        if message is None:
            recorded.append(_record_for_deleted(session, attempt, now, increments))
        elif hold_back is not None and hold_back(message, attempt.results):
            held.append(attempt)
        else:
            recorded.append(_apply(session, worker_id, message, attempt.results, judge, now,
                                   increments))
    bump_rollup(session, increments)
    return recorded, held


def _lock(session: so.Session, ids: Sequence[str], now: dt.datetime) -> set[str]:
    """Lock the message rows first (an UPDATE: on SQLite it takes the write lock at once, so
    the transaction cannot fail later on a lock upgrade); returns the ids still queued.
    On PostgreSQL in id order, as every writer of several messages does (locking.py)."""
    if locks_rows(session):
        ids = lock_in_id_order(session, [Message.id.in_(list(ids))])
    rows = session.execute(
        sa.update(Message).where(Message.id.in_(list(ids))).values(updated_at=now)
        .returning(Message.id).execution_options(synchronize_session=False)
    ).scalars().all()
    return set(rows)


def _load(session: so.Session, ids: Sequence[str]) -> list[Message]:
    return list(session.scalars(
        sa.select(Message).where(Message.id.in_(list(ids)))
        .options(so.selectinload(Message.recipients))
        .execution_options(populate_existing=True)
    ))


def _apply(session: so.Session, worker_id: str, message: Message,
           results: Sequence[AttemptResult], judge: Judge, now: dt.datetime,
           increments: Counter[tuple[dt.datetime, str]]) -> Recorded:
    """Recipient states, the message's queue state and the events of one attempt.

    Adds the rollup increments to ``increments`` (the caller bumps the rollup once for
    everything it records). The recorded latencies are for the caller to observe once its
    transaction has committed, so a rolled-back batch is not counted.
    """
    message_id = message.id
    by_id = {r.id: r for r in message.recipients}
    applied: list[tuple[AttemptResult, Verdict]] = []
    for result in results:
        recipient = by_id.get(result.recipient_id)
        if recipient is None:
            continue
        if recipient.lease_owner != worker_id:
            # Our lease expired and another worker took the recipient over: its state is
            # that worker's to write. What the remote accepted is still a fact worth recording.
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
        applied.append((result, verdict))

    recorded = Recorded(message_id=message_id, message_deleted=False, sender=message.sender,
                        created_at=message.created_at,
                        queue_state=settle_message_state(session, message, now))
    for result, verdict in applied:
        text = (verdict.last_error or result.text) if verdict.expired else result.text
        event_type = EVENT_OF_STATUS[verdict.status]
        record_event(
            session, event_type, message_id=message_id, sender=message.sender,
            recipient=result.address, message=text, timestamp=now, counts_as_outcome=False,
            delivery_ip=result.remote_ip, delivery_host=result.remote_host,
            smtp_code=result.smtp_code,
            enhanced_code=EXPIRED_CODE if verdict.expired else result.enhanced_code,
            action=ACTION_OF_STATUS[verdict.status], queue_state=recorded.queue_state,
        )
        increments.update(outcome_increments([(event_type, now)]))
        if verdict.status == RecipientStatus.DELIVERED:
            recorded.latencies.append((now - message.created_at).total_seconds())
        elif verdict.status == RecipientStatus.FAILED:
            recorded.failures.append(Failure(result, text, verdict.expired))
    return recorded


def _record_for_deleted(session: so.Session, attempt: Attempt, now: dt.datetime,
                        increments: Counter[tuple[dt.datetime, str]]) -> Recorded:
    """The message was deleted while we delivered: record only what the remote accepted."""
    for result in attempt.results:
        if result.kind != "delivered":
            continue
        record_event(
            session, "delivery", message_id=attempt.message_id, sender=attempt.sender,
            recipient=result.address,
            message=f"{result.text} (message deleted from the queue during delivery)",
            timestamp=now, delivery_ip=result.remote_ip, delivery_host=result.remote_host,
            smtp_code=result.smtp_code, enhanced_code=result.enhanced_code,
            action="delivered", queue_state=None, counts_as_outcome=False,
        )
        increments.update(outcome_increments([("delivery", now)]))
    return Recorded(message_id=attempt.message_id, queue_state=None, message_deleted=True,
                    sender=attempt.sender)
