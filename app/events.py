"""Recording message events and keeping the hourly outcome rollup in step with them.

``record_event`` is the one way an event row is written. When the event is a delivery outcome
(``delivery``, ``tempfail``, ``rejection`` with a recipient) it bumps the rollup row of its
clock hour in the same transaction, with an upsert that stays correct when several processes
record at once. The caller commits.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import sqlalchemy as sa
import sqlalchemy.orm as so
from sqlalchemy.dialects import postgresql, sqlite

from .database import driver_write, json_rows
from .models import ERROR_EVENTS_SQL, OUTCOME_OF_EVENT, DeliveryEvent, DeliveryRollup, DomainRollup
from .sqltypes import time_bucket
from .stats.classify import failure_class
from .stats.latency import NO_BUCKET, bucket_of, bucket_sql
from .timeutil import utcnow

# Every column of an event row but its id (``event_row``).
EVENT_FIELDS = tuple(c.key for c in DeliveryEvent.__table__.columns if c.key != "id")
FAILURE_EVENT_TYPES = ("tempfail", "rejection")
# One set of per-domain rows per time scale's bucket (stats.service.SCALES): a window reads
# exactly its buckets' rows, whatever the length of the history.
DOMAIN_GRAINS = ("hour", "day", "week", "month")
# domain_rollup key: (grain, start, domain, outcome, failure class or "", latency bucket)
DomainKey = tuple[str, dt.datetime, str, str, str, int]


def hour_floor(moment: dt.datetime) -> dt.datetime:
    return moment.replace(minute=0, second=0, microsecond=0)


def day_floor(moment: dt.datetime) -> dt.datetime:
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)


def week_floor(moment: dt.datetime) -> dt.datetime:
    """The Monday 00:00 of the ISO week (API.md §3)."""
    day = day_floor(moment)
    return day - dt.timedelta(days=day.weekday())


def month_floor(moment: dt.datetime) -> dt.datetime:
    return day_floor(moment).replace(day=1)


GRAIN_FLOOR = {"hour": hour_floor, "day": day_floor, "week": week_floor, "month": month_floor}


Floors = tuple[dt.datetime, tuple[tuple[str, dt.datetime], ...]]


def _floors(moment: dt.datetime) -> Floors:
    """The hour of ``moment`` and its bucket of every domain grain. The events of a batch of
    outcomes share one timestamp, so for UTC ones (all the recorder's) they are worked out
    once a batch, not four times an event; other zones are not cached (a cache keyed by an
    instant would mix up zones whose floors differ)."""
    if moment.tzinfo is dt.UTC:
        return _utc_floors(moment)
    return _compute_floors(moment)


def _compute_floors(moment: dt.datetime) -> Floors:
    return hour_floor(moment), tuple((grain, GRAIN_FLOOR[grain](moment))
                                     for grain in DOMAIN_GRAINS)


_utc_floors = functools.lru_cache(maxsize=16)(_compute_floors)


def grain_ceil(grain: str, moment: dt.datetime) -> dt.datetime:
    """The first instant of a ``grain`` bucket at or after ``moment``."""
    floor = GRAIN_FLOOR[grain](moment)
    if floor == moment:
        return floor
    if grain == "month":
        return (floor + dt.timedelta(days=32)).replace(day=1)
    return floor + {"hour": dt.timedelta(hours=1), "day": dt.timedelta(days=1),
                    "week": dt.timedelta(weeks=1)}[grain]


def recipient_domain(address: str) -> str:
    """The domain of an address, lower case (``domain_sql`` is its SQL twin)."""
    return address.rpartition("@")[2].strip().lower()


@dataclass
class Increments:
    """Rollup increments of a batch of outcome events, applied at once by ``bump``."""

    hourly: Counter[tuple[dt.datetime, str]] = field(default_factory=Counter)
    domains: Counter[DomainKey] = field(default_factory=Counter)

    def add(self, event_type: str, timestamp: dt.datetime, domain: str | None,
            failure: str | None, latency: float | None) -> None:
        outcome = OUTCOME_OF_EVENT.get(event_type)
        if outcome is None:
            return
        hour, grains = _floors(timestamp)
        self.hourly[(hour, outcome)] += 1
        if domain is None:
            return
        bucket = bucket_of(latency) if event_type == "delivery" else NO_BUCKET
        failure = failure or ""
        domains = self.domains
        for grain, start in grains:
            domains[(grain, start, domain, outcome, failure, bucket)] += 1

    def add_event(self, event: DeliveryEvent) -> None:
        self.add(event.event_type, event.timestamp, event.domain, event.failure_class,
                 event.latency)

    def add_row(self, row: Mapping[str, Any]) -> None:
        """A row of a set-based insert (demo data): the same fields as an event."""
        self.add(row["event_type"], row["timestamp"], row.get("domain"),
                 row.get("failure_class"), row.get("latency"))

    def bump(self, session: so.Session, connection: sa.Connection | None = None) -> None:
        """Apply to both rollups: the hourly one first, then the domains' (a fixed order);
        ``connection``: the session's, when the caller holds it already."""
        bump_rollup(session, self.hourly, connection)
        bump_domain_rollup(session, self.domains, connection)


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
    latency: float | None = None,
    **fields: Any,
) -> DeliveryEvent:
    """Add one event; bump the rollups when it is a recipient's delivery outcome.

    ``counts_as_outcome`` defaults to "an outcome type with a recipient and a message id";
    the SMTP listener's refusals are ``rejection`` events that are *not* delivery outcomes
    (API.md §3) and pass ``False``. A caller that bumps the rollups itself (for a batch,
    ``Increments``) passes ``False`` too. Failures get their class (``stats.classify``) and
    outcomes their recipient domain here, whoever counts them; ``latency`` is the seconds
    from reception of a delivery.
    """
    _describe(event_type, recipient, message_id, message, latency, fields)
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
        increments = Increments()
        increments.add_event(event)
        increments.bump(session)
    return event


