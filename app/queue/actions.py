"""Operator actions on queued mail: delete, retry, hold, release and flush, one or in bulk.

Each public function is one unit of work: it changes the rows, records a ``system`` event per
message with the actor, and commits.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from functools import partial
from typing import Any

import sqlalchemy as sa
import sqlalchemy.orm as so

from ..database import describe_error, is_transient_conflict, retry_on_conflict
from ..errors import ApiError, Conflict, ValidationFailed, is_database_unavailable
from ..events import record_event, record_system_events
from ..models import Message, Recipient
from ..timeutil import utcnow
from . import shape
from .locking import lock_in_id_order, locks_rows
from .reading import LIST_TYPES, MessageFilters, get_message, state_condition
from .states import OPEN_STATES, QueueState, RecipientStatus

BULK_TYPES = {
    "flush": LIST_TYPES,
    "retry": (QueueState.DEFERRED.value, QueueState.FAILED.value, "all"),
    "hold": (QueueState.PENDING.value, QueueState.DEFERRED.value, "all"),
    "release": (QueueState.HELD.value,),
    "defer": (QueueState.PENDING.value, QueueState.DEFERRED.value, "all"),
}
# Which queue states each action applies to (its 409 otherwise).
ACTION_FROM_STATES = {
    "retry": (QueueState.PENDING, QueueState.DEFERRED, QueueState.FAILED),
    "hold": (QueueState.PENDING, QueueState.DEFERRED),
    "release": (QueueState.HELD,),
    "defer": (QueueState.PENDING, QueueState.DEFERRED),
}
BULK_CHUNK = 1000

log = logging.getLogger("elemta.queue")


def delete_message(session: so.Session, message_id: str, actor: str) -> None:
    message = get_message(session, message_id)
    if locks_rows(session):  # held until the commit: what the shape takes out is what goes
        lock_in_id_order(session, [Message.id == message.id], for_delete=True)
    shape.leaving(session, Message.id == message.id)
    record_event(session, "system", message_id=message.id, sender=message.sender,
                 message=f"Message {message.id} deleted by {actor}", action="deleted",
                 queue_state=None)
    session.delete(message)
    session.commit()


def retry_message(session: so.Session, message_id: str, actor: str) -> Message:
    return _act_on_one(session, "retry", message_id, actor)


def hold_message(session: so.Session, message_id: str, actor: str) -> Message:
    return _act_on_one(session, "hold", message_id, actor)


def release_message(session: so.Session, message_id: str, actor: str) -> Message:
    return _act_on_one(session, "release", message_id, actor)


PAST_TENSE = {"retry": "retried", "hold": "held", "release": "released", "flush": "flushed",
              "defer": "deferred"}


def _act_on_one(session: so.Session, action: str, message_id: str, actor: str) -> Message:
    message = get_message(session, message_id)
    if action == "hold" and message.queue_state == QueueState.HELD:
        return message  # already where the operator wants it: nothing to change or record
    if message.queue_state not in ACTION_FROM_STATES[action]:
        raise Conflict(f"Cannot {action} message {message_id}: it is {message.queue_state}")
    affected = _apply(session, action, [message.id], actor)
    if not affected:  # changed state between our read and our write
        session.rollback()
        raise Conflict(f"Cannot {action} message {message_id}: its state changed")
    session.commit()
    session.refresh(message)
    return message


def bulk_action(
    session: so.Session,
    action: str,
    queue_type: str,
    filters: MessageFilters,
    actor: str,
    *,
    dry_run: bool = False,
    until: dt.datetime | None = None,
) -> int:
    """Apply an action to every matching message; returns how many were (or would be) affected.

    ``defer`` (rules, docs/DELIVERY.md) makes the messages' open recipients due at ``until``.

    Works in chunks of ids, each its own short transaction, so a flush of a million messages
    never holds one giant lock. Each write re-checks the state, so a message that moved on
    in the meantime is skipped, not wrongly acted on. A chunk that meets a deadlock or another
    transient conflict is rolled back and run again (``retry_on_conflict``); a chunk that still
    fails ends the action with ``BulkActionIncomplete``, which says how many messages the
    committed chunks changed.
    """
    allowed = BULK_TYPES[action]
    if queue_type not in allowed:
        raise ValidationFailed(
            f"Cannot {action} queue {queue_type!r}",
            {"type": [f"Must be one of: {', '.join(allowed)}."]},
        )
    conds = state_condition(queue_type) + filters.conditions()
    if action != "flush":
        conds.append(Message.queue_state.in_(ACTION_FROM_STATES[action]))
    if dry_run:
        return session.scalar(sa.select(sa.func.count()).select_from(Message).where(*conds)) or 0
    ids = list(session.scalars(sa.select(Message.id).where(*conds).order_by(Message.created_at)))
    session.commit()  # end the read transaction; every chunk below is its own
    total = 0
    for start in range(0, len(ids), BULK_CHUNK):
        chunk = ids[start : start + BULK_CHUNK]
        try:
            total += len(retry_on_conflict(
                session, partial(_apply, session, action, chunk, actor, queue_type=queue_type,
                                 until=until),
                what=f"bulk {action} of {queue_type}"))
        except Exception as exc:
            raise BulkActionIncomplete(action, queue_type, total, len(ids), exc) from exc
    return total


class BulkActionIncomplete(ApiError):
    """A bulk action stopped by a database error after ``count`` of ``matched`` messages.

    The status follows the cause: 503 when the database became unreachable, 409 when
    concurrent work kept conflicting beyond the retries, 500 otherwise. ``details`` always
    carries the counts, so a client knows what was done; running the same request again acts
    on the rest (the messages already changed no longer match it). docs/OPERATIONS.md.
    """

    def __init__(self, action: str, queue_type: str, count: int, matched: int,
                 cause: Exception) -> None:
        if is_database_unavailable(cause):
            status, code, why = 503, "SERVICE_UNAVAILABLE", "the database became unavailable"
        elif is_transient_conflict(cause):
            status, code, why = 409, "CONFLICT", "concurrent changes kept conflicting"
        else:
            status, code, why = 500, "INTERNAL_ERROR", "an internal error occurred"
        super().__init__(
            status, code,
            f"Bulk {action} of queue {queue_type} stopped: {why} after {count} of {matched} "
            f"matching message(s) were {PAST_TENSE[action]}; the others are unchanged. Repeat "
            "the request to act on them.",
            {"count": count, "matched": matched})
        level = logging.ERROR if status != 409 else logging.WARNING
        log.log(level, "bulk %s of %s stopped after %d of %d message(s): %s", action,
                queue_type, count, matched, describe_error(cause),
                exc_info=cause if status == 500 else None)


def _apply(
    session: so.Session,
    action: str,
    ids: Sequence[str],
    actor: str,
    *,
    queue_type: str = "all",
    until: dt.datetime | None = None,
) -> list[str]:
    """The state change itself, for a set of ids; returns the ids it changed. No commit."""
    now = utcnow()
    where: list[sa.ColumnElement[bool]] = [Message.id.in_(ids)]
    if queue_type != "all":
        where.append(Message.queue_state == queue_type)
    if action != "flush":
        where.append(Message.queue_state.in_(ACTION_FROM_STATES[action]))
    if locks_rows(session):  # PostgreSQL: lock in a fixed order first (locking.py)
        ids = lock_in_id_order(session, where, for_delete=action == "flush")
        if not ids:
            return []
        where = [Message.id.in_(ids)]  # locked, and still in a state the action applies to
    # The shape's deltas: out before the change, in after it (the rows are locked, or SQLite's
    # write lock is held from this first write on).
    shape.leaving(session, sa.and_(*where))
    if action == "flush":
        delete = sa.delete(Message).where(*where).returning(Message.id, Message.sender)
        rows = session.execute(delete).mappings().all()
        record_system_events(session, rows,
                             f"Message {{id}} flushed from the {queue_type} queue by {actor}",
                             action="flushed", queue_state=None, timestamp=now)
        return [r["id"] for r in rows]

    if action == "hold":
        values: dict[str, Any] = {"queue_state": QueueState.HELD, "updated_at": now}
    elif action == "defer":
        if until is None:
            raise ValueError("defer needs a time")
        values = {"queue_state": QueueState.DEFERRED, "updated_at": now, "next_attempt_at": until}
    else:  # retry, release: due now
        values = {"queue_state": QueueState.PENDING, "updated_at": now, "next_attempt_at": now}
    stmt = (
        sa.update(Message)
        .where(*where)
        .values(**values)
        .returning(Message.id, Message.sender)
        .execution_options(synchronize_session=False)
    )
    rows = session.execute(stmt).mappings().all()
    changed = [r["id"] for r in rows]
    if changed and action in ("retry", "release"):
        # Every recipient not yet delivered becomes due now; retry also revives failed ones.
        revivable = (*OPEN_STATES, RecipientStatus.FAILED) if action == "retry" else OPEN_STATES
        session.execute(
            sa.update(Recipient)
            .where(Recipient.message_id.in_(changed), Recipient.status.in_(revivable))
            .values(status=RecipientStatus.PENDING, next_attempt_at=now)
            .execution_options(synchronize_session=False)
        )
    if changed and action == "defer":
        session.execute(
            sa.update(Recipient)
            .where(Recipient.message_id.in_(changed), Recipient.status.in_(OPEN_STATES))
            .values(next_attempt_at=until)
            .execution_options(synchronize_session=False)
        )
    failed_ids = _fail_released_without_open_recipients(session, changed) \
        if action == "release" else set()
    if changed:
        shape.arriving(session, Message.id.in_(changed))
    for state, group in ((values["queue_state"], [r for r in rows if r["id"] not in failed_ids]),
                         (QueueState.FAILED, [r for r in rows if r["id"] in failed_ids])):
        if group:
            record_system_events(session, group, f"Message {{id}} {PAST_TENSE[action]} by {actor}",
                                 action=PAST_TENSE[action], queue_state=state, timestamp=now)
    return changed


def _fail_released_without_open_recipients(session: so.Session, ids: Sequence[str]) -> set[str]:
    """Released messages with nothing left to deliver go to ``failed``, not ``pending``.

    While a message is held, deliveries under way finish: their permanent failures are recorded
    and the message stays held (settle_message_state). If none of its recipients is still
    pending or deferred, "pending" would be a message no worker ever claims.
    """
    open_recipient = sa.exists().where(Recipient.message_id == Message.id,
                                       Recipient.status.in_(OPEN_STATES))
    stmt = (
        sa.update(Message)
        .where(Message.id.in_(ids), ~open_recipient)
        .values(queue_state=QueueState.FAILED, next_attempt_at=None)
        .returning(Message.id)
        .execution_options(synchronize_session=False)
    )
    return set(session.scalars(stmt))
