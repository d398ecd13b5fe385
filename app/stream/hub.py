"""The per-process hub: one thread watches the database, every socket gets its own queue.

Changes come from every process (other gunicorn workers, delivery workers, the SMTP listener,
``flask queue`` commands), and the database is the one place they all meet. So the hub polls it:
every ``STREAM_POLL_INTERVAL`` seconds (0.5 by default) one short read of the delivery events and
system logs newer than what it has seen, on a session it closes at once, plus the queue counts
when a queue socket is connected. New rows are fanned out to the bounded queue of each
subscribed socket. A socket thread therefore never touches the database while it streams, and a
slow socket only ever fills its own queue: when that overflows, the socket is closed with code
1013 and its client resumes from its cursor (see ``docs/STREAMS.md``), so nothing is lost.

The thread starts with the first subscriber and stops when the last one leaves, so an idle
process (and a test) has no stream thread at all.

Ids are handed out in id order, but on PostgreSQL a transaction can commit after a later id is
already visible; the hub remembers such holes and looks for them again on every poll until they
arrive or ``STREAM_HOLE_TIMEOUT`` seconds pass (then the id is taken for a rolled-back insert).
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
import sqlalchemy.orm as so
from flask import Flask

from . import frames
from .position import Position

log = logging.getLogger("elemta.stream")

DEFAULT_POLL_INTERVAL = 0.5
DEFAULT_HOLE_TIMEOUT = 60.0
DEFAULT_QUEUE_SIZE = 2000
MAX_HOLES = 10_000
ERROR_LOG_EVERY = 60.0

_hubs: weakref.WeakSet[Hub] = weakref.WeakSet()


# Items in a subscriber's queue, in dispatch order:
#   ("event", EventRow)  ("log", LogRow)  ("stats", json)  ("floor", event_floor, log_floor)
Item = tuple[Any, ...]


@dataclass
class Subscriber:
    """One socket's view of the hub: a filter and a bounded queue."""

    accepts: Callable[[Item], bool]
    wants_stats: bool = False
    queue_size: int = DEFAULT_QUEUE_SIZE
    queue: queue.Queue[Item] = field(init=False)
    overflowed: bool = field(default=False, init=False)
    # What the hub had handed out when this socket subscribed; set by Hub.subscribe.
    start_events: Position = field(default_factory=Position, init=False)
    start_logs: Position = field(default_factory=Position, init=False)

    def __post_init__(self) -> None:
        self.queue = queue.Queue(self.queue_size)

    def offer(self, items: Iterable[Item]) -> None:
        """Queue what this socket wants; never blocks (a full queue marks it overflowed)."""
        for item in items:
            if self.overflowed:
                return
            if item[0] == "stats" and not self.wants_stats:
                continue
            if item[0] in ("event", "log") and not self.accepts(item):
                continue
            try:
                self.queue.put_nowait(item)
            except queue.Full:
                self.overflowed = True

    def __hash__(self) -> int:
        return id(self)

    def __eq__(self, other: object) -> bool:
        return self is other


class _Table:
    """The hub's position in one table, with the holes it is still waiting for."""

    def __init__(self, floor: int) -> None:
        self.position = Position(floor)
        self.holes: dict[int, float] = {}

    def accept(self, ids: Iterable[int], now: float) -> None:
        for row_id in ids:
            if self.position.covers(row_id):
                continue
            top = self.position.top()
            if row_id - top - 1 > MAX_HOLES:
                # Far more missing ids than transactions can be in flight: a sequence jump.
                self.position.raise_floor(row_id - MAX_HOLES - 1)
                top = self.position.top()
            for missing in range(top + 1, row_id):
                self.holes[missing] = now
            self.holes.pop(row_id, None)
            self.position.add(row_id)

    def expire_holes(self, now: float, timeout: float) -> None:
        stale = [i for i, seen in self.holes.items() if now - seen >= timeout]
        if len(self.holes) - len(stale) > MAX_HOLES:  # keep memory bounded whatever happens
            stale = sorted(self.holes)[: len(self.holes) - MAX_HOLES]
        for row_id in stale:
            del self.holes[row_id]
            self.position.add(row_id)