def _describe(event_type: str, recipient: str | None, message_id: str | None,
              message: str | None, latency: float | None, fields: dict[str, Any]) -> None:
    """What ``record_event`` and ``event_row`` derive for the statistics (docs/STATS.md): the
    failure class of a failure, the recipient domain of an outcome, a delivery's latency."""
    if event_type in FAILURE_EVENT_TYPES and fields.get("failure_class") is None:
        fields["failure_class"] = failure_class(fields.get("smtp_code"),
                                                fields.get("enhanced_code"), message)
    if recipient and is_outcome(event_type, recipient, message_id):
        fields["domain"] = recipient_domain(recipient)
        if event_type == "delivery":
            fields["latency"] = latency


def event_row(event_type: str, *, latency: float | None = None, **fields: Any) -> dict[str, Any]:
    """The values of one event row for ``record_events``: every column, as ``record_event``
    would set it (executemany needs the same keys in every row)."""
    _describe(event_type, fields.get("recipient"), fields.get("message_id"),
              fields.get("message"), latency, fields)
    row: dict[str, Any] = dict.fromkeys(EVENT_FIELDS)
    row.update(fields, event_type=event_type, threats=fields.get("threats") or [])
    row["timestamp"] = fields.get("timestamp") or utcnow()
    return row


# RETURNING makes SQLAlchemy render the rows as one multi-row VALUES ("insertmanyvalues");
# without it psycopg executes one INSERT per row (pipelined, but parsed and planned each).
_EVENTS = cast(sa.Table, DeliveryEvent.__table__)
_INSERT_EVENTS = sa.insert(_EVENTS).returning(_EVENTS.c.id)


