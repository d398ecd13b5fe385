"""A pure-Python reference of the delivery statistics windows (API.md §3), for the tests.

Written from the calendar, not from the service: bucket keys are tuples (hour, date, ISO week,
month), the window is walked back from ``now``'s key one calendar step at a time.
"""

from __future__ import annotations

import datetime as dt

UTC = dt.UTC
SIZES = {"hour": 24, "day": 30, "week": 12, "month": 12}
OUTCOMES = ("delivered", "failed", "deferred")


def key_of(unit: str, moment: dt.datetime) -> tuple[int, ...]:
    m = moment.astimezone(UTC)
    if unit == "hour":
        return (m.year, m.month, m.day, m.hour)
    if unit == "day":
        return (m.year, m.month, m.day)
    if unit == "week":
        iso = m.date().isocalendar()
        return (iso.year, iso.week)
    return (m.year, m.month)


def start_of(unit: str, key: tuple[int, ...]) -> dt.datetime:
    if unit == "hour":
        return dt.datetime(*key, tzinfo=UTC)
    if unit == "day":
        return dt.datetime(*key, tzinfo=UTC)
    if unit == "week":
        monday = dt.date.fromisocalendar(key[0], key[1], 1)
        return dt.datetime(monday.year, monday.month, monday.day, tzinfo=UTC)
    return dt.datetime(key[0], key[1], 1, tzinfo=UTC)


def previous_key(unit: str, key: tuple[int, ...]) -> tuple[int, ...]:
    if unit == "month":
        year, month = key
        return (year - 1, 12) if month == 1 else (year, month - 1)
    start = start_of(unit, key)
    # One second before the bucket's start lies in the previous bucket.
    return key_of(unit, start - dt.timedelta(seconds=1))


def label_of(unit: str, key: tuple[int, ...]) -> str:
    start = start_of(unit, key)
    if unit == "hour":
        return f"{start.hour:02d}:00"
    if unit == "month":
        return f"{start.year:04d}-{start.month:02d}"
    return f"{start.year:04d}-{start.month:02d}-{start.day:02d}"


def reference_window(unit: str, now: dt.datetime,
                     events: list[tuple[dt.datetime, str]]) -> list[dict]:
    """The buckets of ``unit``'s window at ``now``, newest first, counting ``events``."""
    keys = [key_of(unit, now)]
    while len(keys) < SIZES[unit]:
        keys.append(previous_key(unit, keys[-1]))
    counts = {key: dict.fromkeys(OUTCOMES, 0) for key in keys}
    for timestamp, outcome in events:
        key = key_of(unit, timestamp)
        if key in counts:
            counts[key][outcome] += 1
    return [{"label": label_of(unit, key), "start": start_of(unit, key), **counts[key]}
            for key in keys]