class Hub:
    """Watches the database for new rows and fans them out to subscribers (one per app)."""

    def __init__(self, app: Flask) -> None:
        self._app = app
        config = app.config
        self.poll_interval = float(config.get("STREAM_POLL_INTERVAL", DEFAULT_POLL_INTERVAL))
        self.hole_timeout = float(config.get("STREAM_HOLE_TIMEOUT", DEFAULT_HOLE_TIMEOUT))
        self.queue_size = int(config.get("STREAM_QUEUE_SIZE", DEFAULT_QUEUE_SIZE))
        self.closing = False  # set by shutdown(); sockets then close with 1001
        self._lock = threading.Lock()
        self._poll_lock = threading.Lock()
        self._subscribers: set[Subscriber] = set()
        self._thread: threading.Thread | None = None
        self._stop: threading.Event | None = None
        self._events = _Table(0)
        self._logs = _Table(0)
        self._last_stats: str | None = None
        self._last_error_log = 0.0
        self._engine: sa.Engine | None = None
        _hubs.add(self)

    # ------------------------------------------------------------------ subscribers

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def subscribe(self, subscriber: Subscriber) -> Subscriber:
        """Register a socket; from now on it receives every row after ``start_*``."""
        with self._lock:
            if self.closing:
                raise HubClosed()
            if self._stop is None:
                self._start()
            subscriber.start_events = self._events.position.copy()
            subscriber.start_logs = self._logs.position.copy()
            self._subscribers.add(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        with self._lock:
            self._subscribers.discard(subscriber)
            if not self._subscribers and self._stop is not None:
                self._stop.set()  # the thread ends within one poll interval
                self._stop = None
                self._thread = None

    def _start(self) -> None:
        """Begin at the newest rows (lock held): a new stream starts from now."""
        with self.session() as session:
            event_max, log_max = frames.max_ids(session)
        self._events = _Table(event_max)
        self._logs = _Table(log_max)
        self._last_stats = None
        stop = threading.Event()
        thread = threading.Thread(target=self._run, args=(stop,), name="elemta-stream-hub",
                                  daemon=True)
        self._stop, self._thread = stop, thread
        thread.start()

    def shutdown(self, timeout: float | None = 5.0) -> None:
        """Close every stream (code 1001) and stop the thread; for process exit and tests."""
        self.closing = True
        with self._lock:
            thread, stop = self._thread, self._stop
            if stop is not None:
                stop.set()
            self._stop = None
            self._thread = None
        if thread is not None and timeout:
            thread.join(timeout)

    # ------------------------------------------------------------------ polling

    def session(self) -> so.Session:
        """A short-lived session of its own (never Flask-SQLAlchemy's request-scoped one)."""
        if self._engine is None:
            with self._app.app_context():
                from ..extensions import db

                self._engine = db.engine
        return so.Session(self._engine, expire_on_commit=False)

    def _run(self, stop: threading.Event) -> None:
        while not stop.wait(self.poll_interval):
            try:
                while not stop.is_set() and self.poll_once(stop):
                    pass  # a full batch: more rows are waiting, read on without sleeping
            except Exception as exc:  # noqa: BLE001 - a failing database must not end the hub
                now = time.monotonic()
                if now - self._last_error_log >= ERROR_LOG_EVERY:
                    self._last_error_log = now
                    log.warning("stream hub cannot read the database: %s", type(exc).__name__)

    def poll_once(self, stop: threading.Event | None = None) -> bool:
        """One round: read new rows and fan them out. True when a batch was full."""
        with self._poll_lock:
            if stop is not None and stop.is_set():
                return False
            with self._lock:
                wants_stats = any(s.wants_stats for s in self._subscribers)
                event_top, log_top = self._events.position.top(), self._logs.position.top()
                event_holes, log_holes = list(self._events.holes), list(self._logs.holes)
            with self.session() as session:
                # The counts first, the rows after. Each statement sees what was committed when
                # it ran (PostgreSQL's read committed; SQLite outside a transaction), so a
                # change committed between two reads is seen only by the later one. Read in
                # this order, every change the counts include is in the rows too: a client
                # never gets queue_stats before the queue_event behind them (the other order
                # sent e.g. "total 0" one poll before the "delivered" that made it so).
                stats = frames.stats_json(frames.queue_stats(session)) if wants_stats else None
                events = frames.events_after(session, event_top)
                logs = frames.logs_after(session, log_top)
                if event_holes:
                    events = frames.events_by_ids(session, event_holes) + events
                if log_holes:
                    logs = frames.logs_by_ids(session, log_holes) + logs
                session.rollback()
            self._dispatch(events, logs, stats)
            return len(events) - len(event_holes) >= frames.ROW_BATCH or (
                len(logs) - len(log_holes) >= frames.ROW_BATCH)

    def _dispatch(self, events: list[frames.EventRow], logs: list[frames.LogRow],
                  stats: str | None) -> None:
        now = time.monotonic()
        with self._lock:
            items: list[Item] = []
            floors = (self._events.position.floor, self._logs.position.floor)
            fresh_events = [e for e in events if not self._events.position.covers(e.id)]
            fresh_logs = [r for r in logs if not self._logs.position.covers(r.id)]
            self._events.accept((e.id for e in fresh_events), now)
            self._logs.accept((r.id for r in fresh_logs), now)
            self._events.expire_holes(now, self.hole_timeout)
            self._logs.expire_holes(now, self.hole_timeout)
            items.extend(("event", e) for e in fresh_events)
            items.extend(("log", r) for r in fresh_logs)
            if stats is not None and stats != self._last_stats:
                self._last_stats = stats
                items.append(("stats", stats))
            new_floors = (self._events.position.floor, self._logs.position.floor)
            if new_floors != floors:
                items.append(("floor", *new_floors))
            if items:
                for subscriber in self._subscribers:
                    subscriber.offer(items)


class HubClosed(RuntimeError):
    """The process is shutting down; no new streams."""


def get_hub(app: Flask) -> Hub:
    """The hub of this application in this process (created on first use)."""
    hub = app.extensions.get("elemta_stream_hub")
    if hub is None:
        with _create_lock:
            hub = app.extensions.get("elemta_stream_hub")
            if hub is None:
                hub = app.extensions["elemta_stream_hub"] = Hub(app)
    return hub


_create_lock = threading.Lock()


def shutdown_streams() -> None:
    """Ask every stream of this process to close (code 1001); safe in a signal handler.

    Only flags are set here (no locks, no I/O): each socket notices within a second and closes
    itself, so a gunicorn worker on SIGTERM finishes its sockets well within the grace period.
    """
    for hub in list(_hubs):
        hub.closing = True


def close_streams_on_sigterm() -> None:
    """For a gunicorn worker's ``post_worker_init`` hook: on SIGTERM, close every stream first.

    gunicorn's gthread worker waits up to ``graceful_timeout`` for open connections, and a
    WebSocket never ends by itself; with this, each socket sends close code 1001 within a
    second and the worker exits promptly. Must run in the worker's main thread.

    The handler chains to the one already installed (gunicorn's own ``handle_exit``, which starts
    the graceful shutdown), so that keeps working. A second call is a no-op: wrapping our own
    wrapper would only run the chain twice, and a hook merged from two configuration files must
    not do that.
    """
    previous = signal.getsignal(signal.SIGTERM)
    if getattr(previous, "_elemta_close_streams", False):
        return

    def on_sigterm(signum: int, frame: Any) -> None:
        shutdown_streams()
        if callable(previous):
            previous(signum, frame)

    # A marker on the handler itself (checked above); mypy has no function attributes.
    on_sigterm._elemta_close_streams = True  # type: ignore[attr-defined]
    signal.signal(signal.SIGTERM, on_sigterm)
    # signal.signal() makes SIGTERM interrupt system calls again; gunicorn had turned that off
    # ("don't let SIGTERM disturb active requests"), so restore its choice.
    signal.siginterrupt(signal.SIGTERM, False)
