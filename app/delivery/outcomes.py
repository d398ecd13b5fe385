"""Recording what delivery attempts did: the policy that judges each result, and the bounce.

The queue writes what an attempt changes (``queue.outcomes.record_attempts``: recipient
states, events, rollup, the message's queue state). Delivery decides what a result means
(``judge``, pure: delivered; deferred until the next step of the retry schedule; failed for
good, or when the queue lifetime ends), queues a bounce for recipients that failed for good
(``bounces.build_dsn``, queued by ``queue.service.add_message``) and commits: the outcome and
its bounce in one transaction.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy.orm as so

from ..database import bound_lock_waits, describe_error, is_unreachable, pipelined
from ..dkim.signing import sign_outgoing
from ..models import Message
from ..queue import shape
from ..queue.failing import FailedMessage
from ..queue.outcomes import Attempt, AttemptResult, Recorded, Verdict, record_attempts
from ..queue.service import add_message
from ..queue.states import RecipientStatus
from ..timeutil import utcnow
from . import content
from .bounces import FailedRecipient, build_dsn, dsn_status

log = logging.getLogger("elemta.delivery")

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


def judge(policy: OutcomePolicy, result: AttemptResult, attempts: int,
          accepted_at: dt.datetime, now: dt.datetime) -> Verdict:
    """What a result makes of its recipient after ``attempts`` attempts (this one counted)."""
    expiry = accepted_at + dt.timedelta(seconds=policy.max_queue_lifetime)
    if result.kind == "delivered":
        return Verdict(RecipientStatus.DELIVERED, None, None)
    if result.kind == "tempfail" and now >= expiry:
        return Verdict(RecipientStatus.FAILED, f"{EXPIRED} (last error: {result.text})", None,
                       expired=True)
    if result.kind == "tempfail":
        delay = dt.timedelta(seconds=retry_delay(policy, attempts))
        # Never plan past the expiry: the last attempt happens when the lifetime ends.
        return Verdict(RecipientStatus.DEFERRED, result.text, min(now + delay, expiry))
    return Verdict(RecipientStatus.FAILED, result.text, None)


def record_outcome(session: so.Session, worker_id: str, message_id: str,
                   results: Sequence[AttemptResult], policy: OutcomePolicy,
                   now: dt.datetime | None = None, sender: str | None = None,
                   lock_wait: float | None = None) -> Recorded:
    """Record one attempt, and its bounce, in one transaction; commits. ``sender`` names the
    envelope sender in the events should the message have been deleted meanwhile;
    ``lock_wait``: the longest wait for a lock, in seconds (``database.bound_lock_waits``)."""
    now = now or utcnow()
    bound_lock_waits(session.connection(), lock_wait)
    [recorded], _ = record_attempts(session, worker_id, [Attempt(message_id, sender, results)],
                                    functools.partial(judge, policy), now)
    if recorded.failures and recorded.sender and policy.send_bounces:
        recorded.bounce_id = _queue_bounce(session, recorded, policy, now)
    session.commit()
    _observe_latencies(recorded.latencies)
    return recorded


class NotRecorded(Exception):
    """Some attempts of a batch were not recorded: ``unrecorded`` (the others committed),
    because of ``cause`` (the database error, say)."""

    def __init__(self, unrecorded: Sequence[Attempt], cause: BaseException) -> None:
        super().__init__(f"{len(unrecorded)} attempt(s) not recorded: {type(cause).__name__}")
        self.unrecorded = list(unrecorded)
        self.cause = cause


def record_outcomes(session: so.Session, worker_id: str, attempts: Sequence[Attempt],
                    policy: OutcomePolicy, now: dt.datetime | None = None, *,
                    lock_wait: float | None = None) -> None:
    """Record many attempts in one transaction (one commit, one rollup bump); commits.

    The worker's hot path: with several messages per transaction the database does a few
    statements per batch instead of a dozen per message. Attempts that may need a bounce are
    recorded one by one (``record_outcome``) so each bounce commits with its own outcome.
    If the batch fails for a reason of its own (a conflict with an operator's action, an
    outcome the database refuses), every attempt is recorded on its own instead; if the
    database cannot be reached, nothing more is tried. Raises ``NotRecorded`` naming the
    attempts that were not committed, so the caller can keep them and try again later
    without recording any attempt twice. ``lock_wait``: no statement waits longer for a lock,
    in seconds (``database.bound_lock_waits``; a longer wait is a transient conflict).
    """
    now = now or utcnow()
    singles: list[Attempt] = []
    latencies: list[float] = []
    try:
        # PostgreSQL: the batch's writes and the COMMIT go in one pipeline, sent together
        # when it ends instead of one round trip each (docs/PERFORMANCE.md, "Delivery, the
        # recorder in one pipeline"; the commit below then costs no round trip). An error met
        # when it ends is judged as any other.
        with pipelined(session, commit=True):
            bound_lock_waits(session.connection(), lock_wait)  # queued: no round trip
            recorded, singles = record_attempts(
                session, worker_id, attempts, functools.partial(judge, policy), now,
                hold_back=functools.partial(_may_bounce, policy, now))
            shape.write_noted(session)
        session.commit()
        latencies = [seconds for r in recorded for seconds in r.latencies]
    except Exception as exc:
        session.rollback()
        if is_unreachable(exc):
            raise NotRecorded(attempts, exc) from exc
        log.warning("recording %d outcomes together failed (%s); recording them one by one",
                    len(attempts), describe_error(exc), exc_info=True)
        singles = list(attempts)
    _observe_latencies(latencies)
    for n, attempt in enumerate(singles):
        try:
            record_outcome(session, worker_id, attempt.message_id, attempt.results, policy,
                           now=now, sender=attempt.sender, lock_wait=lock_wait)
        except Exception as exc:
            session.rollback()
            raise NotRecorded(singles[n:], exc) from exc


def _may_bounce(policy: OutcomePolicy, now: dt.datetime, message: Message,
                results: Sequence[AttemptResult]) -> bool:
    if not (message.sender and policy.send_bounces):
        return False
    expired = now >= message.created_at + dt.timedelta(seconds=policy.max_queue_lifetime)
    return any(r.kind == "rejection" or (r.kind == "tempfail" and expired) for r in results)


def _observe_latencies(latencies: Sequence[float]) -> None:
    """Feed the delivery latency histogram (API.md §5: acceptance into the queue -> delivered).

    After the commit and in memory only (a histogram bucket increment each), so the batched
    recorder does no extra database work. Recipients of a message deleted during delivery are
    not observed: its acceptance time went with it. The metrics module (and prometheus_client)
    is imported at the first delivery, not with the worker: an idle worker never needs it.
    """
    if not latencies:
        return
    from ..metrics import observe_delivery_latency

    for seconds in latencies:
        observe_delivery_latency(seconds)


def _queue_bounce(session: so.Session, recorded: Recorded, policy: OutcomePolicy,
                  now: dt.datetime) -> str:
    """Add the DSN of the attempt's failed recipients to the session's transaction."""
    assert recorded.sender and recorded.created_at is not None
    failed = [FailedRecipient(
        address=f.result.address,
        status=dsn_status(f.result.enhanced_code, f.result.smtp_code, f.expired),
        diagnostic=f.text, remote_host=f.result.remote_host, smtp_code=f.result.smtp_code,
        attempted_at=now) for f in recorded.failures]
    return _add_dsn(session, recorded.message_id, recorded.sender, recorded.created_at, failed,
                    policy.reporting_mta)


def queue_operator_bounce(reporting_mta: str, session: so.Session, failed: FailedMessage,
                          reason: str, now: dt.datetime, *, status: str = "5.7.1") -> None:
    """The DSN of recipients an operator failed (a ``bounce`` rule: ``queue.failing``), in the
    session's transaction; no remote host was involved."""
    _add_dsn(session, failed.message_id, failed.sender, failed.created_at,
             [FailedRecipient(address=address, status=status, diagnostic=reason,
                              remote_host=None, smtp_code=None, attempted_at=now)
              for address in failed.addresses], reporting_mta)


def _add_dsn(session: so.Session, message_id: str, sender: str, arrival: dt.datetime,
             failed: Sequence[FailedRecipient], reporting_mta: str) -> str:
    dsn = build_dsn(original_raw=content.raw(session, message_id), original_sender=sender,
                    message_id=message_id, arrival=arrival, failed=failed,
                    reporting_mta=reporting_mta)
    bounce = add_message(
        session, sender="", recipients=[sender], raw=sign_outgoing(session, dsn),
        origin="bounce",
        reception_note=f"Delivery status notification for {message_id} "
                       f"({len(failed)} failed recipient(s))",
    )
    return bounce.id
