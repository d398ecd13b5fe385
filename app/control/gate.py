"""The delivery worker's side of delivery control: limits per destination, admission, slots.

``DeliveryControl`` keeps the policies and backoff states in memory, refreshed from the
database every ``REFRESH_SECONDS`` (so a change made over the API or the CLI reaches every
worker within that time, without a restart), and asks the database for what is shared:
connection slots and rate counters (``limits.py``). A destination without any policy and
without backoff costs no database work at all.

A job that may not go now (paused by backoff, a full rate window, every connection slot
taken) is *postponed*: the worker gives its claim back with a new due time, without counting
an attempt, and its thread moves on to other destinations.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from flask import Flask

from ..database import unit_of_work
from ..timeutil import utcnow
from . import limits as shared
from .backoff import BackoffState, after_throttle, is_throttling, reduced
from .policies import Limits, PolicyBook, load_rows

log = logging.getLogger("elemta.control")

REFRESH_SECONDS = 2.0
RESOLVED_MAX = 10_000  # destinations whose limits are remembered between two refreshes
SLOT_BUSY_DELAY = 1.0  # every slot taken: try again this soon (connections turn over fast)
Clock = Callable[[], dt.datetime]


class Postpone(Exception):
    """The job may not go now; try again at ``until``."""

    def __init__(self, until: dt.datetime, reason: str) -> None:
        super().__init__(reason)
        self.until = until
        self.reason = reason


@dataclass(frozen=True)
class Admission:
    """A job allowed to go, with the limits it goes under and what it consumed."""

    limits: Limits
    windows: tuple[str, ...] = ()
    starts: tuple[dt.datetime, ...] = ()


class DeliveryControl:
    def __init__(self, app: Flask, owner: str, default_connections: int,
                 clock: Clock = utcnow) -> None:
        self.app = app
        self.owner = owner
        self.clock = clock
        self.default_connections = default_connections
        self._lock = threading.Lock()
        self._book = PolicyBook([], default_connections)
        self._resolved: dict[tuple[str, str, tuple[str, ...]], Limits] = {}
        self._backoff: dict[str, BackoffState] = {}
        self._loaded_at = -REFRESH_SECONDS
        self._refreshing = threading.Lock()  # held by the one thread reading the policies
        # Messages reserved in the database but not sent yet, per limit key, for the windows
        # they were reserved in (limits.chunk_for): most admissions cost no transaction.
        self._allowance: dict[str, tuple[tuple[dt.datetime, ...], int]] = {}
        # One reservation at a time per limit key (``admit``); the others wait for it.
        self._reserving: set[str] = set()
        self._reserved = threading.Condition(self._lock)
        # A window found full, per key: (the windows' starts and limits, when to come back);
        # until those windows end (or the limits change), the other threads are postponed
        # without asking the database again.
        self._full: dict[str, tuple[tuple[object, ...], Postpone]] = {}

    # ----------------------------------------------------------------- the cache

    def refresh(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._loaded_at < REFRESH_SECONDS:
            return
        # One thread reads the policies; the others go on with the book they have (at most
        # one read old) instead of each reading them too: every delivery thread met the
        # expired cache at once, eight reads where one does (docs/PERFORMANCE.md, "Delivery,
        # the worker's CPU outside the recorder"). Before the first read there is no book to
        # go on with: they wait for it.
        first = self._loaded_at < 0
        if not self._refreshing.acquire(blocking=force or first):
            return
        try:
            if force or time.monotonic() - self._loaded_at >= REFRESH_SECONDS:
                self._load()
        finally:
            self._refreshing.release()

    def _load(self) -> None:
        try:
            with unit_of_work(self.app) as session:
                rows = load_rows(session)
                states = {b.key: BackoffState(b.key, b.level, b.pause_until,
                                              b.last_throttled_at, b.last_reply, b.throttles)
                          for b in shared.load_backoff(session)}
        except Exception:
            log.exception("reading delivery policies failed; keeping the previous ones")
            self._loaded_at = time.monotonic()
            return
        with self._lock:
            self._book = PolicyBook(rows, self.default_connections)
            self._resolved = {}
            self._backoff = states
            self._loaded_at = time.monotonic()

    def needs_hosts(self, domain: str) -> bool:
        self.refresh()
        return self._book.needs_hosts(domain)

    def limits_for(self, destination: str, domain: str, hostnames: Sequence[str] = ()) -> Limits:
        """The limits in force now: the policy's, reduced by the destination's backoff."""
        self.refresh()
        with self._lock:
            # Resolved once per destination until the next refresh (a worker sends to few
            # destinations, many messages each).
            wanted = (destination, domain, tuple(hostnames))
            base = self._resolved.get(wanted)
            if base is None:
                base = self._book.limits_for(destination, domain, hostnames)
                if len(self._resolved) < RESOLVED_MAX:
                    self._resolved[wanted] = base
            state = self._backoff.get(base.key)
        if state is None:
            return base
        level = state.level_at(self.clock())
        if level == 0:
            return base
        return replace(base, max_connections=reduced(base.max_connections, level) or 1,
                       messages_per_minute=reduced(base.messages_per_minute, level),
                       messages_per_hour=reduced(base.messages_per_hour, level))

    # ----------------------------------------------------------------- admission

    def admit(self, limits: Limits) -> Admission:
        """Allow one message to ``limits.key`` now, or raise ``Postpone``."""
        now = self.clock()
        with self._lock:
            state = self._backoff.get(limits.key)
        if state is not None and state.paused_at(now):
            raise Postpone(state.pause_until + _jitter(2.0),
                           f"{limits.key} paused after throttling ({state.last_reply})")
        windows = shared.windows_of(limits.messages_per_minute, limits.messages_per_hour)
        if not windows:
            return Admission(limits)
        starts = tuple(shared.window_start(w, now) for w, _ in windows)
        names = tuple(w for w, _ in windows)
        key = limits.key
        with self._lock:
            while True:
                held_starts, left = self._allowance.get(key, ((), 0))
                if held_starts == starts and left > 0:
                    self._allowance[key] = (starts, left - 1)
                    return Admission(limits, names, starts)
                full_at, postpone = self._full.get(key, ((), None))
                if postpone is not None and full_at == (starts, tuple(windows)):
                    raise Postpone(postpone.until + _jitter(1.0), postpone.reason)
                if key not in self._reserving:
                    self._reserving.add(key)
                    break
                # Another thread is reserving for this key: wait for its chunk rather than
                # reserve one each. (Eight threads reserving at once queued on the counter
                # row, and the delivery threads fell out of step: the recorder's group
                # commits shrank, costing more worker CPU than the checks themselves;
                # docs/PERFORMANCE.md, "Delivery control".)
                self._reserved.wait(1.0)
        try:
            chunk = shared.chunk_for(windows)
            with unit_of_work(self.app) as session:
                full = shared.consume(session, key, windows, now, chunk)
                if full is not None and chunk > 1:  # near the limit: one may still fit
                    chunk = 1
                    full = shared.consume(session, key, windows, now, 1)
        finally:
            with self._lock:
                self._reserving.discard(key)
                self._reserved.notify_all()
        if full is not None:
            start = shared.window_start(full, now)
            end = start + dt.timedelta(seconds=shared.WINDOWS[full])
            # Spread the waiting mail over the first seconds of the next window, so it does
            # not all come back in the same instant.
            wait = Postpone(end + _jitter(min(10.0, shared.WINDOWS[full] / 6)),
                            f"{key}: messages per {full} reached")
            with self._lock:
                self._full[key] = ((starts, tuple(windows)), wait)
            raise wait
        with self._lock:
            held_starts, left = self._allowance.get(key, ((), 0))
            left = left if held_starts == starts else 0
            self._allowance[key] = (starts, left + chunk - 1)
            self._full.pop(key, None)
        return Admission(limits, names, starts)

    def refund(self, admission: Admission) -> None:
        """The admitted message was not sent (no connection slot): give its count back to
        this worker's allowance (its windows still run) or to the database."""
        if not admission.windows:
            return
        key = admission.limits.key
        with self._lock:
            held_starts, left = self._allowance.get(key, ((), 0))
            if held_starts == admission.starts:
                self._allowance[key] = (held_starts, left + 1)
                return
        now = self.clock()
        if tuple(shared.window_start(w, now) for w in admission.windows) != admission.starts:
            return  # its windows are over: nothing to give back
        with unit_of_work(self.app) as session:
            shared.refund(session, key, admission.windows, now)

    def slot_busy(self, admission: Admission) -> Postpone:
        self.refund(admission)
        return Postpone(self.clock() + dt.timedelta(seconds=SLOT_BUSY_DELAY) + _jitter(1.0),
                        f"{admission.limits.key}: every connection slot is taken")

    # ----------------------------------------------------------------- connection slots

    def take_slot(self, key: str, limit: int) -> int | None:
        with unit_of_work(self.app) as session:
            return shared.take_slot(session, key, limit, self.owner, self.clock())

    def give_slot(self, key: str, slot: int) -> None:
        try:
            with unit_of_work(self.app) as session:
                shared.give_slot(session, key, slot, self.owner)
        except Exception:  # its lease expires on its own
            log.exception("giving back connection slot %s of %s failed", slot, key)

    # ----------------------------------------------------------------- outcomes

    def observe(self, limits: Limits, results: Sequence[object]) -> None:
        """Back the destination off when the results include a throttling reply."""
        throttle = next((r for r in results if is_throttling(r)), None)  # type: ignore[arg-type]
        if throttle is None:
            return
        now = self.clock()
        with self._lock:
            state = self._backoff.get(limits.key)
        step = after_throttle(state, now)
        if step is None:
            return
        level, pause_until = step
        reply = getattr(throttle, "text", "")
        with unit_of_work(self.app) as session:
            shared.save_backoff(session, limits.key, level, pause_until, reply, now)
        with self._lock:
            self._backoff[limits.key] = BackoffState(
                limits.key, level, pause_until, now, reply,
                (state.throttles if state else 0) + 1)
        log.warning("%s throttled us (%s): backing off to level %d, paused until %s",
                    limits.key, reply, level, pause_until.isoformat(timespec="seconds"))

    # ----------------------------------------------------------------- housekeeping

    def housekeeping(self) -> None:
        """Renew this worker's slot leases, forget finished windows and recovered backoff."""
        now = self.clock()
        with unit_of_work(self.app) as session:
            shared.renew_slots(session, self.owner, now)
            shared.prune(session, now)
            with self._lock:
                recovered = [(key, state.last_throttled_at) for key, state
                             in self._backoff.items() if state.level_at(now) == 0]
            shared.forget_backoff(session, recovered)

    def close(self) -> None:
        try:
            with unit_of_work(self.app) as session:
                shared.release_all_slots(session, self.owner)
        except Exception:
            log.exception("giving back connection slots failed; their leases expire")


def _jitter(seconds: float) -> dt.timedelta:
    return dt.timedelta(seconds=random.uniform(0, seconds))
