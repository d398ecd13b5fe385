"""The queue's shape (Postfix's qshape, as data): queued mail per domain and age bucket.

What is counted (docs/QUEUE_SHAPE.md): by ``domain``, the recipients not yet delivered, by their
domain; by ``sender_domain``, the messages, by their sender's domain; each under its message's
queue state and arrival minute (``messages.created_at`` in whole minutes since the epoch).

A ``GROUP BY`` over a million queued recipients costs hundreds of milliseconds, so the counts
are kept, the way ``counters`` keeps the per-state totals, but without triggers (they cost the
listener a fifth of its intake on PostgreSQL): the queue's own writers add *deltas* in the
transactions that change counted rows. The hot paths (acceptance, recording delivery
attempts) know the rows in Python: they add up the changes in memory and write them when the
session commits (one multi-row INSERT per transaction, whatever the number of messages: ORM
rows would be flushed with each message, as ``add_message``'s rule query autoflushes); the
set-based paths (bulk actions, purges, bulk inserts) write theirs with one
``INSERT ... SELECT`` over the affected messages, before (negative) and after (positive) the
change, while the rows are locked.

``fold`` (the worker, every 5 s) moves deltas into ``queue_shape_counts`` and merges arrival
minutes old enough to be in the last age bucket for good into minute 0, so the counts stay at
most (domains x states x ~380 minutes) rows whatever the size of the queue. A read sums the
counts and the deltas not folded yet in one statement, bucketed in SQL: exact at its
``as_of``.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import sqlalchemy as sa
import sqlalchemy.orm as so
from sqlalchemy.dialects import sqlite
from sqlalchemy.ext.compiler import compiles

from ..database import driver_write, json_rows, writable
from ..models import SHAPE_KINDS, Message, QueueShapeCount, QueueShapeDelta, Recipient
from ..timeutil import utcnow
from .states import QueueState, RecipientStatus

# Upper edges of the age buckets in minutes; the last bucket (320m+) has none.
AGE_EDGES = (5, 10, 20, 40, 80, 160, 320)
BUCKETS = ("0-5m", "5-10m", "10-20m", "20-40m", "40-80m", "80-160m", "160-320m", "320m+")
SHAPE_QUEUES: tuple[str, ...] = (*(state.value for state in QueueState), "all")
# Arrival minutes older than this are merged into minute 0 ("oldest bucket for good"): the last
# edge plus an hour, so a reader whose clock is behind the folder's still buckets them right.
COMPACT_AFTER = AGE_EDGES[-1] + 60
# A read folds first when this many delta rows wait (no worker running to fold them).
FOLD_THRESHOLD = 20_000
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_ASCII_UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_ASCII_LOWER_TABLE = str.maketrans(_ASCII_UPPER, _ASCII_UPPER.lower())
_KEY = "elemta.queue_shape"

Key = tuple[str, str, str, int]  # kind, state, domain, minute


# --------------------------------------------------------------------------- the keys


def minute_of(moment: dt.datetime) -> int:
    """Whole minutes since the epoch (``epoch_minute`` is the SQL twin)."""
    return (moment - _EPOCH) // dt.timedelta(minutes=1)


def sender_domain(sender: str) -> str:
    """What follows the sender's last ``@``, ASCII letters lower-cased (``sender_domain_sql``
    is the SQL twin: SQLite's ``lower`` knows ASCII only, so both sides stick to ASCII)."""
    return sender.rpartition("@")[2].translate(_ASCII_LOWER_TABLE)


class epoch_minute(sa.sql.functions.FunctionElement[int]):  # noqa: N801 (SQL function)
    """``minute_of`` in SQL: whole minutes since the epoch of a ``UTCDateTime`` column."""

    type = sa.BigInteger()
    name = "epoch_minute"
    inherit_cache = True


@compiles(epoch_minute, "postgresql")
def _epoch_minute_postgresql(element: epoch_minute, compiler: Any, **kw: Any) -> str:
    column = compiler.process(element.clauses, **kw)
    return f"CAST(floor(extract(epoch FROM {column}) / 60) AS BIGINT)"


@compiles(epoch_minute, "sqlite")
def _epoch_minute_sqlite(element: epoch_minute, compiler: Any, **kw: Any) -> str:
    column = compiler.process(element.clauses, **kw)
    return f"(CAST(strftime('%s', substr({column}, 1, 19)) AS INTEGER) / 60)"


