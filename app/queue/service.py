"""The queue's services: every query and every state change of queued mail.

Views, CLI commands, the SMTP listener and the delivery worker all call these functions; none of
them writes a message, recipient or queue state by itself. Each public function is one unit of
work: it changes rows, records the events, and commits. Functions meant to be combined into a
caller's transaction say "no commit" (``add_message``, ``settle_message_state``); their caller
commits.

This module holds acceptance and the state derived from recipients; reading and the operator
actions live beside it (``reading.py``, ``actions.py``) and are re-exported here, so callers
have one name to import: ``from app.queue import service``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy.orm as so

from ..control import rulebook
from ..errors import ValidationFailed
from ..events import record_event
from ..models import Message, MessageContent, Recipient, Rule
from ..timeutil import isoformat_z, utcnow
from . import shape
from .accepting import (  # noqa: F401  (re-exported, as below)
    NewMessage,
    add_messages,
    domain_of,
    new_message_id,
    unique_recipients,
)
from .actions import (  # noqa: F401  (re-exported: the queue's one service interface)
    ACTION_FROM_STATES,
    BULK_CHUNK,
    BULK_TYPES,
    PAST_TENSE,
    bulk_action,
    delete_message,
    hold_message,
    release_message,
    retry_message,
)
from .content import subject_of
from .reading import (  # noqa: F401  (re-exported, as above)
    LIST_TYPES,
    MESSAGE_ID,
    TIMELINE_LIMIT,
    MessageFilters,
    Page,
    count_messages,
    decode_cursor,
    encode_cursor,
    get_message,
    init_stats_reads,
    list_messages,
    message_detail,
    message_pages,
    message_raw,
    message_timeline,
    messages_by_ids,
    oldest_per_state,
    queue_stats,
    shared_queue_stats,
)
from .shape import read_shape  # noqa: F401  (re-exported, as above)
from .states import OPEN_STATES, QueueState, RecipientStatus

if TYPE_CHECKING:
    from .outcomes import MessageRow

# --------------------------------------------------------------------------- acceptance


def accept_message(
    session: so.Session,
    *,
    sender: str,
    recipients: Sequence[str],
    raw: bytes,
    origin: str,
    priority: int = 0,
    reception_note: str | None = None,
    event_fields: dict[str, Any] | None = None,
) -> Message:
    """Queue a message and record its ``reception`` (``add_message``); commits.

    The message is durable once this returns: the SMTP listener answers 250 only after it.
    """
    message = add_message(session, sender=sender, recipients=recipients, raw=raw, origin=origin,
                          priority=priority, reception_note=reception_note,
                          event_fields=event_fields)
    session.commit()
    return message


def add_message(
    session: so.Session,
    *,
    sender: str,
    recipients: Sequence[str],
    raw: bytes,
    origin: str,
    priority: int = 0,
    reception_note: str | None = None,
    event_fields: dict[str, Any] | None = None,
) -> Message:
    """Queue a message for every recipient and record its ``reception``; no commit.

    For callers that combine it with more in one transaction: a bounce with its delivery
    outcome. The SMTP listener's group commit queues its batches with ``add_messages``
    (``accepting.py``: the same rows, written set-based).
    """
    if not recipients:
        raise ValidationFailed("A message needs at least one recipient")
    now = utcnow()
    message = Message(
        id=new_message_id(),
        sender=sender,
        subject=subject_of(raw)[:998],
        size=len(raw),
        priority=priority,
        queue_state=QueueState.PENDING,
        attempts=0,
        origin=origin,
        created_at=now,
        updated_at=now,
        next_attempt_at=now,
    )
    message.content = MessageContent(raw=raw)
    for address in unique_recipients(recipients):
        message.recipients.append(
            Recipient(
                address=address,
                domain=domain_of(address),
                status=RecipientStatus.PENDING,
                attempts=0,
                next_attempt_at=now,
            )
        )
    session.add(message)
    rule = rulebook.first_match(rulebook.in_force(session, now, ("hold", "defer")), sender,
                                [r.address for r in message.recipients])
    record_event(
        session,
        "reception",
        message_id=message.id,
        sender=sender,
        recipient=", ".join(r.address for r in message.recipients)[:320],
        message=reception_note or f"Message accepted ({origin}, {len(raw)} bytes)",
        timestamp=now,
        action="queued",
        queue_state=QueueState.PENDING,
        **(event_fields or {}),
    )
    if rule is not None:
        _apply_rule(session, message, rule, now)
    shape.note(session, None, shape.contribution(message))
    return message


def _apply_rule(session: so.Session, message: Message, rule: Rule, now: dt.datetime) -> None:
    """A rule in force caught the new message: held, or deferred until the rule expires."""
    if rule.action == "hold":
        message.queue_state = QueueState.HELD
        action = "held"
    else:
        message.queue_state = QueueState.DEFERRED
        message.next_attempt_at = rule.expires_at
        for recipient in message.recipients:
            recipient.next_attempt_at = rule.expires_at
        action = "deferred"
    rulebook.count_hit(session, rule.id)
    record_event(session, "system", message_id=message.id, sender=message.sender,
                 message=f"Message {message.id} {action} by rule {rule.id} (until "
                         f"{isoformat_z(rule.expires_at)})",
                 timestamp=now, action=action, queue_state=message.queue_state)


# --------------------------------------------------------------------------- derived state


def settle_message_state(session: so.Session, message: Message | MessageRow,
                         now: dt.datetime | None = None, *, remove: bool = True) -> str | None:
    """Recompute a message's queue state from its recipients after delivery outcomes.

    ``message``: an ORM object, or the delivery recorder's plain row (``remove`` false).

    Returns the new state, or ``None`` when every recipient is delivered and the message left
    the queue: deleted here, or by the caller when ``remove`` is false (the delivery recorder
    deletes a batch's messages in one statement). A held message stays held (the operator's
    action wins). No commit.
    """
    now = now or utcnow()
    open_recipients = [r for r in message.recipients if r.status in OPEN_STATES]
    failed = [r for r in message.recipients if r.status == RecipientStatus.FAILED]
    message.attempts = max((r.attempts for r in message.recipients), default=0)
    message.updated_at = now
    errors = [r.last_error for r in message.recipients if r.last_error
              and r.status != RecipientStatus.DELIVERED]
    message.last_error = errors[-1] if errors else None
    if not open_recipients and not failed:
        if remove:
            session.delete(message)
        return None
    if open_recipients:
        message.next_attempt_at = min(
            (r.next_attempt_at for r in open_recipients if r.next_attempt_at), default=now
        )
        if message.queue_state != QueueState.HELD:
            due_now = any(r.status == RecipientStatus.PENDING for r in open_recipients)
            message.queue_state = QueueState.PENDING if due_now else QueueState.DEFERRED
    else:
        message.next_attempt_at = None
        if message.queue_state != QueueState.HELD:
            message.queue_state = QueueState.FAILED
    return message.queue_state
