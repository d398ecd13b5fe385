"""The states of queued mail, as types: a message's queue state and a recipient's status.

The database stores the same words (``messages.queue_state``, ``recipients.status``, both
checked by constraints); a ``StrEnum`` member is the string itself, so it compares, hashes,
binds and serialises as the word.
"""

from __future__ import annotations

from enum import StrEnum


class QueueState(StrEnum):
    """Where a message is in the queue (``messages.queue_state``)."""

    PENDING = "pending"  # due now (new, released, retried)
    DEFERRED = "deferred"  # waiting for its next retry time
    HELD = "held"  # stopped by an operator
    FAILED = "failed"  # nothing left to try; kept for the failed-mail retention


class RecipientStatus(StrEnum):
    """How delivery to one recipient stands (``recipients.status``)."""

    PENDING = "pending"
    DEFERRED = "deferred"
    DELIVERED = "delivered"
    FAILED = "failed"


# Recipients still to be delivered: a worker may claim them, a released message has them.
OPEN_STATES: tuple[RecipientStatus, ...] = (RecipientStatus.PENDING, RecipientStatus.DEFERRED)
# Messages a worker claims from (never held or failed ones), in the order claims take them.
CLAIMABLE_STATES: tuple[QueueState, ...] = (QueueState.PENDING, QueueState.DEFERRED)