class sender_domain_sql(sa.sql.functions.FunctionElement[str]):  # noqa: N801 (SQL function)
    """``sender_domain`` in SQL: rtrim by the string's own non-@ characters leaves it up to
    its last ``@``; the rest is the domain (the whole string when it has no ``@``)."""

    type = sa.String()
    name = "sender_domain"
    inherit_cache = True


def _after_last_at(column: str) -> str:
    return f"substr({column}, length(rtrim({column}, replace({column}, '@', ''))) + 1)"


@compiles(sender_domain_sql, "postgresql")
def _sender_domain_postgresql(element: sender_domain_sql, compiler: Any, **kw: Any) -> str:
    column = compiler.process(element.clauses, **kw)
    return f"translate({_after_last_at(column)}, '{_ASCII_UPPER}', '{_ASCII_UPPER.lower()}')"


@compiles(sender_domain_sql, "sqlite")
def _sender_domain_sqlite(element: sender_domain_sql, compiler: Any, **kw: Any) -> str:
    column = compiler.process(element.clauses, **kw)
    return f"lower({_after_last_at(column)})"


def _compacted(minute: int, now_minute: int) -> int:
    return 0 if minute < now_minute - COMPACT_AFTER else minute


# --------------------------------------------------------------------------- writing


def contribution(message: Message) -> Counter[Key]:
    """What one message (with its recipients loaded) adds to the counts."""
    return row_contribution(message.queue_state, message.sender, message.created_at,
                            [r.domain for r in message.recipients
                             if r.status != RecipientStatus.DELIVERED])


def row_contribution(state: str, sender: str, created_at: dt.datetime,
                     open_domains: Sequence[str]) -> Counter[Key]:
    """What a message adds to the counts, from its fields: its queue state, sender, arrival,
    and the domains of its recipients not yet delivered (one entry per recipient)."""
    counted: Counter[Key] = Counter()
    state, minute = str(state), minute_of(created_at)
    counted[("sender_domain", state, sender_domain(sender), minute)] += 1
    for domain in open_domains:
        counted[("domain", state, domain, minute)] += 1
    return counted


def note(session: so.Session, before: Counter[Key] | None, after: Counter[Key] | None) -> None:
    """Add the change from ``before`` to ``after`` (``contribution``s) to the transaction;
    no commit. The changes add up in memory per key and are written when the session
    commits (``write_noted``): one multi-row INSERT per transaction, however many messages
    it holds (a listener's group commit, a batch of delivery outcomes)."""
    noted = _noted(session)
    noted.update(after or {})
    noted.subtract(before or {})


def _noted(session: so.Session) -> Counter[Key]:
    """This transaction's noted changes (a new transaction starts afresh: a rolled-back one's
    notes are dropped with it)."""
    # Callers may hand in the ``db.session`` proxy (a scoped_session): the Session itself
    # holds the transaction and the info.
    real: so.Session = session() if isinstance(session, so.scoped_session) else session
    transaction = real.get_transaction()
    found = real.info.get(_KEY)
    if found is None or found[0] is not transaction:
        found = (transaction, Counter())
        real.info[_KEY] = found
    noted: Counter[Key] = found[1]
    return noted


@sa.event.listens_for(so.Session, "before_commit")
def _write_noted_before_commit(session: so.Session) -> None:
    write_noted(session)


def write_noted(session: so.Session) -> None:
    """Write the transaction's noted changes as delta rows, inside it; done when the session
    commits, or earlier by a caller that wants the write in a pipeline of its own
    (``database.pipelined``): what is noted afterwards is written at the commit."""
    found = session.info.pop(_KEY, None)
    if found is None or found[0] is not session.get_transaction():
        return
    now_minute = minute_of(utcnow())
    rows: Counter[Key] = Counter()
    for (kind, state, domain, minute), delta in found[1].items():
        rows[(kind, state, domain, _compacted(minute, now_minute))] += delta
    values = [{"kind": kind, "state": state, "domain": domain, "minute": minute, "delta": delta}
              for (kind, state, domain, minute), delta in sorted(rows.items()) if delta]
    if not values:
        return
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        # One statement, the rows as arrays: nothing to read back, so inside a pipeline
        # (database.pipelined) it goes with the COMMIT instead of costing a round trip.
        # One statement, the rows as one JSON parameter (``database.json_rows``), on the
        # driver's connection: nothing to read back, so inside a pipeline
        # (database.pipelined) it goes with the COMMIT; no SQLAlchemy execution.
        driver_write(connection, _PG_INSERT_DELTAS, [json_rows(values)])
    else:
        # Core on the session's connection, RETURNING so that the rows go as one multi-row
        # VALUES: the ORM's bulk insert was one INSERT per row (pipelined) and its bookkeeping.
        connection.execute(_INSERT_DELTAS, values).all()


