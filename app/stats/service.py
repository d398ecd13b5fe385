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
from ..models import (
    ERROR_EVENTS_SQL,
    OUTCOME_OF_EVENT,
    OUTCOMES,
    DeliveryEvent,
    DeliveryRollup,
    DomainRollup,
)
from ..sqltypes import time_bucket
from ..timeutil import utcnow
from .latency import percentile

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
    moment = moment.astimezone(dt.UTC)
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


def grain_of(unit: str) -> str:
    """The domain_rollup rows a window of ``unit`` buckets reads: its own (one row set per
    time scale)."""
    return unit


def outcome_counts(session: so.Session, unit: str, since: dt.datetime,
                   until: dt.datetime, domain: str | None = None
                   ) -> dict[dt.datetime, dict[str, int]]:
    """{bucket start: {outcome: count}} for rollup hours in [since, until): every domain's
    from delivery_rollup, one domain's from domain_rollup."""
    if domain is None:
        bucket = time_bucket(unit, DeliveryRollup.hour)
        query = (
            sa.select(bucket, DeliveryRollup.outcome, sa.func.sum(DeliveryRollup.count))
            .where(DeliveryRollup.hour >= since, DeliveryRollup.hour < until)
            .group_by(bucket, DeliveryRollup.outcome)
        )
    else:
        bucket = time_bucket(unit, DomainRollup.start)
        query = (
            sa.select(bucket, DomainRollup.outcome, sa.func.sum(DomainRollup.count))
            .where(DomainRollup.domain == domain, DomainRollup.grain == grain_of(unit),
                   DomainRollup.start >= since, DomainRollup.start < until)
            .group_by(bucket, DomainRollup.outcome)
        )
    counts: dict[dt.datetime, dict[str, int]] = {}
    for start, outcome, count in session.execute(query):
        counts.setdefault(start, {})[outcome] = int(count or 0)
    return counts


def window_edges(scale: Scale, now: dt.datetime) -> tuple[list[dt.datetime], dt.datetime]:
    """The window's bucket starts (newest first) and its end (the end of the current one)."""
    starts = bucket_starts(scale, now)
    return starts, bucket_shift(scale.unit, starts[0], 1)


def window(session: so.Session, scale: Scale, now: dt.datetime,
           domain: str | None = None) -> list[dict[str, Any]]:
    """Every bucket of the window, zero-filled, newest first."""
    starts, until = window_edges(scale, now)
    counts = outcome_counts(session, scale.unit, starts[-1], until, domain)
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


def recent_errors(session: so.Session, limit: int = RECENT_ERRORS,
                  domain: str | None = None) -> list[dict[str, Any]]:
    """The newest failed or deferred outcomes (by event id, the order they were recorded).

    One query over both types: read backwards along the primary key, it stops at the tenth
    error of either kind, however long ago the last error of one kind was. One domain's come
    from the partial index ``ix_delivery_events_domain_errors`` (domain, id), whose predicate
    is repeated here literally so the planner can use it: only outcomes have a domain.
    """
    where: list[sa.ColumnElement[bool] | sa.TextClause]
    if domain is None:
        where = [DeliveryEvent.event_type.in_(ERROR_EVENT_TYPES), *outcome_rows()]
    else:
        where = [DeliveryEvent.domain == domain, sa.text(ERROR_EVENTS_SQL)]
    events = session.scalars(
        sa.select(DeliveryEvent).where(*where).order_by(DeliveryEvent.id.desc()).limit(limit)
    )
    return [
        {"message_id": e.message_id, "recipient": e.recipient, "error": e.message,
         "timestamp": e.timestamp, "status": OUTCOME_OF_EVENT[e.event_type]}
        for e in events
    ]


