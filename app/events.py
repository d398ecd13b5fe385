"""Recording message events and keeping the hourly outcome rollup in step with them.

``record_event`` is the one way an event row is written. When the event is a delivery outcome
(``delivery``, ``tempfail``, ``rejection`` with a recipient) it bumps the rollup row of its
clock hour in the same transaction, with an upsert that stays correct when several processes
record at once. The caller commits.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import sqlalchemy as sa
import sqlalchemy.orm as so
from sqlalchemy.dialects import postgresql, sqlite

from .models import OUTCOME_OF_EVENT, DeliveryEvent, DeliveryRollup
from .sqltypes import time_bucket
from .timeutil import utcnow


def hour_floor(moment: dt.datetime) -> dt.datetime:
    return moment.replace(minute=0, second=0, microsecond=0)


def record_event(
    session: so.Session,
    event_type: str,
    *,
    message_id: str | None = None,
    sender: str | None = None,
    recipient: str | None = None,
    message: str | None = None,
    timestamp: dt.datetime | None = None,
    counts_as_outcome: bool | None = None,
    **fields: Any,
) -> DeliveryEvent:
    """Add one event; bump the rollup when it is a recipient's delivery outcome.

    ``counts_as_outcome`` defaults to "an outcome type with a recipient and a message id";
    the SMTP listener's refusals are ``rejection`` events that are *not* delivery outcomes
    (SPEC 3) and pass ``False``.
    """
    event = DeliveryEvent(
        timestamp=timestamp or utcnow(),
        event_type=event_type,
        message_id=message_id,
        sender=sender,
        recipient=recipient,
        message=message,
        threats=fields.pop("threats", None) or [],
        **fields,
    )
    session.add(event)
    if counts_as_outcome is None:
        counts_as_outcome = is_outcome(event_type, recipient, message_id)
    if counts_as_outcome:
        bump_rollup(session, {(hour_floor(event.timestamp), OUTCOME_OF_EVENT[event_type]): 1})
    return event


def is_outcome(event_type: str, recipient: str | None, message_id: str | None) -> bool:
    """The rule of what counts as a delivery outcome; ``outcome_rows`` is its SQL twin."""
    return event_type in OUTCOME_OF_EVENT and bool(recipient and message_id)


def outcome_rows() -> list[sa.ColumnElement[bool]]:
    """WHERE conditions selecting the events that count as delivery outcomes (SQL form)."""
    return [
        DeliveryEvent.event_type.in_(list(OUTCOME_OF_EVENT)),
        DeliveryEvent.recipient.is_not(None),
        DeliveryEvent.recipient != "",
        DeliveryEvent.message_id.is_not(None),
        DeliveryEvent.message_id != "",
    ]


def outcome_of_event_type() -> sa.ColumnElement[str]:
    """CASE event_type -> outcome, with literal strings (it is grouped by; no bound parameters)."""
    return sa.case(
        *[(DeliveryEvent.event_type == sa.literal_column(f"'{etype}'"),
           sa.literal_column(f"'{outcome}'")) for etype, outcome in OUTCOME_OF_EVENT.items()]
    )


def record_system_events(
    session: so.Session,
    rows: Iterable[Mapping[str, Any]],
    text: str,
    *,
    action: str,
    queue_state: str | None,
    timestamp: dt.datetime | None = None,
) -> int:
    """One ``system`` event per affected message (rows with ``id`` and ``sender``), set-based.

    ``action`` is what happened (held, released, retried, flushed, ...); ``queue_state`` the
    messages' state afterwards (None when they left the queue).
    """
    moment = timestamp or utcnow()
    values = [
        {
            "timestamp": moment,
            "event_type": "system",
            "message_id": row["id"],
            "sender": row["sender"],
            "message": text.format(id=row["id"]),
            "threats": [],
            "action": action,
            "queue_state": queue_state,
        }
        for row in rows
    ]
    if values:
        session.execute(sa.insert(DeliveryEvent), values)
    return len(values)


def bump_rollup(session: so.Session, increments: Mapping[tuple[dt.datetime, str], int]) -> None:
    """Add counts to rollup rows (hour, outcome), creating them as needed, atomically."""
    if not increments:
        return
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    # A stable order: two transactions bumping the same rows lock them in the same order.
    for (hour, outcome), count in sorted(increments.items()):
        stmt = insert(DeliveryRollup).values(hour=hour, outcome=outcome, count=count)
        stmt = stmt.on_conflict_do_update(
            index_elements=[DeliveryRollup.hour, DeliveryRollup.outcome],
            set_={"count": DeliveryRollup.count + stmt.excluded.count},
        )
        session.execute(stmt)


def rebuild_rollup(
    session: so.Session,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
) -> int:
    """Recompute the rollup from the events, for every hour or for [since, until); no commit.

    Set-based: one DELETE and one INSERT ... SELECT ... GROUP BY. On PostgreSQL the rollup is
    locked first (writers keep inserting events, their rollup bump waits), so an event is counted
    exactly once: either it is visible to the recount, or its bump lands after it. SQLite has a
    single writer, which gives the same guarantee. Returns the number of rollup rows written.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(sa.text("LOCK TABLE delivery_rollup IN SHARE ROW EXCLUSIVE MODE"))
    hours = []
    events = outcome_rows()
    if since is not None:
        since = hour_floor(since)
        hours.append(DeliveryRollup.hour >= since)
        events.append(DeliveryEvent.timestamp >= since)
    if until is not None:
        # Whole hours: the hour ``until`` falls in is recounted entirely.
        end = hour_floor(until)
        if end < until:
            end += dt.timedelta(hours=1)
        hours.append(DeliveryRollup.hour < end)
        events.append(DeliveryEvent.timestamp < end)
    session.execute(sa.delete(DeliveryRollup).where(*hours))
    bucket = time_bucket("hour", DeliveryEvent.timestamp)
    outcome = outcome_of_event_type()
    recount = (
        sa.select(bucket, outcome, sa.func.count())
        .where(*events)
        .group_by(bucket, outcome)
    )
    result = session.execute(
        sa.insert(DeliveryRollup).from_select(["hour", "outcome", "count"], recount),
        execution_options={"preserve_rowcount": True},
    )
    return result.rowcount


def outcome_increments(events: Iterable[tuple[str, dt.datetime]]
                       ) -> Counter[tuple[dt.datetime, str]]:
    """Rollup increments for (event_type, timestamp) pairs of outcome events."""
    counter: Counter[tuple[dt.datetime, str]] = Counter()
    for event_type, timestamp in events:
        outcome = OUTCOME_OF_EVENT.get(event_type)
        if outcome:
            counter[(hour_floor(timestamp), outcome)] += 1
    return counter