_DELTAS = cast(sa.Table, QueueShapeDelta.__table__)
_INSERT_DELTAS = sa.insert(_DELTAS).returning(_DELTAS.c.id)
_PG_INSERT_DELTAS = ("INSERT INTO queue_shape_deltas (kind, state, domain, minute, delta) "
                     "SELECT kind, state, domain, minute, delta "
                     "FROM json_populate_recordset(NULL::queue_shape_deltas, %s)")


def contribution_insert(where: sa.ColumnElement[bool], sign: int,
                        now: dt.datetime | None = None) -> sa.Insert:
    """``INSERT INTO queue_shape_deltas SELECT ...``: ``sign`` times what the messages matching
    ``where`` contribute, as they stand when the statement runs."""
    cutoff = minute_of(now or utcnow()) - COMPACT_AFTER
    minute = epoch_minute(Message.created_at)
    # Grouped by the arrival minute itself; the compaction is applied over the groups (a bound
    # parameter inside a GROUP BY expression is a different expression on PostgreSQL).
    by_recipient = (
        sa.select(sa.literal("domain").label("kind"), Message.queue_state.label("state"),
                  Recipient.domain.label("domain"), minute.label("minute"),
                  sa.func.count().label("n"))
        .join(Recipient, Recipient.message_id == Message.id)
        .where(where, Recipient.status != RecipientStatus.DELIVERED.value)
        .group_by(Message.queue_state, Recipient.domain, minute)
    )
    domain = sender_domain_sql(Message.sender)
    by_sender = (
        sa.select(sa.literal("sender_domain").label("kind"), Message.queue_state.label("state"),
                  domain.label("domain"), minute.label("minute"), sa.func.count().label("n"))
        .where(where)
        .group_by(Message.queue_state, domain, minute)
    )
    both = sa.union_all(by_recipient, by_sender).subquery()
    compacted = sa.case((both.c.minute < cutoff, 0), else_=both.c.minute)
    rows = sa.select(both.c.kind, both.c.state, both.c.domain, compacted, both.c.n * sign)
    return sa.insert(QueueShapeDelta).from_select(
        ["kind", "state", "domain", "minute", "delta"], rows)


def leaving(session: so.Session, where: sa.ColumnElement[bool]) -> None:
    """Take out what the messages matching ``where`` count for, before they change or go;
    no commit. The caller holds their rows (PostgreSQL: locked; SQLite: in a write
    transaction) until its change is written, so what is taken out is what changes."""
    session.execute(contribution_insert(where, -1))


def arriving(session: so.Session, where: sa.ColumnElement[bool]) -> None:
    """Add what the messages matching ``where`` count for, after they changed or came; no
    commit."""
    session.execute(contribution_insert(where, 1))


# --------------------------------------------------------------------------- folding


def fold(session: so.Session, now: dt.datetime | None = None) -> int:
    """Fold the deltas into the counts and merge old arrival minutes; commits. Returns the
    number of delta rows folded."""
    folded = _fold(session, now or utcnow())
    session.commit()
    return folded


def _fold(session: so.Session, now: dt.datetime) -> int:
    cutoff = minute_of(now) - COMPACT_AFTER
    if session.get_bind().dialect.name == "postgresql":
        # Folds queue up on this lock; readers (ACCESS SHARE) and writers of deltas never wait.
        session.execute(sa.text("LOCK TABLE queue_shape_counts IN SHARE ROW EXCLUSIVE MODE"))
        # DELETE ... RETURNING takes exactly the rows it removes: a delta committed a moment
        # later is folded next time, never lost or counted twice.
        folded = session.execute(_PG_FOLD, {"cutoff": cutoff}).scalar() or 0
        session.execute(_PG_COMPACT, {"cutoff": cutoff})
    else:  # SQLite: one writer at a time, the first statement takes the lock
        moved: Counter[tuple[str, str, str, int]] = Counter()
        folded = 0
        for kind, state, domain, minute, delta in session.execute(
                sa.delete(QueueShapeDelta).returning(
                    QueueShapeDelta.kind, QueueShapeDelta.state, QueueShapeDelta.domain,
                    QueueShapeDelta.minute, QueueShapeDelta.delta)):
            moved[(kind, state, domain, 0 if minute < cutoff else minute)] += delta
            folded += 1
        old = session.execute(
            sa.delete(QueueShapeCount)
            .where(QueueShapeCount.minute > 0, QueueShapeCount.minute < cutoff)
            .returning(QueueShapeCount.kind, QueueShapeCount.state, QueueShapeCount.domain,
                       QueueShapeCount.n)).all()
        for kind, state, domain, n in old:
            moved[(kind, state, domain, 0)] += n
        _add_counts(session, moved)
    session.execute(sa.delete(QueueShapeCount).where(QueueShapeCount.n == 0))
    return int(folded)


