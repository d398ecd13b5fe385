"""Leases on due recipients: which worker delivers what, and until when.

The queue's side of delivery: the worker asks for work (``lease_due``), keeps the leases of
outcomes it could not record yet (``renew_leases``) and gives back what it
will not deliver (``release_leases``); only this module writes the lease columns.

A claim picks messages whose queue state is ``pending`` or ``deferred`` (never ``held`` or
``failed``) that have due, unleased recipients (pending oldest first, deferred most overdue
first), and leases those recipients (one statement per queue state).
On PostgreSQL the message rows are picked ``FOR UPDATE SKIP LOCKED`` so concurrent workers
take disjoint messages without waiting on each other; the UPDATE re-checks the lease, so a
claim committed a moment earlier by another worker is never taken twice. On SQLite the single
UPDATE ... RETURNING statement holds the database's write lock, which makes it atomic.
A lease that expires (its worker died) makes the recipients claimable again.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

import sqlalchemy as sa
import sqlalchemy.orm as so

from ..models import Message, Recipient
from ..timeutil import utcnow
from .states import CLAIMABLE_STATES, OPEN_STATES, QueueState

CLAIM_TRIES = 5


@dataclass(frozen=True)
class ClaimedRecipient:
    id: int
    message_id: str
    address: str
    domain: str


_MESSAGES = cast(sa.Table, Message.__table__)
_RECIPIENTS = cast(sa.Table, Recipient.__table__)


def _due(by_message: bool = False) -> list[sa.ColumnElement[bool]]:
    """Conditions of a due, unleased recipient at the bound time ``now``.

    ``by_message``: for queries that name the message(s); ``lower(status)`` keeps both
    planners off ``ix_recipients_due`` (whose range grows with the queue, and which SQLite
    and a PostgreSQL with stale statistics otherwise pick) and on ``ix_recipients_message_id``.
    """
    r = _RECIPIENTS.c
    now = sa.bindparam("now", type_=r.next_attempt_at.type)
    status = sa.func.lower(r.status) if by_message else r.status
    return [
        status.in_([str(s) for s in OPEN_STATES]),
        r.next_attempt_at <= now,
        sa.or_(r.lease_owner.is_(None), r.lease_expires_at < now),
    ]


def lease_due(session: so.Session, worker_id: str, *, max_messages: int, lease_seconds: int,
              now: dt.datetime | None = None) -> list[ClaimedRecipient]:
    """Lease the due recipients of up to ``max_messages`` messages; commits.

    Returns the claimed recipients ordered by message (a message's recipients are claimed
    together, so they can share SMTP transactions).
    """
    now = now or utcnow()
    for _ in range(CLAIM_TRIES):
        claimed = _claim_once(session, worker_id, max_messages, lease_seconds, now)
        # On PostgreSQL an empty claim can be a lost race, not an empty queue: this
        # statement's snapshot predates another worker's claim, whose messages it then
        # locked after that worker committed, and whose recipients the lease re-check then
        # (rightly) refused. A fresh statement tells which it was.
        if claimed or not has_due(session, now):
            return claimed
    return []


def has_due(session: so.Session, now: dt.datetime) -> bool:
    """Whether any recipient is due and unleased in a claimable message; commits.

    Asked per queue state in the claim's own order, so it reads what a claim would read: an
    idle worker asks every second, and a large deferred queue with nothing due must cost an
    empty index range, not a walk of every deferred row.
    """
    found = any(
        session.scalar(_first_due(state), {"now": now}) is not None
        for state in CLAIMABLE_STATES
    )
    session.commit()
    return found


def _claim_once(session: so.Session, worker_id: str, max_messages: int, lease_seconds: int,
                now: dt.datetime) -> list[ClaimedRecipient]:
    claimed: list[ClaimedRecipient] = []
    messages: set[str] = set()
    # Mail due now first (new, released, retried), then deferred mail whose time came.
    for state in CLAIMABLE_STATES:
        room = max_messages - len(messages)
        if room <= 0:
            break
        rows = session.execute(
            _claim_statement(state, session.get_bind().dialect.name),
            {"now": now, "room": room, "worker": worker_id,
             "expires": now + dt.timedelta(seconds=lease_seconds)}).all()
        claimed.extend(ClaimedRecipient(id=r.id, message_id=r.message_id, address=r.address,
                                        domain=r.domain) for r in rows)
        messages.update(r.message_id for r in rows)
    session.commit()
    claimed.sort(key=lambda c: (c.message_id, c.id))
    return claimed


# The claim's statements are built once (per queue state and dialect) with bound parameters:
# building them per claim, and SQLAlchemy's cache key of each new statement, cost about a third
# of a claim's CPU; they are Core statements on the tables, so the ORM's bulk-UPDATE machinery
# is not in the way either.


def _due_messages(state: QueueState) -> sa.Select[str]:
    """Ids of messages in ``state`` with a due, unleased recipient at the bound ``now``, in
    the order claims take them.

    ``pending`` mail (new, released, retried: all of it due) is taken oldest first along
    ``ix_messages_queue_state_created``. ``deferred`` mail is taken most overdue first along
    ``ix_messages_queue_state_due`` (queue_state, next_attempt_at, id): the index range holds
    only what is due, so a large deferred queue whose retry times have not come costs nothing.
    (Walking deferred mail by creation time instead read every deferred row whenever none was
    due: seconds per idle poll at 500 k deferred messages; docs/DELIVERY.md.)

    The per-message check of due recipients is kept a correlated subquery (OFFSET 0 stops
    PostgreSQL from turning it into a join, which it plans quadratically when its statistics
    lag behind a burst of new mail); it probes ``ix_recipients_message_id`` (see ``_due``).
    """
    m, r = _MESSAGES.c, _RECIPIENTS.c
    has_due = (
        sa.select(sa.literal(1))
        .where(r.message_id == m.id, *_due(by_message=True))
        .offset(0)
        .exists()
    )
    order = (m.created_at, m.id) if state == QueueState.PENDING else (m.next_attempt_at, m.id)
    return (
        sa.select(m.id)
        .where(m.queue_state == str(state),
               m.next_attempt_at <= sa.bindparam("now", type_=m.next_attempt_at.type),
               has_due)
        .order_by(*order)
    )


@functools.cache
def _first_due(state: QueueState) -> sa.Select[str]:
    return _due_messages(state).limit(1)


@functools.cache
def _claim_statement(state: QueueState, dialect: str) -> sa.Update:
    """UPDATE the due recipients of the first ``room`` claimable messages in ``state``, leased
    to ``worker`` until ``expires`` (all bound at execution)."""
    picked = _due_messages(state).limit(sa.bindparam("room", type_=sa.Integer))
    if dialect == "postgresql":
        picked = picked.with_for_update(skip_locked=True)
    r = _RECIPIENTS.c
    return (
        sa.update(_RECIPIENTS)
        .where(r.message_id.in_(picked.scalar_subquery()), *_due(by_message=True))
        .values(lease_owner=sa.bindparam("worker", type_=r.lease_owner.type),
                lease_expires_at=sa.bindparam("expires", type_=r.lease_expires_at.type))
        .returning(r.id, r.message_id, r.address, r.domain)
    )


def release_leases(session: so.Session, worker_id: str,
                   recipient_ids: Iterable[int] | None = None) -> int:
    """Give back leases of this worker (all of them, or the given recipients); commits.

    Only the lease is cleared: the recipients stay due and another worker takes them at once.
    """
    stmt = sa.update(Recipient).where(Recipient.lease_owner == worker_id)
    if recipient_ids is not None:
        ids = list(recipient_ids)
        if not ids:
            return 0
        stmt = stmt.where(Recipient.id.in_(ids))
    result = cast(sa.CursorResult[Any], session.execute(
        stmt.values(lease_owner=None, lease_expires_at=None)
        .execution_options(synchronize_session=False)
    ))
    session.commit()
    return result.rowcount or 0


def renew_leases(session: so.Session, worker_id: str, recipient_ids: Iterable[int], *,
                 lease_seconds: int, now: dt.datetime | None = None) -> int:
    """Extend this worker's leases of the given recipients to ``lease_seconds`` from now;
    commits. A lease that expired is renewed too, unless another worker claimed the
    recipient meanwhile (then it is that worker's). Returns how many were renewed."""
    ids = list(recipient_ids)
    if not ids:
        return 0
    now = now or utcnow()
    result = cast(sa.CursorResult[Any], session.execute(
        sa.update(Recipient)
        .where(Recipient.lease_owner == worker_id, Recipient.id.in_(ids))
        .values(lease_expires_at=now + dt.timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False)
    ))
    session.commit()
    return result.rowcount or 0


def postpone_leases(session: so.Session, worker_id: str, recipient_ids: Iterable[int],
                    until: dt.datetime) -> int:
    """Give back leases of this worker with a new due time, without counting an attempt;
    commits. For work the worker may not start yet (a destination's limits: docs/DELIVERY.md)."""
    ids = list(recipient_ids)
    if not ids:
        return 0
    result = cast(sa.CursorResult[Any], session.execute(
        sa.update(Recipient)
        .where(Recipient.lease_owner == worker_id, Recipient.id.in_(ids))
        .values(lease_owner=None, lease_expires_at=None, next_attempt_at=until)
        .execution_options(synchronize_session=False)
    ))
    session.commit()
    return result.rowcount or 0
