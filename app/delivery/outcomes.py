"""Recording what one delivery attempt did, in one transaction.

Per recipient: its new state (delivered, deferred with the next retry time, failed), an event
(``delivery``, ``tempfail`` or ``rejection``, which also bumps the hourly rollup), then the
message's queue state (``settle_message_state``), and a bounce when recipients failed for
good. Everything commits together, so the queue, the history and the statistics never
disagree.

Operator actions that raced the attempt win: the message row is locked first (an UPDATE, which
also takes SQLite's write lock up front); a message deleted meanwhile is not re-created, only
what the remote server accepted is still recorded; a held message stays held
(``settle_message_state`` keeps it).
"""

from __future__ import annotations

import datetime as dt
import logging
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa
import sqlalchemy.orm as so

from ..events import bump_rollup, outcome_increments, record_event
from ..metrics import observe_delivery_latency
from ..models import Message, MessageContent
from ..queue.service import accept_message, settle_message_state
from ..timeutil import utcnow
from .bounces import FailedRecipient, build_dsn, dsn_status
from .smtp_client import RecipientResult

log = logging.getLogger("elemta.delivery")

EVENT_OF_KIND = {"delivered": "delivery", "tempfail": "tempfail", "rejection": "rejection"}
ACTION_OF_KIND = {"delivered": "delivered", "tempfail": "deferred", "rejection": "failed"}
EXPIRED = "Queue lifetime expired"


@dataclass(frozen=True)
class OutcomePolicy:
    """The settings that turn a result into a recipient state."""

    retry_schedule: Sequence[int]
    max_queue_lifetime: int
    send_bounces: bool
    reporting_mta: str
    jitter: float = 0.10


def retry_delay(policy: OutcomePolicy, attempts: int, rng: random.Random | None = None) -> float:
    """Seconds until the next attempt after ``attempts`` failed ones: the schedule's step
    (the last one repeats), +-10% so deferred mail does not come back in lockstep."""
    steps = policy.retry_schedule
    base = steps[min(max(attempts, 1), len(steps)) - 1]
    return base * (rng or random).uniform(1 - policy.jitter, 1 + policy.jitter)


@dataclass
class Recorded:
    """What ``record_outcome`` did (for logs and tests)."""

    queue_state: str | None
    message_deleted: bool
    bounce_id: str | None = None


@dataclass
class Attempt:
    """The results of one SMTP attempt (one job) waiting to be recorded."""

    message_id: str
    sender: str
    results: Sequence[RecipientResult]


def record_outcome(session: so.Session, worker_id: str, message_id: str,
                   results: Sequence[RecipientResult], policy: OutcomePolicy,
                   now: dt.datetime | None = None, sender: str | None = None) -> Recorded:
    """Apply the results of one attempt; commits. ``sender`` names the envelope sender in
    the events should the message have been deleted meanwhile."""
    now = now or utcnow()
    if not _lock(session, [message_id], now):
        return _record_for_deleted(session, message_id, results, now, sender)
    [message] = _load(session, [message_id])
    latencies: list[float] = []
    queue_state, failed, increments = _apply(session, worker_id, message, results, policy, now,
                                             latencies)
    bump_rollup(session, increments)
    recorded = Recorded(queue_state=queue_state, message_deleted=False)
    if failed and message.sender and policy.send_bounces:
        recorded.bounce_id = _queue_bounce(session, message, failed, policy)  # commits all
    else:
        session.commit()
    _observe_latencies(latencies)
    return recorded


def record_outcomes(session: so.Session, worker_id: str, attempts: Sequence[Attempt],
                    policy: OutcomePolicy, now: dt.datetime | None = None) -> None:
    """Record many attempts in one transaction (one commit, one rollup bump); commits.

    The worker's hot path: with several messages per transaction the database does a few
    statements per batch instead of a dozen per message. Attempts that may need a bounce are
    recorded one by one (``record_outcome``) so each bounce commits with its own outcome.
    If the batch fails (a deadlock with an operator's bulk action, say), every attempt is
    recorded on its own instead.
    """
    now = now or utcnow()
    singles: list[Attempt] = []
    latencies: list[float] = []
    try:
        ids = sorted({a.message_id for a in attempts})
        present = _lock(session, ids, now)
        messages = {m.id: m for m in _load(session, sorted(present))} if present else {}
        increments: Counter[tuple[dt.datetime, str]] = Counter()
        for attempt in attempts:
            message = messages.get(attempt.message_id)
            if message is None:
                _record_for_deleted(session, attempt.message_id, attempt.results, now,
                                    attempt.sender, commit=False)
                increments.update(outcome_increments(
                    ("delivery", now) for r in attempt.results if r.kind == "delivered"))
                continue
            if _may_bounce(message, attempt.results, policy, now):
                singles.append(attempt)
                continue
            _, _, counted = _apply(session, worker_id, message, attempt.results, policy, now,
                                   latencies)
            increments.update(counted)
        bump_rollup(session, increments)
        session.commit()
    except Exception:
        session.rollback()
        log.warning("recording %d outcomes together failed; recording them one by one",
                    len(attempts), exc_info=True)
        singles = list(attempts)
        latencies = []  # rolled back: the one-by-one recording observes them again
    _observe_latencies(latencies)
    for attempt in singles:
        record_outcome(session, worker_id, attempt.message_id, attempt.results, policy,
                       now=now, sender=attempt.sender)


def _lock(session: so.Session, ids: Sequence[str], now: dt.datetime) -> set[str]:
    """Lock the message rows first (an UPDATE: on SQLite it takes the write lock at once, so
    the transaction cannot fail later on a lock upgrade); returns the ids still queued."""
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


