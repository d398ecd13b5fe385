"""``settle_message_state``: a message's queue state derived from its recipients' states."""

from __future__ import annotations

import datetime as dt

import pytest

from app.models import Message, Recipient
from app.queue.service import settle_message_state
from app.queue.states import QueueState, RecipientStatus

NOW = dt.datetime(2026, 1, 28, 12, 0, tzinfo=dt.UTC)
LATER = NOW + dt.timedelta(minutes=5)
MUCH_LATER = NOW + dt.timedelta(hours=1)


class Deletions:
    """The one session call the rule makes: it deletes a message that left the queue."""

    def __init__(self) -> None:
        self.deleted: list[object] = []

    def delete(self, instance: object) -> None:
        self.deleted.append(instance)


def message(state: QueueState, *recipients: tuple[RecipientStatus, int, str | None,
                                                   dt.datetime | None]) -> Message:
    msg = Message(id="msg-unit-test-0001", queue_state=state, attempts=0,
                  created_at=NOW, updated_at=NOW)
    msg.recipients = [
        Recipient(address=f"r{i}@example.net", domain="example.net", status=status,
                  attempts=attempts, last_error=error, next_attempt_at=due)
        for i, (status, attempts, error, due) in enumerate(recipients)
    ]
    return msg


def settle(msg: Message) -> tuple[str | None, Deletions]:
    session = Deletions()
    return settle_message_state(session, msg, now=NOW), session  # type: ignore[arg-type]


def test_all_delivered_leaves_the_queue():
    msg = message(QueueState.PENDING, (RecipientStatus.DELIVERED, 1, None, None),
                  (RecipientStatus.DELIVERED, 2, None, None))
    state, session = settle(msg)
    assert state is None
    assert session.deleted == [msg]


def test_one_due_recipient_makes_it_pending_due_at_the_earliest():
    msg = message(QueueState.DEFERRED, (RecipientStatus.PENDING, 0, None, LATER),
                  (RecipientStatus.DEFERRED, 2, "451 later", MUCH_LATER))
    state, session = settle(msg)
    assert state == QueueState.PENDING
    assert msg.next_attempt_at == LATER
    assert msg.attempts == 2
    assert msg.last_error == "451 later"
    assert msg.updated_at == NOW
    assert session.deleted == []


def test_only_deferred_recipients_make_it_deferred():
    msg = message(QueueState.PENDING, (RecipientStatus.DEFERRED, 1, "451 a", MUCH_LATER),
                  (RecipientStatus.DELIVERED, 1, None, None))
    state, _ = settle(msg)
    assert state == QueueState.DEFERRED
    assert msg.next_attempt_at == MUCH_LATER


def test_an_open_recipient_without_a_time_is_due_now():
    msg = message(QueueState.PENDING, (RecipientStatus.DEFERRED, 1, "451 a", None))
    settle(msg)
    assert msg.next_attempt_at == NOW


def test_nothing_open_and_one_failed_makes_it_failed():
    msg = message(QueueState.DEFERRED, (RecipientStatus.FAILED, 3, "550 no such user", None),
                  (RecipientStatus.DELIVERED, 1, "451 earlier", None))
    state, session = settle(msg)
    assert state == QueueState.FAILED
    assert msg.next_attempt_at is None
    # A delivered recipient's old error is not the message's error.
    assert msg.last_error == "550 no such user"
    assert session.deleted == []


def test_a_failed_recipient_waits_while_others_are_open():
    msg = message(QueueState.PENDING, (RecipientStatus.FAILED, 1, "550 no", None),
                  (RecipientStatus.DEFERRED, 1, "451 later", LATER))
    assert settle(msg)[0] == QueueState.DEFERRED


@pytest.mark.parametrize("recipient", [
    (RecipientStatus.PENDING, 0, None, None),
    (RecipientStatus.DEFERRED, 1, "451 a", LATER),
    (RecipientStatus.FAILED, 1, "550 no", None),
])
def test_a_held_message_stays_held(recipient):
    msg = message(QueueState.HELD, recipient)
    assert settle(msg)[0] == QueueState.HELD


def test_a_held_message_whose_recipients_are_all_delivered_still_leaves():
    msg = message(QueueState.HELD, (RecipientStatus.DELIVERED, 1, None, None))
    state, session = settle(msg)
    assert state is None
    assert session.deleted == [msg]


def test_no_errors_clears_the_last_error():
    msg = message(QueueState.DEFERRED, (RecipientStatus.PENDING, 0, None, None))
    msg.last_error = "old"
    settle(msg)
    assert msg.last_error is None
