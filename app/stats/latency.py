"""The delivery latency histogram of the per-domain rollup (docs/STATS.md, "Latency").

Latency is the time from reception (the message's acceptance into the queue) to the delivery
of one recipient. The rollup counts deliveries per bucket of fixed, log-spaced bounds: bucket
``i`` holds latencies in ``(BOUNDS[i-1], BOUNDS[i]]`` seconds (bucket 0: up to one second), the
last bucket everything above the last bound. A percentile is read as the upper bound of the
bucket holding the nearest-rank sample: never lower than the true value, at most twice it.
"""

from __future__ import annotations

from collections.abc import Mapping

import sqlalchemy as sa
import sqlalchemy.orm as so

# 1 s, 2 s, 4 s ... 2**19 s (six days: beyond the default queue lifetime of five).
BOUNDS: tuple[int, ...] = tuple(2 ** i for i in range(20))
OVERFLOW = len(BOUNDS)  # the bucket of latencies above the last bound
NO_BUCKET = -1  # rollup rows that are not deliveries, or deliveries of unknown latency


def bucket_of(seconds: float | None) -> int:
    """The histogram bucket of a latency (``NO_BUCKET`` when it is unknown)."""
    if seconds is None:
        return NO_BUCKET
    for index, bound in enumerate(BOUNDS):
        if seconds <= bound:
            return index
    return OVERFLOW


def bucket_sql(seconds: so.QueryableAttribute[float | None]) -> sa.ColumnElement[int]:
    """``bucket_of`` in SQL (a CASE over the bounds, literals only: it is grouped by)."""
    return sa.case(
        *[(seconds <= sa.literal_column(str(bound)), sa.literal_column(str(index)))
          for index, bound in enumerate(BOUNDS)],
        else_=sa.literal_column(str(OVERFLOW)),
    )


def upper_bound(bucket: int) -> float:
    """What a percentile falling into ``bucket`` reports: its upper bound, in seconds (the
    overflow bucket has none; it reports the last bound, "at least")."""
    return float(BOUNDS[min(bucket, OVERFLOW - 1)])


def percentile(counts: Mapping[int, int], q: int) -> float | None:
    """The ``q`` percentile (an integer, 0 < q <= 100) of a histogram {bucket: count}, nearest rank:
    the upper bound of the bucket holding the ``ceil(q/100 * n)``-th smallest latency.
    None when the histogram is empty."""
    total = sum(count for bucket, count in counts.items() if bucket >= 0)
    if total <= 0:
        return None
    rank = max(1, -(-q * total // 100))  # ceil in integers: 0.95 * 20 is 19.000000000000004
    seen = 0
    for bucket in sorted(b for b in counts if b >= 0):
        seen += counts[bucket]
        if seen >= rank:
            return upper_bound(bucket)
    return upper_bound(OVERFLOW)  # pragma: no cover - seen reaches total above
