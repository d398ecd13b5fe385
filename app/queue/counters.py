"""Message counts per queue state, O(1) whatever the size of the queue.

Triggers on ``messages`` (see the initial migration) append (state, +1/-1) rows to
``queue_count_deltas`` in the same transaction as the change. Reading sums the folded counts and
the pending deltas in one statement (one snapshot). Folding moves deltas into
``queue_counts``; it locks the four count rows in a fixed order, so concurrent folds queue up
instead of deadlocking, and writers never wait for it.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
import sqlalchemy.orm as so

from ..database import DriverRead, writable
from ..models import QUEUE_STATES, QueueCount, QueueCountDelta

FOLD_THRESHOLD = 5000


# Built once: composing the UNION and its subquery per call cost about as much CPU as running
# it (the statement is hit by every /api/queue/stats request and every page's X-Total-Count).
# ``d`` marks the delta rows, so the same snapshot also says whether a fold is due.
_BOTH = sa.union_all(
    sa.select(QueueCount.state, QueueCount.n.label("n"), sa.literal_column("0").label("d")),
    sa.select(QueueCountDelta.state, QueueCountDelta.delta.label("n"),
              sa.literal_column("1").label("d")),
).subquery()
_COUNTS = sa.select(_BOTH.c.state, sa.func.sum(_BOTH.c.n), sa.func.sum(_BOTH.c.d)).group_by(
    _BOTH.c.state)
_COUNTS_READ = DriverRead(_COUNTS)


def counts_and_deltas(
        session: so.Session | so.scoped_session[Any]) -> tuple[dict[str, int], int]:
    """The counts (see ``queue_counts``) and the number of unfolded delta rows, one statement."""
    counts = dict.fromkeys(QUEUE_STATES, 0)
    deltas = 0
    # Given the scoped db.session of a GET request that has no session yet, on the driver's
    # cursor without making one; else Core execution on the session's connection (same
    # transaction). app/database.py, DriverRead.
    rows = _COUNTS_READ.rows(session)
    for state, n, d in rows:
        deltas += int(d or 0)
        if state in counts:
            counts[state] = int(n or 0)
    counts["total"] = sum(counts[s] for s in QUEUE_STATES)
    return counts, deltas


def queue_counts(session: so.Session | so.scoped_session[Any]) -> dict[str, int]:
    """``{"pending": n, "deferred": n, "held": n, "failed": n, "total": n}``."""
    return counts_and_deltas(session)[0]


def counts_folding(session: so.Session | so.scoped_session[Any]) -> dict[str, int]:
    """The counts, folding first when enough deltas piled up (the API's read): one statement
    when no fold is due, instead of counting the deltas and then reading the counts."""
    counts, deltas = counts_and_deltas(session)
    if deltas < FOLD_THRESHOLD:
        return counts
    # A GET request's session reads in autocommit; the fold must be one transaction.
    with writable(session) as writer:
        fold_deltas(writer)
    return queue_counts(session)


def pending_delta_rows(session: so.Session) -> int:
    return session.scalar(sa.select(sa.func.count()).select_from(QueueCountDelta)) or 0


def fold_deltas(session: so.Session) -> int:
    """Fold the pending deltas into the counts and commit; returns how many rows were folded."""
    session.execute(
        sa.select(QueueCount.state).order_by(QueueCount.state).with_for_update()
    ).all()
    # DELETE ... RETURNING takes exactly the rows it removes: a delta committed by another
    # transaction a moment later is either folded now or left for the next fold, never lost.
    moved = sa.delete(QueueCountDelta).returning(QueueCountDelta.state, QueueCountDelta.delta)
    sums: dict[str, int] = {}
    folded = 0
    if session.get_bind().dialect.name == "postgresql":
        cte = moved.cte("moved")
        for state, delta, rows in session.execute(
            sa.select(cte.c.state, sa.func.sum(cte.c.delta), sa.func.count()).group_by(cte.c.state)
        ):
            sums[state] = int(delta)
            folded += rows
    else:
        for state, delta in session.execute(moved):
            sums[state] = sums.get(state, 0) + delta
            folded += 1
    for state, delta in sorted(sums.items()):
        session.execute(
            sa.update(QueueCount).where(QueueCount.state == state).values(n=QueueCount.n + delta)
        )
    session.commit()
    return folded


def maybe_fold(session: so.Session) -> None:
    """Fold when enough deltas piled up; cheap to call often (API reads, worker heartbeat)."""
    if pending_delta_rows(session) >= FOLD_THRESHOLD:
        fold_deltas(session)


def recount(session: so.Session) -> dict[str, int]:
    """Rebuild the counts from the messages themselves (repair tool; scans the queue)."""
    session.execute(
        sa.select(QueueCount.state).order_by(QueueCount.state).with_for_update()
    ).all()
    from ..models import Message

    actual = dict.fromkeys(QUEUE_STATES, 0)
    for state, n in session.execute(
        sa.select(Message.queue_state, sa.func.count()).group_by(Message.queue_state)
    ):
        actual[state] = n
    session.execute(sa.delete(QueueCountDelta))
    for state in QUEUE_STATES:
        session.execute(
            sa.update(QueueCount).where(QueueCount.state == state).values(n=actual[state]))
    session.commit()
    return actual
