"""Failing queued recipients for good on an operator's word: a ``bounce`` rule (API.md §16.4).

The other verbs of the bulk service (``actions.py``) act on whole messages; a rule's filter
names recipients (``recipient``, ``domain``), so a bounce fails exactly the recipients it
matches and leaves the message's others to be delivered. Same shape as ``bulk_action``: the
matching message ids are read once, then worked on in chunks, each its own short transaction
(retried on a transient conflict), messages locked in id order first (``locking.py``). Per
failed recipient a ``rejection`` event (a delivery outcome, as a remote 5xx is), per message
the DSN through ``bounce`` in the same transaction (the caller builds it: the queue knows
nothing of DSNs), and the message's state settled from its recipients.

Only open recipients of ``pending`` and ``deferred`` messages that no worker holds a live lease
on are failed: a held message stays the operator's (as for ``hold``/``defer`` rules), and a
delivery under way finishes and is recorded as usual.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import sqlalchemy as sa
import sqlalchemy.orm as so

from ..database import retry_on_conflict
from ..events import record_event
from ..models import Message, Recipient
from ..timeutil import utcnow
from .actions import BULK_CHUNK, BulkActionIncomplete
from .locking import lock_in_id_order, locks_rows
from .reading import MessageFilters
from .service import settle_message_state
from .states import OPEN_STATES, QueueState, RecipientStatus

FAILABLE_STATES = (QueueState.PENDING, QueueState.DEFERRED)


@dataclass(frozen=True)
class FailedMessage:
    """What a bounce reports: the message and the recipients just failed."""

    message_id: str
    sender: str
    created_at: dt.datetime
    addresses: list[str]


Bounce = Callable[[so.Session, FailedMessage, str, dt.datetime], None]


@dataclass(frozen=True)
class Failed:
    messages: int
    recipients: int


def fail_recipients(session: so.Session, filters: MessageFilters, reason: str, *,
                    enhanced_code: str, bounce: Bounce | None = None) -> Failed:
    """Fail the matching recipients of queued mail, chunk by chunk, each chunk committed.

    ``filters``: ``sender`` matches the message, ``recipient`` and ``domain`` the recipient
    (``before``/``after`` are not used). ``reason`` is each recipient's ``last_error`` and its
    event's text; ``bounce(session, failed, reason, now)`` adds the DSN to the transaction.
    """
    msg_conds = [*MessageFilters(sender=filters.sender).conditions(),
                 Message.queue_state.in_(FAILABLE_STATES)]
    ids = list(session.scalars(
        sa.select(Message.id)
        .where(*msg_conds, sa.exists().where(Recipient.message_id == Message.id,
                                             *_recipient_conditions(filters, utcnow())))
        .order_by(Message.created_at)))
    session.commit()  # end the read transaction; every chunk below is its own
    messages = recipients = 0
    for start in range(0, len(ids), BULK_CHUNK):
        chunk = ids[start : start + BULK_CHUNK]
        try:
            done = retry_on_conflict(
                session, partial(_fail_chunk, session, chunk, filters, reason, enhanced_code,
                                 bounce), what="bounce of queued recipients")
        except Exception as exc:
            raise BulkActionIncomplete("bounce", "all", messages, len(ids), exc) from exc
        messages += len(done)
        recipients += sum(len(f.addresses) for f in done)
    return Failed(messages, recipients)


def _recipient_conditions(filters: MessageFilters,
                          now: dt.datetime) -> list[sa.ColumnElement[bool]]:
    conds: list[sa.ColumnElement[bool]] = [
        Recipient.status.in_(OPEN_STATES),
        sa.or_(Recipient.lease_owner.is_(None), Recipient.lease_expires_at < now),
    ]
    if filters.recipient:
        conds.append(sa.func.lower(Recipient.address).contains(filters.recipient.lower(),
                                                               autoescape=True))
    if filters.domain:
        conds.append(Recipient.domain == filters.domain.lower())
    return conds


def _fail_chunk(session: so.Session, ids: Sequence[str], filters: MessageFilters, reason: str,
                enhanced_code: str, bounce: Bounce | None) -> list[FailedMessage]:
    """The change itself for one chunk; no commit. Returns what it failed, per message."""
    now = utcnow()
    where = [Message.id.in_(list(ids)), Message.queue_state.in_(FAILABLE_STATES)]
    if locks_rows(session):  # PostgreSQL: lock in a fixed order first (locking.py)
        ids = lock_in_id_order(session, where)
        if not ids:
            return []
        where = [Message.id.in_(ids)]
    else:  # SQLite: take the write lock now, not at a later lock upgrade
        ids = list(session.scalars(
            sa.update(Message).where(*where).values(updated_at=now).returning(Message.id)
            .execution_options(synchronize_session=False)))
        where = [Message.id.in_(ids)]
    targets = set(session.scalars(sa.select(Recipient.id).where(
        Recipient.message_id.in_(list(ids)), *_recipient_conditions(filters, now))))
    messages = session.scalars(
        sa.select(Message).where(*where).order_by(Message.id)
        .options(so.selectinload(Message.recipients))
        .execution_options(populate_existing=True))
    done: list[FailedMessage] = []
    for message in messages:
        failed = [r for r in message.recipients if r.id in targets]
        if not failed:
            continue
        for recipient in failed:
            recipient.status = RecipientStatus.FAILED
            recipient.last_error = reason
            recipient.next_attempt_at = None
        state = settle_message_state(session, message, now)
        for recipient in failed:
            record_event(session, "rejection", message_id=message.id, sender=message.sender,
                         recipient=recipient.address, message=reason, timestamp=now,
                         enhanced_code=enhanced_code, action="failed", queue_state=state)
        result = FailedMessage(message.id, message.sender, message.created_at,
                               [r.address for r in failed])
        if bounce is not None and message.sender:
            bounce(session, result, reason, now)
        done.append(result)
    return done
