"""Delivery statistics windows (``stats.service``): bucket edges, labels, the success rate.

Checked against ``tests/stats_reference.py``, written from the calendar rather than from the
service; the database-backed tests check the same windows through SQL.
"""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.stats.service import SCALES, bucket_floor, bucket_shift, bucket_starts, success_rate

from ..stats_reference import key_of, label_of, previous_key, start_of

UTC = dt.UTC
moments = st.datetimes(min_value=dt.datetime(2001, 1, 1), max_value=dt.datetime(2098, 12, 31),
                       timezones=st.just(UTC))


@given(moment=moments, unit=st.sampled_from(sorted(SCALES)))
def test_the_window_matches_the_calendar(moment, unit):
    scale = SCALES[unit]
    keys = [key_of(unit, moment)]
    while len(keys) < scale.buckets:
        keys.append(previous_key(unit, keys[-1]))
    starts = bucket_starts(scale, moment)
    assert starts == [start_of(unit, key) for key in keys]
    assert [s.strftime(scale.label_format) for s in starts] == [label_of(unit, k) for k in keys]


@given(moment=moments, unit=st.sampled_from(sorted(SCALES)), steps=st.integers(-30, 30))
def test_shifting_moves_whole_buckets(moment, unit, steps):
    start = bucket_floor(unit, moment)
    shifted = bucket_shift(unit, start, steps)
    assert bucket_floor(unit, shifted) == shifted
    assert bucket_shift(unit, shifted, -steps) == start


@pytest.mark.parametrize(("unit", "moment", "start", "label"), [
    ("hour", "2026-01-28T12:59:59+00:00", "2026-01-28T12:00:00+00:00", "12:00"),
    ("hour", "2026-01-28T13:30:00+02:00", "2026-01-28T11:00:00+00:00", "11:00"),
    ("day", "2024-02-29T23:59:59+00:00", "2024-02-29T00:00:00+00:00", "2024-02-29"),
    ("week", "2026-01-01T10:00:00+00:00", "2025-12-29T00:00:00+00:00", "2025-12-29"),
    ("week", "2026-03-30T00:00:00+00:00", "2026-03-30T00:00:00+00:00", "2026-03-30"),
    ("month", "2026-12-31T23:00:00+00:00", "2026-12-01T00:00:00+00:00", "2026-12"),
])
def test_bucket_floor_and_label(unit, moment, start, label):
    floor = bucket_floor(unit, dt.datetime.fromisoformat(moment))
    assert floor == dt.datetime.fromisoformat(start)
    assert floor.strftime(SCALES[unit].label_format) == label


def test_months_cross_the_year():
    start = dt.datetime(2026, 1, 1, tzinfo=UTC)
    assert bucket_shift("month", start, -1) == dt.datetime(2025, 12, 1, tzinfo=UTC)
    assert bucket_shift("month", start, -13) == dt.datetime(2024, 12, 1, tzinfo=UTC)
    assert bucket_shift("month", start, 12) == dt.datetime(2027, 1, 1, tzinfo=UTC)


def test_an_unknown_unit_is_refused():
    with pytest.raises(ValueError):
        bucket_floor("fortnight", dt.datetime(2026, 1, 1, tzinfo=UTC))


@pytest.mark.parametrize(("counts", "rate"), [
    ((1250, 45, 23), 94.8),  # the reference's example
    ((0, 0, 0), 100.0),
    ((0, 1, 0), 0.0),
    ((1, 1, 0), 50.0),
    ((1, 2, 0), 33.3),
    ((2, 1, 0), 66.7),
    ((1, 1999, 0), 0.1),  # 0.05 rounds half up
    ((1999, 1, 0), 100.0),  # 99.95 rounds half up
])
def test_success_rate(counts, rate):
    assert success_rate(*counts) == rate