_PG_FOLD = sa.text("""
WITH moved AS (
    DELETE FROM queue_shape_deltas RETURNING kind, state, domain, minute, delta
), grouped AS (
    SELECT kind, state, domain, m AS minute, sum(delta) AS n, count(*) AS rows
    FROM (SELECT kind, state, domain, CASE WHEN minute < :cutoff THEN 0 ELSE minute END AS m,
                 delta FROM moved) AS d
    GROUP BY kind, state, domain, m
), added AS (
    INSERT INTO queue_shape_counts (kind, state, domain, minute, n)
    SELECT kind, state, domain, minute, n FROM grouped
    ON CONFLICT (kind, state, domain, minute)
    DO UPDATE SET n = queue_shape_counts.n + excluded.n
)
SELECT coalesce(sum(rows), 0) FROM grouped
""")

_PG_COMPACT = sa.text("""
WITH old AS (
    DELETE FROM queue_shape_counts WHERE minute > 0 AND minute < :cutoff
    RETURNING kind, state, domain, n
)
INSERT INTO queue_shape_counts (kind, state, domain, minute, n)
SELECT kind, state, domain, 0, sum(n) FROM old GROUP BY kind, state, domain
ON CONFLICT (kind, state, domain, minute) DO UPDATE SET n = queue_shape_counts.n + excluded.n
""")


def _add_counts(session: so.Session, moved: Counter[tuple[str, str, str, int]]) -> None:
    for (kind, state, domain, minute), n in sorted(moved.items()):
        if not n:
            continue
        stmt = sqlite.insert(QueueShapeCount).values(kind=kind, state=state, domain=domain,
                                                      minute=minute, n=n)
        session.execute(stmt.on_conflict_do_update(
            index_elements=["kind", "state", "domain", "minute"],
            set_={"n": QueueShapeCount.n + stmt.excluded.n}))


def pending_deltas(session: so.Session) -> int:
    """About how many delta rows wait for a fold (from the id range: two index probes)."""
    low, high = session.execute(
        sa.select(sa.func.min(QueueShapeDelta.id), sa.func.max(QueueShapeDelta.id))).one()
    return 0 if low is None else int(high) - int(low) + 1


def maybe_fold(session: so.Session) -> None:
    """Fold when any delta waits; the worker calls it every few seconds."""
    if pending_deltas(session):
        fold(session)


def rebuild(session: so.Session, now: dt.datetime | None = None) -> None:
    """Recount the shape from the queue itself (repair tool; scans the queue); commits.

    On PostgreSQL the deltas table is locked first: a writer that wrote its delta waits for
    nothing and is seen by the recount once it commits (the lock waits for it); one that has
    not written it yet waits for the lock and adds it to the recount. Either way once.
    """
    now = now or utcnow()
    if session.get_bind().dialect.name == "postgresql":
        session.execute(sa.text("LOCK TABLE queue_shape_counts IN SHARE ROW EXCLUSIVE MODE"))
        session.execute(sa.text("LOCK TABLE queue_shape_deltas IN SHARE ROW EXCLUSIVE MODE"))
    session.execute(sa.delete(QueueShapeDelta))
    session.execute(sa.delete(QueueShapeCount))
    session.execute(contribution_insert(sa.true(), 1, now))
    _fold(session, now)
    session.commit()


# --------------------------------------------------------------------------- reading


@dataclass
class ShapeRow:
    domain: str
    buckets: list[int]

    @property
    def total(self) -> int:
        return sum(self.buckets)


@dataclass
class Shape:
    queue: str
    by: str
    as_of: dt.datetime
    rows: list[ShapeRow]  # the top domains, largest first
    other: ShapeRow  # every domain beyond the top, summed (domain: how many, as text)
    other_domains: int
    total: ShapeRow


def bucket_of(age_minutes: int) -> int:
    """Index in ``BUCKETS`` of an age in whole minutes (the SQL of ``read_shape`` is its twin)."""
    for index, edge in enumerate(AGE_EDGES):
        if age_minutes < edge:
            return index
    return len(AGE_EDGES)


