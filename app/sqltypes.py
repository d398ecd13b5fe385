"""Column types and SQL constructs that behave the same on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.compiler import compiles

UTC = dt.UTC


class UTCDateTime(sa.types.TypeDecorator[dt.datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, on every dialect.

    PostgreSQL stores ``timestamptz``; SQLite has no time zones, so values are stored as naive
    UTC and given their zone back when read. Naive values are refused on the way in: a naive
    datetime in this code base is a bug.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("UTCDateTime needs an aware datetime")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if isinstance(value, str):  # raw SQLite text, e.g. from a func.max()
            value = dt.datetime.fromisoformat(value)
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


# --------------------------------------------------------------------------- time buckets

TIME_BUCKET_UNITS = ("hour", "day", "week", "month")

# SQLite keeps datetimes as text in SQLAlchemy's storage format (microseconds included), so a
# bucket is that same text truncated: it compares, groups and round-trips like a stored value.
_SQLITE_BUCKET = {
    "hour": ("%Y-%m-%d %H:00:00.000000",),
    "day": ("%Y-%m-%d 00:00:00.000000",),
    # Back six days, then forward to the next Monday (or stay on it): the ISO week's Monday.
    "week": ("%Y-%m-%d 00:00:00.000000", "-6 days", "weekday 1"),
    "month": ("%Y-%m-01 00:00:00.000000",),
}


class time_bucket(sa.sql.functions.FunctionElement[dt.datetime]):  # noqa: N801 (SQL function)
    """The first instant (UTC) of the hour, day, ISO week or month a timestamp falls in.

    ``time_bucket("day", Event.timestamp)`` renders ``date_trunc`` on PostgreSQL (in UTC, with
    the unit as a literal: a bound parameter would make the GROUP BY expression differ from the
    selected one) and ``strftime`` on SQLite. The result is a ``UTCDateTime``.
    """

    type = UTCDateTime()
    name = "time_bucket"
    inherit_cache = True

    def __init__(self, unit: str, column: Any) -> None:
        if unit not in TIME_BUCKET_UNITS:
            raise ValueError(f"unknown time bucket unit {unit!r}")
        self.unit = unit
        # The unit travels as a literal clause, so it is part of the statement's cache key.
        super().__init__(sa.literal_column(f"'{unit}'"), column)


@compiles(time_bucket, "postgresql")
def _time_bucket_postgresql(element: time_bucket, compiler: Any, **kw: Any) -> str:
    unit, column = element.clauses.clauses
    # timestamptz -> UTC wall time -> truncated -> back to timestamptz: independent of the
    # session's TimeZone setting.
    return (f"timezone('UTC', date_trunc({compiler.process(unit, **kw)}, "
            f"timezone('UTC', {compiler.process(column, **kw)})))")


@compiles(time_bucket, "sqlite")
def _time_bucket_sqlite(element: time_bucket, compiler: Any, **kw: Any) -> str:
    _unit, column = element.clauses.clauses
    fmt, *modifiers = _SQLITE_BUCKET[element.unit]
    # Seconds only: SQLite keeps milliseconds in its date arithmetic and would round
    # 23:59:59.9999 up into the next day before applying a modifier.
    value = f"substr({compiler.process(column, **kw)}, 1, 19)"
    args = [f"'{fmt}'", value] + [f"'{m}'" for m in modifiers]
    return f"strftime({', '.join(args)})"


@compiles(time_bucket)
def _time_bucket_default(element: time_bucket, compiler: Any, **kw: Any) -> str:
    raise NotImplementedError(f"time_bucket has no form for {compiler.dialect.name}")
