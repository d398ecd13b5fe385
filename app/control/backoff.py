"""Adaptive backoff: what a throttling reply does to a destination, and how it recovers (pure).

A throttling reply (``421``, or a temporary ``4.7.x`` other than 4.7.5 "TLS failed" and 4.7.1,
which greylisting uses) raises the destination's level by one, up to ``MAX_LEVEL``, and pauses
it for ``BASE_PAUSE * 2**(level-1)`` seconds (capped). After the pause the destination
resumes with ``max_connections >> level`` connections (at least one) and its rates divided
the same way; every ``RECOVERY_STEP`` seconds without another throttling reply the level
drops by one, until it is back to its policy. Replies that arrive while it is paused (sent
before the pause) do not raise the level again.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Protocol

BASE_PAUSE = 30.0
MAX_PAUSE = 900.0
MAX_LEVEL = 5
RECOVERY_STEP = 60.0
_CONNECT_421 = re.compile(r"(?:^|: )421\b")
NOT_THROTTLING = ("4.7.5", "4.7.1")


class Result(Protocol):
    kind: str
    text: str
    smtp_code: int | None
    enhanced_code: str | None


def is_throttling(result: Result) -> bool:
    if result.kind != "tempfail":
        return False
    if result.smtp_code == 421:
        return True
    code = result.enhanced_code or ""
    if code.startswith("4.7.") and code not in NOT_THROTTLING:
        return True
    # A 421 greeting (too many connections) reaches us as a connection failure's text.
    return result.smtp_code is None and bool(_CONNECT_421.search(result.text))


@dataclass(frozen=True)
class BackoffState:
    key: str
    level: int
    pause_until: dt.datetime
    last_throttled_at: dt.datetime
    last_reply: str
    throttles: int

    def level_at(self, now: dt.datetime) -> int:
        """The level in force at ``now``: full during the pause, then one step less per
        ``RECOVERY_STEP``."""
        if now < self.pause_until:
            return self.level
        steps = int((now - self.pause_until).total_seconds() // RECOVERY_STEP)
        return max(0, self.level - steps)

    def paused_at(self, now: dt.datetime) -> bool:
        return now < self.pause_until


def pause_for(level: int) -> float:
    return min(MAX_PAUSE, BASE_PAUSE * 2 ** max(0, level - 1))


def after_throttle(state: BackoffState | None, now: dt.datetime) -> tuple[int, dt.datetime] | None:
    """``(level, pause_until)`` after a throttling reply at ``now``; None while paused already."""
    if state is not None and state.paused_at(now):
        return None
    level = min(MAX_LEVEL, (state.level_at(now) if state else 0) + 1)
    return level, now + dt.timedelta(seconds=pause_for(level))


def reduced(limit: int | None, level: int) -> int | None:
    """A limit at ``level``: halved per level, never below one."""
    if limit is None or level <= 0:
        return limit
    return max(1, limit >> level)
