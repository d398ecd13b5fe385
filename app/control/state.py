"""What ``GET /api/policies/state`` and ``/metrics`` show: the destinations being limited."""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy.orm as so

from ..timeutil import utcnow
from . import limits
from .backoff import BackoffState


def destination_states(session: so.Session, now: dt.datetime | None = None) -> list[dict[str, Any]]:
    """Every destination that is backed off, holds connection slots or sent in this window."""
    now = now or utcnow()
    slots = limits.slots_in_use(session, now)
    counts = limits.current_counts(session, now)
    backoff = {b.key: BackoffState(b.key, b.level, b.pause_until, b.last_throttled_at,
                                   b.last_reply, b.throttles)
               for b in limits.load_backoff(session)}
    keys = sorted(set(slots) | {key for key, _ in counts} | set(backoff))
    states = []
    for key in keys:
        state = backoff.get(key)
        level = state.level_at(now) if state else 0
        states.append({
            "destination": key,
            "backoff_level": level,
            "paused_until": state.pause_until if state and state.paused_at(now) else None,
            "last_throttled_at": state.last_throttled_at if state else None,
            "last_reply": state.last_reply if state else None,
            "throttles": state.throttles if state else 0,
            "connections": slots.get(key, 0),
            "sent_this_minute": counts.get((key, "minute"), 0),
            "sent_this_hour": counts.get((key, "hour"), 0),
        })
    return states
