"""Time helpers: one clock, one wire format."""

from __future__ import annotations

import datetime as dt
import email.utils
from typing import overload

UTC = dt.UTC


def utcnow() -> dt.datetime:
    return dt.datetime.now(UTC)


@overload
def isoformat_z(value: dt.datetime) -> str: ...
@overload
def isoformat_z(value: None) -> None: ...
@overload
def isoformat_z(value: dt.datetime | None) -> str | None: ...


def isoformat_z(value: dt.datetime | None) -> str | None:
    """``2026-01-28T12:00:00Z``: UTC, seconds precision, as the contract says."""
    if value is None:
        return None
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str) -> dt.datetime:
    """Parse an ISO 8601 timestamp; a value without a zone is taken as UTC.

    Raises ``ValueError`` for anything that is not a representable instant, including the
    edges of the calendar (``0001-01-01T00:00:00+05:00`` is before year 1 in UTC).
    """
    value = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    return to_utc(value)


def to_utc(value: dt.datetime) -> dt.datetime:
    """``value`` in UTC (naive = UTC); ``ValueError`` when UTC cannot represent it."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"{value.isoformat()} is outside the representable range") from None


def rfc5322_date(value: dt.datetime | None = None) -> str:
    """An RFC 5322 date-time in UTC (Date:, Received:): ``+0000``, not the obsolete ``GMT``
    (section 4.3) nor ``-0000``, which says the local offset is unknown."""
    return email.utils.format_datetime(to_utc(value or utcnow()).replace(microsecond=0))
