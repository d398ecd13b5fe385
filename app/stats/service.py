"""Delivery statistics: zero-filled buckets of outcomes, read from the hourly rollup.

The windows come from one ``GROUP BY time_bucket(unit, hour)`` over ``delivery_rollup`` (at most
a year of hours times three outcomes), never from the raw events. ``now`` is a parameter so the
bucket arithmetic can be checked at any instant.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import sqlalchemy as sa
import sqlalchemy.orm as so

from ..events import outcome_rows, rebuild_rollup
from ..models import OUTCOME_OF_EVENT, OUTCOMES, DeliveryEvent, DeliveryRollup
from ..sqltypes import time_bucket
from ..timeutil import utcnow

RECENT_ERRORS = 10
ERROR_EVENT_TYPES = ("tempfail", "rejection")


@dataclass(frozen=True)
class Scale:
    unit: str
    buckets: int
    label_format: str


SCALES = {
    "hour": Scale("hour", 24, "%H:00"),
    "day": Scale("day", 30, "%Y-%m-%d"),
    "week": Scale("week", 12, "%Y-%m-%d"),
    "month": Scale("month", 12, "%Y-%m"),
}
TIME_SCALES = tuple(SCALES)


def bucket_floor(unit: str, moment: dt.datetime) -> dt.datetime:
    """The first instant of the bucket containing ``moment`` (UTC)."""
    moment = moment.astimezone(dt.timezone.utc)
    hour = moment.replace(minute=0, second=0, microsecond=0)
    if unit == "hour":
        return hour
    day = hour.replace(hour=0)
    if unit == "day":
        return day
    if unit == "week":
        return day - dt.timedelta(days=day.weekday())
    if unit == "month":
        return day.replace(day=1)
    raise ValueError(f"unknown unit {unit!r}")


def bucket_shift(unit: str, start: dt.datetime, steps: int) -> dt.datetime:
    """The start of the bucket ``steps`` buckets after (negative: before) ``start``."""
    if unit == "month":
        index = start.year * 12 + start.month - 1 + steps
        return start.replace(year=index // 12, month=index % 12 + 1)
    size = {"hour": dt.timedelta(hours=1), "day": dt.timedelta(days=1),
            "week": dt.timedelta(weeks=1)}[unit]
    return start + steps * size


def bucket_starts(scale: Scale, now: dt.datetime) -> list[dt.datetime]:
    """The window's bucket starts, newest (the current, partial one) first."""
    current = bucket_floor(scale.unit, now)
    return [bucket_shift(scale.unit, current, -i) for i in range(scale.buckets)]


def outcome_counts(session: so.Session, unit: str, since: dt.datetime,
                   until: dt.datetime) -> dict[dt.datetime, dict[str, int]]:
    """{bucket start: {outcome: count}} for rollup hours in [since, until)."""
    bucket = time_bucket(unit, DeliveryRollup.hour)
    rows = session.execute(
        sa.select(bucket, DeliveryRollup.outcome, sa.func.sum(DeliveryRollup.count))
        .where(DeliveryRollup.hour >= since, DeliveryRollup.hour < until)
        .group_by(bucket, DeliveryRollup.outcome)
    )
    counts: dict[dt.datetime, dict[str, int]] = {}
    for start, outcome, count in rows:
        counts.setdefault(start, {})[outcome] = int(count or 0)
    return counts


def window(session: so.Session, scale: Scale, now: dt.datetime) -> list[dict[str, Any]]:
    """Every bucket of the window, zero-filled, newest first."""
    starts = bucket_starts(scale, now)
    until = bucket_shift(scale.unit, starts[0], 1)
    counts = outcome_counts(session, scale.unit, starts[-1], until)
    return [
        {"label": start.strftime(scale.label_format), "start": start,
         **{outcome: counts.get(start, {}).get(outcome, 0) for outcome in OUTCOMES}}
        for start in starts
    ]


def success_rate(delivered: int, failed: int, deferred: int) -> float:
    """Percentage delivered, one decimal, half up; 100.0 when there was no outcome."""
    total = delivered + failed + deferred
    if not total:
        return 100.0
    rate = Decimal(100 * delivered) / Decimal(total)
    return float(rate.quantize(Decimal("0.1"), rounding=ROUND_HALF_UP))


def recent_errors(session: so.Session, limit: int = RECENT_ERRORS) -> list[dict[str, Any]]:
    """The newest failed or deferred outcomes (by event id, the order they were recorded).

    One query over both types: read backwards along the primary key, it stops at the tenth
    error of either kind, however long ago the last error of one kind was.
    """
    events = session.scalars(
        sa.select(DeliveryEvent)
        .where(DeliveryEvent.event_type.in_(ERROR_EVENT_TYPES), *outcome_rows())
        .order_by(DeliveryEvent.id.desc()).limit(limit)
    )
    return [
        {"message_id": e.message_id, "recipient": e.recipient, "error": e.message,
         "timestamp": e.timestamp, "status": OUTCOME_OF_EVENT[e.event_type]}
        for e in events
    ]


def delivery_stats(session: so.Session, time_scale: str = "hour",
                   now: dt.datetime | None = None) -> dict[str, Any]:
    """The whole ``/api/stats/delivery`` answer for one time scale (SPEC 3)."""
    scale = SCALES[time_scale]
    now = now or utcnow()
    data = window(session, scale, now)
    hours = data if scale.unit == "hour" else window(session, SCALES["hour"], now)
    totals = {outcome: sum(bucket[outcome] for bucket in data) for outcome in OUTCOMES}
    return {
        "total_delivered": totals["delivered"],
        "total_failed": totals["failed"],
        "total_deferred": totals["deferred"],
        "success_rate": success_rate(totals["delivered"], totals["failed"], totals["deferred"]),
        "data": data,
        "by_hour": [{"hour": h["label"], **{k: v for k, v in h.items() if k != "label"}}
                    for h in hours],
        "recent_errors": recent_errors(session),
    }


def outcome_totals(session: so.Session) -> dict[str, int]:
    """Every recipient outcome ever counted, per outcome (summed over the hourly rollup)."""
    totals = dict.fromkeys(OUTCOMES, 0)
    for outcome, count in session.execute(
        sa.select(DeliveryRollup.outcome, sa.func.sum(DeliveryRollup.count))
        .group_by(DeliveryRollup.outcome)
    ):
        if outcome in totals:
            totals[outcome] = int(count or 0)
    return totals


def rebuild(session: so.Session, since: dt.datetime | None = None,
            until: dt.datetime | None = None) -> int:
    """Recount the hourly rollup from the events (repair tool) and commit: one unit of work.

    ``events.rebuild_rollup`` itself does not commit: the demo data generators call it inside
    their own transactions.
    """
    rows = rebuild_rollup(session, since, until)
    session.commit()
    return rows