def _may_bounce(message: Message, results: Sequence[RecipientResult], policy: OutcomePolicy,
                now: dt.datetime) -> bool:
    if not (message.sender and policy.send_bounces):
        return False
    expired = now >= message.created_at + dt.timedelta(seconds=policy.max_queue_lifetime)
    return any(r.kind == "rejection" or (r.kind == "tempfail" and expired) for r in results)


def _apply(session: so.Session, worker_id: str, message: Message,
           results: Sequence[RecipientResult], policy: OutcomePolicy, now: dt.datetime,
           latencies: list[float],
           ) -> tuple[str | None, list[FailedRecipient], Counter[tuple[dt.datetime, str]]]:
    """Recipient states, the message's queue state and the events of one attempt; no commit.

    Returns the queue state, the recipients that failed for good (for a bounce) and the
    rollup increments (the caller bumps the rollup once for everything it records). Appends
    each delivered recipient's time in the queue to ``latencies``: the caller observes them
    once its transaction has committed, so a rolled-back batch is not counted.
    """
    message_id = message.id
    by_id = {r.id: r for r in message.recipients}
    expiry = message.created_at + dt.timedelta(seconds=policy.max_queue_lifetime)
    applied: list[tuple[RecipientResult, str]] = []  # (result, final kind)
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
                applied.append((result, "delivered"))
            continue
        kind = result.kind
        recipient.attempts += 1
        recipient.last_attempt_at = now
        recipient.lease_owner = None
        recipient.lease_expires_at = None
        if kind == "delivered":
            recipient.status = "delivered"
            recipient.last_error = None
            recipient.next_attempt_at = None
        elif kind == "tempfail" and now >= expiry:
            kind = "expired"
            recipient.status = "failed"
            recipient.last_error = f"{EXPIRED} (last error: {result.text})"
            recipient.next_attempt_at = None
        elif kind == "tempfail":
            recipient.status = "deferred"
            recipient.last_error = result.text
            delay = dt.timedelta(seconds=retry_delay(policy, recipient.attempts))
            # Never plan past the expiry: the last attempt happens when the lifetime ends.
            recipient.next_attempt_at = min(now + delay, expiry)
        else:
            recipient.status = "failed"
            recipient.last_error = result.text
            recipient.next_attempt_at = None
        applied.append((result, kind))

    queue_state = settle_message_state(session, message, now)
    failed: list[FailedRecipient] = []
    increments: Counter[tuple[dt.datetime, str]] = Counter()
    for result, kind in applied:
        text = result.text
        if kind == "expired":
            text = f"{EXPIRED} (last error: {result.text})"
        event_kind = "rejection" if kind == "expired" else kind
        event_type = EVENT_OF_KIND[event_kind]
        record_event(
            session, event_type, message_id=message_id, sender=message.sender,
            recipient=result.address, message=text, timestamp=now, counts_as_outcome=False,
            delivery_ip=result.remote_ip, delivery_host=result.remote_host,
            smtp_code=result.smtp_code,
            enhanced_code="4.4.7" if kind == "expired" else result.enhanced_code,
            action=ACTION_OF_KIND[event_kind], queue_state=queue_state,
        )
        increments.update(outcome_increments([(event_type, now)]))
        if event_kind == "delivered":
            latencies.append((now - message.created_at).total_seconds())
        if event_kind == "rejection":
            failed.append(FailedRecipient(
                address=result.address,
                status=dsn_status(result.enhanced_code, result.smtp_code, kind == "expired"),
                diagnostic=text, remote_host=result.remote_host, smtp_code=result.smtp_code,
                attempted_at=now))
    return queue_state, failed, increments


def _observe_latencies(latencies: Sequence[float]) -> None:
    """Feed the delivery latency histogram (SPEC 5: acceptance into the queue -> delivered).

    After the commit and in memory only (a histogram bucket increment each), so the batched
    recorder does no extra database work. Recipients of a message deleted during delivery are
    not observed: its acceptance time went with it.
    """
    for seconds in latencies:
        observe_delivery_latency(seconds)


def _record_for_deleted(session: so.Session, message_id: str,
                        results: Sequence[RecipientResult], now: dt.datetime,
                        sender: str | None, commit: bool = True) -> Recorded:
    """The message was deleted while we delivered: record only what the remote accepted."""
    for result in results:
        if result.kind != "delivered":
            continue
        record_event(
            session, "delivery", message_id=message_id, sender=sender, recipient=result.address,
            message=f"{result.text} (message deleted from the queue during delivery)",
            timestamp=now, delivery_ip=result.remote_ip, delivery_host=result.remote_host,
            smtp_code=result.smtp_code, enhanced_code=result.enhanced_code,
            action="delivered", queue_state=None, counts_as_outcome=commit,
        )
    if commit:
        session.commit()
    return Recorded(queue_state=None, message_deleted=True)


def _queue_bounce(session: so.Session, message: Message, failed: Sequence[FailedRecipient],
                  policy: OutcomePolicy) -> str:
    raw = session.scalar(sa.select(MessageContent.raw)
                         .where(MessageContent.message_id == message.id)) or b""
    dsn = build_dsn(original_raw=raw, original_sender=message.sender, message_id=message.id,
                    arrival=message.created_at, failed=failed,
                    reporting_mta=policy.reporting_mta)
    bounce = accept_message(
        session, sender="", recipients=[message.sender], raw=dsn, origin="bounce",
        reception_note=f"Delivery status notification for {message.id} "
                       f"({len(failed)} failed recipient(s))",
    )
    return bounce.id