def record_events(session: so.Session, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert event rows (``event_row``) in one statement, in order; no rollup bump: the caller
    bumps the rollup once for everything it records. The delivery recorder's path, where an
    ORM object per event cost more than the rest of the outcome: a Core INSERT on the
    session's connection (same transaction), not the ORM's bulk insert."""
    if rows:
        insert_event_rows(session.connection(), rows)


def insert_event_rows(connection: sa.Connection, rows: Sequence[Mapping[str, Any]]) -> None:
    """``record_events`` on a connection (the transaction's) the caller holds already."""
    if not rows:
        return
    if connection.dialect.name == "postgresql":
        # One INSERT of the rows as one JSON parameter, on the driver's connection, no
        # RETURNING: inside the recorder's pipeline (``database.pipelined``) it is only
        # queued. An executemany through Core was one Execute per row on the server and
        # SQLAlchemy's bind processing of every value (docs/PERFORMANCE.md, "Delivery, the
        # recorder's statements on the driver").
        driver_write(connection, _PG_INSERT_EVENTS, [json_rows(rows)])
    else:
        connection.execute(_INSERT_EVENTS, list(rows)).all()


_COLUMNS = ", ".join(f'"{name}"' for name in EVENT_FIELDS)
_PG_INSERT_EVENTS = (f"INSERT INTO delivery_events ({_COLUMNS}) SELECT {_COLUMNS} "
                     "FROM json_populate_recordset(NULL::delivery_events, %s)")


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
    rows: Iterable[sa.RowMapping | Mapping[str, Any]],
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


def bump_rollup(session: so.Session, increments: Mapping[tuple[dt.datetime, str], int],
                connection: sa.Connection | None = None) -> None:
    """Add counts to rollup rows (hour, outcome), creating them as needed, atomically."""
    if not increments:
        return
    connection = connection or session.connection()
    if connection.dialect.name == "postgresql":
        # One upsert of the rows as one JSON parameter (``database.json_rows``), in key
        # order, on the driver's connection: no SQLAlchemy execution a group.
        driver_write(connection, _PG_ROLLUP_UPSERT, [json_rows(
            [{"hour": hour, "outcome": outcome, "count": count}
             for (hour, outcome), count in sorted(increments.items())])])
        return
    # A stable order: two transactions bumping the same rows lock them in the same order.
    # One executemany on the session's connection (psycopg pipelines it), not an ORM
    # execution per row.
    connection.execute(_rollup_upsert(connection.dialect.name),
                       [{"hour": hour, "outcome": outcome, "count": count}
                        for (hour, outcome), count in sorted(increments.items())])


@functools.cache
def _rollup_upsert(dialect: str) -> sa.Insert:
    """The upsert of one rollup row, built once per dialect with bound parameters: building
    it per call with the values in it cost a new cache key (and a compilation) every time."""
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(DeliveryRollup).values(
        hour=sa.bindparam("hour", type_=DeliveryRollup.hour.type),
        outcome=sa.bindparam("outcome", type_=DeliveryRollup.outcome.type),
        count=sa.bindparam("count", type_=DeliveryRollup.count.type))
    return stmt.on_conflict_do_update(
        index_elements=[DeliveryRollup.hour, DeliveryRollup.outcome],
        set_={"count": DeliveryRollup.count + stmt.excluded.count},
    )


_DOMAIN_UPSERTS: dict[str, Any] = {}


def _domain_upsert(dialect: str) -> Any:
    """One row's upsert into domain_rollup, built once per dialect: the same statement every
    time, so SQLAlchemy compiles it once (a multi-row VALUES of varying length would be
    compiled again for every batch: that was most of the cost)."""
    if dialect not in _DOMAIN_UPSERTS:
        table = cast(sa.Table, DomainRollup.__table__)
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        stmt = insert(table)
        _DOMAIN_UPSERTS[dialect] = stmt.on_conflict_do_update(
            index_elements=[table.c.grain, table.c.start, table.c.domain, table.c.outcome,
                            table.c.failure_class, table.c.latency_bucket],
            set_={"count": table.c["count"] + stmt.excluded["count"]},
        )
    return _DOMAIN_UPSERTS[dialect]


def bump_domain_rollup(session: so.Session, increments: Mapping[DomainKey, int],
                       connection: sa.Connection | None = None) -> None:
    """Add counts to domain_rollup rows, creating them as needed, atomically: one upsert
    executed for every row (executemany; psycopg pipelines it), in key order (two writers
    lock shared rows in the same order)."""
    if not increments:
        return
    ordered = sorted(increments.items())
    connection = connection or session.connection()
    if connection.dialect.name == "postgresql":
        # One statement for the whole batch, in key order (the function returns the rows in
        # the order given): the server plans and runs one upsert instead of one per row (a
        # batch of eight deliveries has 32 rows: four grains each, fewer once the Counter
        # merged equal keys), the rows as one JSON parameter (``database.json_rows``: an
        # array per column, as the ``unnest`` form had them, was dumped by psycopg element by
        # element in Python), on the driver's connection.
        driver_write(connection, _PG_DOMAIN_UPSERT, [json_rows(
            [{"grain": grain, "start": start, "domain": domain, "outcome": outcome,
              "failure_class": failure, "latency_bucket": bucket, "count": count}
             for (grain, start, domain, outcome, failure, bucket), count in ordered])])
        return
    rows = [{"grain": grain, "start": start, "domain": domain, "outcome": outcome,
             "failure_class": failure, "latency_bucket": bucket, "count": count}
            for (grain, start, domain, outcome, failure, bucket), count in ordered]
    connection.execute(_domain_upsert(connection.dialect.name), rows)


_PG_DOMAIN_UPSERT = (
    "INSERT INTO domain_rollup (grain, start, domain, outcome, failure_class, latency_bucket, "
    "count) SELECT grain, start, domain, outcome, failure_class, latency_bucket, count "
    "FROM json_populate_recordset(NULL::domain_rollup, %s) "
    "ON CONFLICT (grain, start, domain, outcome, failure_class, latency_bucket) "
    "DO UPDATE SET count = domain_rollup.count + excluded.count")
_PG_ROLLUP_UPSERT = (
    "INSERT INTO delivery_rollup (hour, outcome, count) SELECT hour, outcome, count "
    "FROM json_populate_recordset(NULL::delivery_rollup, %s) "
    "ON CONFLICT (hour, outcome) DO UPDATE SET count = delivery_rollup.count + excluded.count")


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
        session.execute(sa.text("LOCK TABLE delivery_rollup, domain_rollup "
                                "IN SHARE ROW EXCLUSIVE MODE"))
    backfill_events(session, since, until)
    rebuild_domain_rollup(session, since, until)
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
    result = cast(sa.CursorResult[Any], session.execute(
        sa.insert(DeliveryRollup).from_select(["hour", "outcome", "count"], recount),
        execution_options={"preserve_rowcount": True},
    ))
    return result.rowcount


def rebuild_domain_rollup(session: so.Session, since: dt.datetime | None,
                          until: dt.datetime | None) -> int:
    """Recount domain_rollup around [since, until); no commit, no lock (``rebuild_rollup``
    takes it). Returns the number of rows written.

    The hour rows are recounted from the events, once; the day, week and month rows are then
    summed from the hour rows (a few thousand rows a day instead of another pass over the
    events). Each grain is rebuilt over whole buckets of its own; the hours recounted cover
    all of them.
    """
    ranges: dict[str, list[dt.datetime | None]] = {
        grain: [GRAIN_FLOOR[grain](since) if since is not None else None,
                grain_ceil(grain, until) if until is not None else None]
        for grain in DOMAIN_GRAINS}
    starts = [r[0] for r in ranges.values() if r[0] is not None]
    ends = [r[1] for r in ranges.values() if r[1] is not None]
    ranges["hour"] = [min(starts) if starts else None, max(ends) if ends else None]
    written = 0
    for grain in DOMAIN_GRAINS:
        first, end = ranges[grain]
        rows: list[sa.ColumnElement[bool]] = [DomainRollup.grain == grain]
        if first is not None:
            rows.append(DomainRollup.start >= first)
        if end is not None:
            rows.append(DomainRollup.start < end)
        session.execute(sa.delete(DomainRollup).where(*rows))
        recount = _hours_from_events(first, end) if grain == "hour" \
            else _grain_from_hours(grain, first, end)
        result = cast(sa.CursorResult[Any], session.execute(
            sa.insert(DomainRollup).from_select(
                ["grain", "start", "domain", "outcome", "failure_class", "latency_bucket",
                 "count"], recount),
            execution_options={"preserve_rowcount": True},
        ))
        written += result.rowcount
    return written


def _hours_from_events(first: dt.datetime | None, end: dt.datetime | None
                       ) -> sa.Select[Any, Any, Any, Any, Any, Any, Any]:
    events = [*outcome_rows(), DeliveryEvent.domain.is_not(None)]
    if first is not None:
        events.append(DeliveryEvent.timestamp >= first)
    if end is not None:
        events.append(DeliveryEvent.timestamp < end)
    bucket = time_bucket("hour", DeliveryEvent.timestamp)
    outcome = outcome_of_event_type()
    failure = sa.func.coalesce(DeliveryEvent.failure_class, sa.literal_column("''"))
    latency = sa.case(
        (DeliveryEvent.event_type == sa.literal_column("'delivery'"),
         sa.case((DeliveryEvent.latency.is_(None), sa.literal_column(str(NO_BUCKET))),
                 else_=bucket_sql(DeliveryEvent.latency))),
        else_=sa.literal_column(str(NO_BUCKET)))
    return (
        sa.select(sa.literal_column("'hour'"), bucket, DeliveryEvent.domain, outcome, failure,
                  latency, sa.func.count())
        .where(*events)
        .group_by(bucket, DeliveryEvent.domain, outcome, failure, latency)
    )


def _grain_from_hours(grain: str, first: dt.datetime | None,
                      end: dt.datetime | None) -> sa.Select[Any, Any, Any, Any, Any, Any, Any]:
    hours = so.aliased(DomainRollup, name="hours")
    where = [hours.grain == sa.literal_column("'hour'")]
    if first is not None:
        where.append(hours.start >= first)
    if end is not None:
        where.append(hours.start < end)
    bucket = time_bucket(grain, hours.start)
    return (
        sa.select(sa.literal_column(f"'{grain}'"), bucket, hours.domain, hours.outcome,
                  hours.failure_class, hours.latency_bucket, sa.func.sum(hours.count))
        .where(*where)
        .group_by(bucket, hours.domain, hours.outcome, hours.failure_class,
                  hours.latency_bucket)
    )


CLASSIFY_BATCH = 5000


def domain_sql(address: so.QueryableAttribute[str | None], dialect: str
               ) -> sa.ColumnElement[str | None]:
    """``recipient_domain`` in SQL: the part after the last "@", lower case."""
    if dialect == "postgresql":
        return sa.func.lower(sa.func.substring(address, sa.literal_column("'[^@]*$'")))
    # SQLite has no regular expressions: rtrim(a, <every character of a but "@">) keeps the
    # address up to its last "@".
    last_at = sa.func.length(sa.func.rtrim(address, sa.func.replace(address, "@", "")))
    return sa.func.lower(sa.func.substr(address, last_at + 1))


def backfill_events(session: so.Session, since: dt.datetime | None = None,
                    until: dt.datetime | None = None) -> int:
    """Give events recorded before migration 0007 what newer ones get when written: the
    failure class of failures, the domain of outcomes, the latency of deliveries (from the
    message's reception event). Only rows still missing them; no commit. Returns how many
    failures were classified."""
    window: list[sa.ColumnElement[bool]] = []
    if since is not None:
        window.append(DeliveryEvent.timestamp >= day_floor(since))
    if until is not None:
        window.append(DeliveryEvent.timestamp < grain_ceil("day", until))
    dialect = session.get_bind().dialect.name
    reception = so.aliased(DeliveryEvent)
    latency: sa.ColumnElement[Any]
    if dialect == "postgresql":
        latency = sa.extract("epoch", DeliveryEvent.timestamp - reception.timestamp)
    else:
        latency = (sa.func.julianday(DeliveryEvent.timestamp)
                   - sa.func.julianday(reception.timestamp)) * 86400.0
    session.execute(
        sa.update(DeliveryEvent)
        .where(*outcome_rows(), *window, DeliveryEvent.domain.is_(None),
               DeliveryEvent.event_type == "delivery", DeliveryEvent.latency.is_(None))
        .values(latency=sa.select(latency).where(
            reception.message_id == DeliveryEvent.message_id,
            reception.event_type == "reception").limit(1).scalar_subquery())
        .execution_options(synchronize_session=False))
    session.execute(
        sa.update(DeliveryEvent)
        .where(*outcome_rows(), *window, DeliveryEvent.domain.is_(None))
        .values(domain=domain_sql(DeliveryEvent.recipient, dialect))
        .execution_options(synchronize_session=False))
    classified, after = 0, 0
    while True:
        rows = session.execute(
            sa.select(DeliveryEvent.id, DeliveryEvent.smtp_code, DeliveryEvent.enhanced_code,
                      DeliveryEvent.message)
            .where(sa.text(ERROR_EVENTS_SQL), DeliveryEvent.failure_class.is_(None),
                   DeliveryEvent.id > after, *window)
            .order_by(DeliveryEvent.id).limit(CLASSIFY_BATCH)).all()
        if not rows:
            return classified
        table = cast(sa.Table, DeliveryEvent.__table__)
        # Core, on the session's connection: an executemany of UPDATE ... WHERE id = ?.
        session.connection().execute(
            sa.update(table).where(table.c.id == sa.bindparam("event_id"))
            .values(failure_class=sa.bindparam("cls")),
            [{"event_id": r.id, "cls": failure_class(r.smtp_code, r.enhanced_code, r.message)}
             for r in rows])
        classified += len(rows)
        after = rows[-1].id


def delete_events(session: so.Session, message_id_prefix: str) -> int:
    """Delete every event of the messages whose id starts with ``message_id_prefix`` and
    recount the rollup of the hours they were in; commits. Returns how many were deleted.

    For ``flask demo reset``: demo ids have a prefix of their own (demo/vocabulary.py).
    """
    ours = DeliveryEvent.message_id.startswith(message_id_prefix, autoescape=True)
    since, until = session.execute(
        sa.select(sa.func.min(DeliveryEvent.timestamp), sa.func.max(DeliveryEvent.timestamp))
        .where(ours)).one()
    if since is None:
        return 0
    result = cast(sa.CursorResult[Any], session.execute(
        sa.delete(DeliveryEvent).where(ours).execution_options(synchronize_session=False)))
    count = result.rowcount or 0
    rebuild_rollup(session, since, until)
    session.commit()
    return int(count)