def delivery_stats(session: so.Session, time_scale: str = "hour",
                   now: dt.datetime | None = None, domain: str | None = None) -> dict[str, Any]:
    """The whole ``/api/stats/delivery`` answer for one time scale (API.md §3), of every
    recipient domain or of ``domain`` only (then from the per-domain rollup)."""
    scale = SCALES[time_scale]
    now = now or utcnow()
    data = window(session, scale, now, domain)
    hours = data if scale.unit == "hour" else window(session, SCALES["hour"], now, domain)
    totals = {outcome: sum(bucket[outcome] for bucket in data) for outcome in OUTCOMES}
    return {
        "total_delivered": totals["delivered"],
        "total_failed": totals["failed"],
        "total_deferred": totals["deferred"],
        "success_rate": success_rate(totals["delivered"], totals["failed"], totals["deferred"]),
        "data": data,
        "by_hour": [{"hour": h["label"], **{k: v for k, v in h.items() if k != "label"}}
                    for h in hours],
        "recent_errors": recent_errors(session, domain=domain),
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


# --------------------------------------------------------------------------- per domain

DOMAIN_SORTS = ("volume", "failure_rate")
TOP_FAILURE_CLASSES = 5


def rate(part: int, total: int) -> float:
    """``100 * part / total``, one decimal, half up; 0.0 when there was no outcome."""
    if not total:
        return 0.0
    return float((Decimal(100 * part) / Decimal(total)).quantize(Decimal("0.1"),
                                                                   rounding=ROUND_HALF_UP))


def domain_stats(session: so.Session, time_scale: str = "hour", *, limit: int = 20,
                 sort: str = "volume", now: dt.datetime | None = None) -> dict[str, Any]:
    """``/api/stats/domains``: per recipient domain with outcomes in the window of
    ``time_scale`` (the same window as ``delivery_stats``), its counts, rates, top failure
    classes and latency percentiles; the first ``limit`` by ``sort``.

    One ``GROUP BY domain, outcome, failure_class, latency_bucket`` over the window's
    domain_rollup rows (hourly rows for the hour scale, daily ones beyond), never the events.
    """
    scale = SCALES[time_scale]
    starts, until = window_edges(scale, now or utcnow())
    total_count = sa.func.sum(DomainRollup.count)
    rows = session.execute(
        sa.select(DomainRollup.domain, DomainRollup.outcome, DomainRollup.failure_class,
                  DomainRollup.latency_bucket, total_count)
        .where(DomainRollup.grain == grain_of(scale.unit), DomainRollup.start >= starts[-1],
               DomainRollup.start < until)
        .group_by(DomainRollup.domain, DomainRollup.outcome, DomainRollup.failure_class,
                  DomainRollup.latency_bucket)
    )
    per_domain: dict[str, dict[str, Any]] = {}
    for domain, outcome, failure, bucket, count in rows:
        entry = per_domain.setdefault(domain, {
            "counts": dict.fromkeys(OUTCOMES, 0), "classes": {}, "latency": {}})
        count = int(count or 0)
        entry["counts"][outcome] = entry["counts"].get(outcome, 0) + count
        if failure:
            entry["classes"][failure] = entry["classes"].get(failure, 0) + count
        if outcome == "delivered" and bucket >= 0:
            entry["latency"][bucket] = entry["latency"].get(bucket, 0) + count
    items = [_domain_item(domain, entry) for domain, entry in per_domain.items()]
    if sort == "failure_rate":
        items.sort(key=lambda i: (-i["failure_rate"], -i["total"], i["domain"]))
    else:
        items.sort(key=lambda i: (-i["total"], i["domain"]))
    return {"time_scale": time_scale, "sort": sort, "since": starts[-1], "until": until,
            "total_domains": len(items), "domains": items[:limit]}


def _domain_item(domain: str, entry: dict[str, Any]) -> dict[str, Any]:
    counts = entry["counts"]
    delivered, failed, deferred = counts["delivered"], counts["failed"], counts["deferred"]
    total = delivered + failed + deferred
    classes = sorted(entry["classes"].items(), key=lambda kv: (-kv[1], kv[0]))
    return {
        "domain": domain, "delivered": delivered, "failed": failed, "deferred": deferred,
        "total": total, "success_rate": success_rate(delivered, failed, deferred),
        "failure_rate": rate(failed, total), "deferral_rate": rate(deferred, total),
        "failure_classes": [{"failure_class": name, "count": n}
                            for name, n in classes[:TOP_FAILURE_CLASSES]],
        "latency_p50": percentile(entry["latency"], 50),
        "latency_p95": percentile(entry["latency"], 95),
    }
