"""The shared state behind destination limits, in the database every worker uses.

- Connection slots: a destination limited to N connections has slots 0..N-1; a worker takes a
  free one (or one whose lease expired: its worker died) with one atomic
  ``INSERT ... ON CONFLICT DO UPDATE ... WHERE expired`` before opening a connection, renews
  the leases of its slots while their connections live, and deletes the row when the
  connection closes. No process keeps a count of its own, so any number of workers on any
  number of hosts stay within N together.
- Rate counters: one row per (destination, window, window start) incremented with the same
  atomic upsert, guarded by ``count < limit``: the row's lock serialises concurrent workers and
  the database answers "granted" (one row changed) or "over the limit" (none). Fixed windows
  (the clock minute and hour): at most the limit within each window.
- Backoff: one row per throttled destination (``gate.py`` decides what it means).

Every function commits: each is one short transaction on a hot path.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Sequence
from typing import Any, cast

import sqlalchemy as sa
import sqlalchemy.orm as so
from sqlalchemy.dialects import postgresql, sqlite

from ..models import ConnectionSlot, DestinationBackoff, RateCounter

SLOT_LEASE_SECONDS = 60
WINDOWS = {"slice": 10, "minute": 60, "hour": 3600}
SLICES_PER_MINUTE = 6


def _insert(session: so.Session, model: type) -> sa.Insert:
    dialect = session.get_bind().dialect.name
    module = postgresql if dialect == "postgresql" else sqlite
    return module.insert(model)


# --------------------------------------------------------------------------- connection slots


def take_slot(session: so.Session, key: str, limit: int, owner: str,
              now: dt.datetime) -> int | None:
    """Lease a free connection slot of ``key`` (of ``limit``); its number, or None if all are
    taken. Commits."""
    expires = now + dt.timedelta(seconds=SLOT_LEASE_SECONDS)
    taken = {row.slot: row.expires_at for row in session.execute(
        sa.select(ConnectionSlot.slot, ConnectionSlot.expires_at)
        .where(ConnectionSlot.key == key, ConnectionSlot.slot < limit))}
    free = [slot for slot in range(limit) if slot not in taken or taken[slot] < now]
    # In a random order: workers opening connections at once would otherwise all try the
    # same first free slot, each waiting for the others' commit on its row.
    random.shuffle(free)
    for slot in free:
        stmt = _insert(session, ConnectionSlot).values(key=key, slot=slot, owner=owner,
                                                       expires_at=expires)
        stmt = stmt.on_conflict_do_update(  # type: ignore[attr-defined]
            index_elements=["key", "slot"],
            set_={"owner": owner, "expires_at": expires},
            where=ConnectionSlot.expires_at < now).returning(ConnectionSlot.slot)
        if session.execute(stmt).first() is not None:
            session.commit()
            return slot
    session.commit()
    return None


def give_slot(session: so.Session, key: str, slot: int, owner: str) -> None:
    session.execute(sa.delete(ConnectionSlot).where(
        ConnectionSlot.key == key, ConnectionSlot.slot == slot, ConnectionSlot.owner == owner))
    session.commit()


def renew_slots(session: so.Session, owner: str, now: dt.datetime) -> int:
    """Extend the leases of every slot ``owner`` holds; commits."""
    result = cast(sa.CursorResult[Any], session.execute(
        sa.update(ConnectionSlot).where(ConnectionSlot.owner == owner)
        .values(expires_at=now + dt.timedelta(seconds=SLOT_LEASE_SECONDS))))
    session.commit()
    return result.rowcount or 0


def release_all_slots(session: so.Session, owner: str) -> None:
    session.execute(sa.delete(ConnectionSlot).where(ConnectionSlot.owner == owner))
    session.commit()


def slots_in_use(session: so.Session, now: dt.datetime) -> dict[str, int]:
    rows = session.execute(sa.select(ConnectionSlot.key, sa.func.count())
                           .where(ConnectionSlot.expires_at >= now)
                           .group_by(ConnectionSlot.key))
    return {key: count for key, count in rows}


# --------------------------------------------------------------------------- rates


def window_start(window: str, now: dt.datetime) -> dt.datetime:
    if window == "slice":
        return now.replace(second=now.second - now.second % WINDOWS["slice"], microsecond=0)
    if window == "minute":
        return now.replace(second=0, microsecond=0)
    return now.replace(minute=0, second=0, microsecond=0)


def windows_of(per_minute: int | None, per_hour: int | None) -> list[tuple[str, int]]:
    """The counters a message must pass. A per-minute limit is also spread over the minute
    (ten-second slices of a sixth of it, rounded up), so a destination limited to 60 a
    minute gets about one a second, not 60 in the first instant of every minute."""
    windows: list[tuple[str, int]] = []
    if per_minute:
        windows.append(("slice", -(-per_minute // SLICES_PER_MINUTE)))
        windows.append(("minute", per_minute))
    if per_hour:
        windows.append(("hour", per_hour))
    return windows


def consume(session: so.Session, key: str, limits: Sequence[tuple[str, int]],
            now: dt.datetime, amount: int = 1) -> str | None:
    """Count ``amount`` messages in every ``(window, limit)``; all or nothing. Returns None
    when granted, else the window that is full (nothing counted). Commits."""
    for window, limit in limits:
        start = window_start(window, now)
        stmt = _insert(session, RateCounter).values(key=key, window=window,
                                                    window_start=start, count=amount)
        stmt = stmt.on_conflict_do_update(  # type: ignore[attr-defined]
            index_elements=["key", "window", "window_start"],
            set_={"count": RateCounter.count + amount},
            where=RateCounter.count + amount <= limit).returning(RateCounter.count)
        # (RETURNING, not rowcount: psycopg reports -1 for this statement.)
        if amount > limit or session.execute(stmt).first() is None:
            session.rollback()
            return window
    session.commit()
    return None


CHUNK_MAX = 500


def chunk_for(limits: Sequence[tuple[str, int]]) -> int:
    """How many messages a worker reserves at once: a twentieth of the smallest window's
    limit, at most ``CHUNK_MAX`` (so a generous limit costs one transaction per hundreds of
    messages, and a small one is never hoarded by one worker). What a worker reserved but did
    not send before its windows end is lost to it: at most a twentieth of the window's limit."""
    return max(1, min(CHUNK_MAX, min(limit for _, limit in limits) // 20)) if limits else 1


def refund(session: so.Session, key: str, windows: Sequence[str], now: dt.datetime,
           amount: int = 1) -> None:
    """Give back messages counted by ``consume`` (not sent after all); commits."""
    for window in windows:
        session.execute(sa.update(RateCounter).where(
            RateCounter.key == key, RateCounter.window == window,
            RateCounter.window_start == window_start(window, now), RateCounter.count >= amount)
            .values(count=RateCounter.count - amount))
    session.commit()


def current_counts(session: so.Session, now: dt.datetime) -> dict[tuple[str, str], int]:
    rows = session.execute(sa.select(RateCounter.key, RateCounter.window, RateCounter.count)
                           .where(sa.or_(
                               sa.and_(RateCounter.window == "minute",
                                       RateCounter.window_start == window_start("minute", now)),
                               sa.and_(RateCounter.window == "hour",
                                       RateCounter.window_start == window_start("hour", now)))))
    return {(key, window): count for key, window, count in rows}


def prune(session: so.Session, now: dt.datetime) -> None:
    """Forget finished windows and expired slot leases; commits."""
    session.execute(sa.delete(RateCounter).where(
        RateCounter.window_start < now - dt.timedelta(hours=2)))
    session.execute(sa.delete(ConnectionSlot).where(
        ConnectionSlot.expires_at < now - dt.timedelta(seconds=SLOT_LEASE_SECONDS)))
    session.commit()


# --------------------------------------------------------------------------- backoff


def load_backoff(session: so.Session) -> list[DestinationBackoff]:
    return list(session.scalars(sa.select(DestinationBackoff).order_by(DestinationBackoff.key)))


def save_backoff(session: so.Session, key: str, level: int, pause_until: dt.datetime,
                 reply: str, now: dt.datetime) -> None:
    """Record a throttling reply of ``key`` at ``level``; commits."""
    stmt = _insert(session, DestinationBackoff).values(
        key=key, level=level, pause_until=pause_until, last_throttled_at=now,
        last_reply=reply[:500], throttles=1)
    stmt = stmt.on_conflict_do_update(  # type: ignore[attr-defined]
        index_elements=["key"],
        set_={"level": level, "pause_until": pause_until, "last_throttled_at": now,
              "last_reply": reply[:500], "throttles": DestinationBackoff.throttles + 1})
    session.execute(stmt)
    session.commit()


def forget_backoff(session: so.Session, recovered: Sequence[tuple[str, dt.datetime]]) -> None:
    """Delete the rows of recovered destinations, unless throttled again since; commits."""
    for key, last_throttled_at in recovered:
        session.execute(sa.delete(DestinationBackoff).where(
            DestinationBackoff.key == key,
            DestinationBackoff.last_throttled_at == last_throttled_at))
    session.commit()