def read_shape(session: so.Session, queue: str = "all", by: str = "domain", top: int = 20,
               now: dt.datetime | None = None) -> Shape:
    """The shape of a queue (``SHAPE_QUEUES``) by ``by`` (``SHAPE_KINDS``): per domain, the
    count in each age bucket, the ``top`` largest domains first, the rest summed as ``other``.

    An age is counted in whole minutes: from the start of the arrival's minute to the start of
    ``as_of``'s. Exact at ``as_of``: the deltas not folded yet are summed in.
    """
    if queue not in SHAPE_QUEUES or by not in SHAPE_KINDS or top < 1:
        raise ValueError("bad shape request")  # the schemas and click choices check first
    if pending_deltas(session) >= FOLD_THRESHOLD:
        with writable(session) as writer:  # a GET's session reads in autocommit
            fold(writer)
    now = now or utcnow()
    rows = session.execute(_read_statement(queue, by), {"now_minute": minute_of(now)}).all()
    by_domain: dict[str, list[int]] = {}
    for domain, bucket, n in rows:
        if n:
            by_domain.setdefault(domain, [0] * len(BUCKETS))[bucket] += int(n)
    ordered = sorted(by_domain.items(), key=lambda item: (-sum(item[1]), item[0]))
    shown = [ShapeRow(domain, counts) for domain, counts in ordered[:top]]
    rest = [counts for _, counts in ordered[top:]]
    other = ShapeRow("", _sum_columns(rest))
    total = ShapeRow("", _sum_columns([counts for _, counts in ordered]))
    return Shape(queue=queue, by=by, as_of=now.replace(microsecond=0), rows=shown, other=other,
                 other_domains=len(rest), total=total)


def _sum_columns(rows: Sequence[list[int]]) -> list[int]:
    return [sum(column) for column in zip(*rows, strict=True)] if rows else [0] * len(BUCKETS)


def _read_statement(queue: str, by: str) -> sa.Select[Any]:
    """Counts and pending deltas of one kind and queue, bucketed by age: one row per (domain,
    bucket), at most domains x 8, whatever the size of the queue."""
    states = [s.value for s in QueueState] if queue == "all" else [queue]
    counts = sa.select(QueueShapeCount.domain, QueueShapeCount.minute,
                       QueueShapeCount.n.label("n")).where(
        QueueShapeCount.kind == by, QueueShapeCount.state.in_(states))
    deltas = sa.select(QueueShapeDelta.domain, QueueShapeDelta.minute,
                       QueueShapeDelta.delta.label("n")).where(
        QueueShapeDelta.kind == by, QueueShapeDelta.state.in_(states))
    both = sa.union_all(counts, deltas).subquery()
    age = sa.bindparam("now_minute", type_=sa.BigInteger()) - both.c.minute
    bucket = sa.case(*[(age < edge, index) for index, edge in enumerate(AGE_EDGES)],
                     else_=len(AGE_EDGES))
    bucketed = sa.select(both.c.domain, bucket.label("bucket"), both.c.n).subquery()
    return (sa.select(bucketed.c.domain, bucketed.c.bucket, sa.func.sum(bucketed.c.n))
            .group_by(bucketed.c.domain, bucketed.c.bucket))


def direct_shape(session: so.Session, queue: str, by: str,
                 now: dt.datetime) -> dict[str, list[int]]:
    """The same figures by a plain GROUP BY over the queue (what the counts must equal; the
    benchmark's and the tests' reference): {domain: counts per bucket}."""
    states = [s.value for s in QueueState] if queue == "all" else [queue]
    minute = epoch_minute(Message.created_at)
    if by == "domain":
        query = (sa.select(Recipient.domain, minute, sa.func.count())
                 .join(Recipient, Recipient.message_id == Message.id)
                 .where(Message.queue_state.in_(states),
                        Recipient.status != RecipientStatus.DELIVERED.value)
                 .group_by(Recipient.domain, minute))
    else:
        sender = sender_domain_sql(Message.sender)
        query = (sa.select(sender, minute, sa.func.count())
                 .where(Message.queue_state.in_(states)).group_by(sender, minute))
    result: dict[str, list[int]] = {}
    now_minute = minute_of(now)
    for domain, arrival, n in session.execute(query):
        result.setdefault(domain, [0] * len(BUCKETS))[bucket_of(now_minute - arrival)] += n
    return result

