"""Bucket boundaries of /api/stats/delivery against the pure-Python reference (both databases)."""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.events import record_event
from app.models import DeliveryEvent, DeliveryRollup
from app.sqltypes import time_bucket
from app.stats import service

from .stats_reference import UTC, key_of, reference_window, start_of

EVENT_OF_OUTCOME = {"delivered": "delivery", "failed": "rejection", "deferred": "tempfail"}

# Instants where calendars turn: midnight, Mondays, month ends (leap February, 30/31-day months),
# a year end whose ISO week belongs to the next year.
BOUNDARIES = [
    dt.datetime(2024, 2, 29, 0, 0, tzinfo=UTC),
    dt.datetime(2024, 3, 1, 0, 0, tzinfo=UTC),
    dt.datetime(2025, 12, 29, 0, 0, tzinfo=UTC),  # Monday of ISO week 2026-W01
    dt.datetime(2026, 1, 1, 0, 0, tzinfo=UTC),
    dt.datetime(2026, 3, 30, 0, 0, tzinfo=UTC),  # a Monday
    dt.datetime(2026, 5, 1, 0, 0, tzinfo=UTC),
    dt.datetime(2026, 7, 1, 0, 0, tzinfo=UTC),
    dt.datetime(2026, 11, 24, 13, 0, tzinfo=UTC),
    dt.datetime(2027, 1, 4, 0, 0, tzinfo=UTC),
]
NUDGES = [dt.timedelta(0), dt.timedelta(microseconds=-1), dt.timedelta(seconds=1),
          dt.timedelta(minutes=-30), dt.timedelta(hours=1), dt.timedelta(days=-1)]

nows = st.one_of(
    st.builds(lambda b, n: b + n, st.sampled_from(BOUNDARIES), st.sampled_from(NUDGES)),
    st.datetimes(min_value=dt.datetime(2020, 1, 1), max_value=dt.datetime(2030, 12, 31),
                 timezones=st.just(UTC)),
)


@st.composite
def history(draw: st.DrawFn) -> tuple[dt.datetime, list[tuple[dt.datetime, str]]]:
    """A ``now`` and outcomes at or before it, many right at a bucket edge of some unit."""
    now = draw(nows)
    events = []
    for _ in range(draw(st.integers(0, 25))):
        outcome = draw(st.sampled_from(list(EVENT_OF_OUTCOME)))
        if draw(st.booleans()):
            unit = draw(st.sampled_from(["hour", "day", "week", "month"]))
            edge = start_of(unit, key_of(unit, now))
            back = draw(st.integers(0, 13)) * {"hour": dt.timedelta(hours=1),
                                               "day": dt.timedelta(days=1),
                                               "week": dt.timedelta(weeks=1),
                                               "month": dt.timedelta(days=31)}[unit]
            moment = edge - back + draw(st.sampled_from(
                [dt.timedelta(0), dt.timedelta(microseconds=-1), dt.timedelta(seconds=1)]))
        else:
            moment = now - dt.timedelta(seconds=draw(st.integers(0, 400 * 86400)))
        events.append((min(moment, now), outcome))
    return now, events


def _record(session, events: list[tuple[dt.datetime, str]]) -> None:
    session.execute(sa.delete(DeliveryEvent))
    session.execute(sa.delete(DeliveryRollup))
    for n, (timestamp, outcome) in enumerate(events):
        record_event(session, EVENT_OF_OUTCOME[outcome], message_id=f"msg-test{n:08d}",
                     recipient=f"rcpt{n}@example.com", timestamp=timestamp, message="x")
    session.commit()


def _plain(buckets: list[dict]) -> list[dict]:
    return [{k: b[k] for k in ("label", "start", "delivered", "failed", "deferred")}
            for b in buckets]


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=history())
def test_windows_match_the_reference(session, case) -> None:
    now, events = case
    _record(session, events)
    for scale in service.TIME_SCALES:
        stats = service.delivery_stats(session, scale, now=now)
        expected = reference_window(scale, now, events)
        assert _plain(stats["data"]) == expected, scale
        for outcome in ("delivered", "failed", "deferred"):
            assert stats[f"total_{outcome}"] == sum(b[outcome] for b in expected)
        hours = reference_window("hour", now, events)
        assert [{"label": h["hour"], **{k: v for k, v in h.items() if k != "hour"}}
                for h in stats["by_hour"]] == hours


@pytest.mark.parametrize("now, scale, first, last", [
    (dt.datetime(2026, 3, 1, 0, 0, tzinfo=UTC), "day", "2026-03-01", "2026-01-31"),
    (dt.datetime(2024, 3, 1, 12, 0, tzinfo=UTC), "day", "2024-03-01", "2024-02-01"),
    (dt.datetime(2026, 1, 1, 0, 30, tzinfo=UTC), "hour", "00:00", "01:00"),
    (dt.datetime(2026, 1, 1, 0, 30, tzinfo=UTC), "week", "2025-12-29", "2025-10-13"),
    (dt.datetime(2026, 3, 29, 23, 59, 59, tzinfo=UTC), "week", "2026-03-23", "2026-01-05"),
    (dt.datetime(2026, 3, 30, 0, 0, tzinfo=UTC), "week", "2026-03-30", "2026-01-12"),
    (dt.datetime(2026, 1, 31, 23, 0, tzinfo=UTC), "month", "2026-01", "2025-02"),
])
def test_window_edges(session, now, scale, first, last) -> None:
    data = service.delivery_stats(session, scale, now=now)["data"]
    assert len(data) == {"hour": 24, "day": 30, "week": 12, "month": 12}[scale]
    assert (data[0]["label"], data[-1]["label"]) == (first, last)
    starts = [b["start"] for b in data]
    assert starts == sorted(starts, reverse=True)
    assert starts[0] <= now


@pytest.mark.parametrize("moment", [
    dt.datetime(2026, 1, 4, 23, 59, 59, 999999, tzinfo=UTC),  # Sunday night
    dt.datetime(2026, 1, 5, 0, 0, tzinfo=UTC),  # Monday midnight
    dt.datetime(2024, 2, 29, 17, 45, 12, 500000, tzinfo=UTC),
    dt.datetime(2025, 12, 31, 23, 0, 0, 1, tzinfo=UTC),
    dt.datetime(2027, 1, 1, 0, 59, 59, tzinfo=UTC),
])
def test_time_bucket_matches_the_reference(session, moment) -> None:
    """The per-dialect SQL construct, straight on a raw timestamp column."""
    record_event(session, "delivery", message_id="msg-bucket0001", recipient="a@example.com",
                 timestamp=moment)
    session.commit()
    for unit in ("hour", "day", "week", "month"):
        got = session.scalar(sa.select(time_bucket(unit, DeliveryEvent.timestamp)))
        assert got == start_of(unit, key_of(unit, moment)), unit


def test_unknown_unit_is_refused() -> None:
    with pytest.raises(ValueError):
        time_bucket("minute", DeliveryEvent.timestamp)
