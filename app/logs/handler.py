"""The database logging handler (API.md §4.1): every process's records in ``system_logs``.

The code that logs must never wait for, fail because of, or loop through the database:

- ``emit`` only turns the record into a row and puts it on a bounded in-memory queue
  (``put_nowait``); when the queue is full the record is dropped and counted.
- One daemon thread per process drains the queue and inserts batches through an engine of its
  own (one pooled connection), never through a request's session. After the first record of a
  batch it lets the batch fill for ``DEFAULT_GATHER`` (0.1 s): a listener logging a line per
  message then writes one transaction per tenth of a second instead of one per record.
- While the database is unavailable the drain thread keeps its current batch and retries with
  a growing pause (at most 30 s); the queue fills, further records are dropped and counted, the
  application is untouched. When the database answers again the batch and the queue are written.
- Records emitted by the drain thread itself (SQLAlchemy, the driver, this module's warnings)
  and every ``sqlalchemy.*`` and ``elemta.logs.handler`` record are never stored, so writing a
  record can never produce another one.
- The same thread prunes rows older than ``ELEMTA_LOG_RETENTION`` every few minutes with one
  set-based DELETE.

What is stored: ``elemta.*`` records at ``ELEMTA_LOG_LEVEL`` (default info) and above; records
of every other logger (gunicorn, aiosmtpd, werkzeug, alembic, ...) at warning and above only,
so per-connection chatter of libraries does not flood the table. The handler sits on the root
logger next to the JSON stdout handler of ``app.logging_setup``.

One handler per process: ``install_database_logging(app)`` is idempotent; installing for
another database URL (tests) replaces the handler. It is flushed and closed at exit, and
re-created lazily in a child after ``fork`` (gunicorn with ``preload_app``).
"""

from __future__ import annotations

import atexit
import datetime as dt
import logging
import os
import queue
import threading
import time
import traceback
from typing import Any, cast

import sqlalchemy as sa
from flask import Flask

from ..config import DEFAULTS
from ..copyinsert import CopyInsert
from ..database import is_transient_conflict
from ..errors import is_database_unavailable
from ..logging_setup import detect_role
from ..models import SystemLog
from .levels import canonical_levelno, level_name, levelno_of
from .service import prune_system_logs

log = logging.getLogger("elemta.logs.handler")
# A batch of records as one binary COPY on PostgreSQL (``_write``). A record's row is a tuple
# in the order of its columns: timestamp, levelno, level, logger, message, process.
_COPY = CopyInsert(cast(sa.Table, SystemLog.__table__))
_Row = tuple[dt.datetime, int, str, str, str, str]

APP_LOGGER_PREFIX = "elemta"
NEVER_STORED = ("sqlalchemy", log.name)
MAX_MESSAGE_CHARS = 4000
DEFAULT_CAPACITY = DEFAULTS["LOG_QUEUE_SIZE"]
DEFAULT_BATCH_SIZE = 500
DEFAULT_FLUSH_INTERVAL = DEFAULTS["LOG_FLUSH_INTERVAL"]
# Seconds the thread lets a batch fill after its first record before writing it.
DEFAULT_GATHER = 0.1
DEFAULT_PRUNE_INTERVAL = DEFAULTS["LOG_PRUNE_INTERVAL"]
MAX_RETRY_PAUSE = 30.0
SHUTDOWN_TIMEOUT = 5.0

# True in the drain thread: whatever it logs while writing is not stored.
_thread_state = threading.local()


class _FlushMarker:
    """Put on the queue by ``flush``; set once every row queued before it was attempted."""

    def __init__(self) -> None:
        self.done = threading.Event()


_STOP = object()


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _clean_text(text: str) -> str:
    """Text PostgreSQL accepts: no NUL characters, no lone surrogates."""
    if "\x00" in text:
        text = text.replace("\x00", "\\0")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def _message_of(record: logging.LogRecord) -> str:
    try:
        message = record.getMessage()
    except Exception:  # bad %-args: keep what was meant rather than lose the record
        message = f"{record.msg!s} {record.args!r}"
    if record.exc_info and record.exc_info[1] is not None:
        # The one-line summary only: the table is readable over the API, tracebacks go to stdout.
        summary = traceback.format_exception_only(record.exc_info[0], record.exc_info[1])
        message = f"{message} [{summary[-1].strip()}]"
    return _clean_text(message[:MAX_MESSAGE_CHARS])


def _engine_for(url: str) -> sa.Engine:
    """An engine of the handler's own: one connection, quick to give up on a dead server."""
    if url.startswith("sqlite"):
        return sa.create_engine(url, pool_size=1, max_overflow=0,
                                connect_args={"timeout": 30})
    return sa.create_engine(url, pool_size=1, max_overflow=0, pool_pre_ping=True,
                            pool_recycle=1800,
                            connect_args={"connect_timeout": 5,
                                          "application_name": "elemta-log-handler"})


class DatabaseLogHandler(logging.Handler):
    """A logging handler that stores records in ``system_logs`` from a background thread."""

    def __init__(
        self,
        url: str,
        *,
        level: int = logging.INFO,
        role: str = "cli",
        retention: int = 1209600,
        capacity: int = DEFAULT_CAPACITY,
        batch_size: int = DEFAULT_BATCH_SIZE,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        prune_interval: float = DEFAULT_PRUNE_INTERVAL,
        gather: float = DEFAULT_GATHER,
    ) -> None:
        super().__init__(level=level)
        self.url = url
        self.role = role
        # Library records below warning are not worth a row (see the module docstring).
        self.other_levelno = max(logging.WARNING, level)
        self.retention = retention
        self.capacity = capacity
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.gather = gather
        self.prune_interval = prune_interval
        self.written = 0
        self.dropped_full = 0  # queue full (emit side)
        self.dropped_unwritable = 0  # the database refused a batch (drain side)
        self.pruned = 0
        self.failures = 0  # consecutive attempts that found the database unavailable
        self._closed = False
        self._engine = _engine_for(url)
        self._start_lock = threading.Lock()
        self._new_queue()

    # ----------------------------------------------------------------- the logging side

    @property
    def dropped(self) -> int:
        return self.dropped_full + self.dropped_unwritable

    def wants(self, record: logging.LogRecord) -> bool:
        name = record.name
        if any(_under(name, prefix) for prefix in NEVER_STORED):
            return False
        if _under(name, APP_LOGGER_PREFIX):
            return record.levelno >= self.level
        return record.levelno >= self.other_levelno

    def handle(self, record: logging.LogRecord) -> Any:
        # Checked before taking the handler's lock: the drain thread never waits on a logger.
        if getattr(_thread_state, "writing", False) or not self.wants(record):
            return False
        return super().handle(record)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if self._closed:
                return
            row: _Row = (
                dt.datetime.fromtimestamp(record.created, dt.UTC),
                canonical_levelno(record.levelno),
                level_name(record.levelno),
                _clean_text(record.name[:255]),
                _message_of(record),
                f"{self.role}:{record.process or os.getpid()}"[:64],
            )
            if self._thread is None:
                self._start_thread()
            self._queue.put_nowait(row)
        except queue.Full:
            self.dropped_full += 1
        except Exception:  # whatever happens here, the caller's logging call returns normally
            self.dropped_full += 1

    def flush(self) -> None:
        """logging's flush (``logging.shutdown`` calls it): ``drain`` with its default wait."""
        self.drain()

    def drain(self, timeout: float = SHUTDOWN_TIMEOUT) -> bool:
        """Wait (at most ``timeout``) until everything queued so far was attempted; whether it
        was.

        Only tests and shutdown call this; logging calls never wait for the database.
        """
        thread = self._thread
        if self._closed or thread is None or not thread.is_alive() or self.failures:
            return False  # nothing to wait for, or an outage that no flush should wait out
        marker = _FlushMarker()
        self._wake.set()  # before the marker: the thread clears it when it takes the marker
        try:
            self._queue.put(marker, timeout=timeout)
        except queue.Full:
            return False
        return marker.done.wait(timeout)

    def close(self, timeout: float = SHUTDOWN_TIMEOUT) -> None:
        """Write what is queued (at most ``timeout``), stop the thread, close the engine."""
        if not self._closed:
            self._closed = True
            self._stop.set()
            self._wake.set()
            try:
                self._queue.put_nowait(_STOP)  # wakes the thread up at once
            except queue.Full:
                pass
            thread = self._thread
            if thread is not None:
                thread.join(timeout)
            if thread is None or not thread.is_alive():
                self._engine.dispose()
        super().close()

    def is_running(self) -> bool:
        return not self._closed and (self._thread is None or self._thread.is_alive())

    # ----------------------------------------------------------------- the drain thread

    def _new_queue(self) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(self.capacity)
        self._stop = threading.Event()
        self._wake = threading.Event()  # ends the pause that lets a batch fill
        self._thread: threading.Thread | None = None

    def _start_thread(self) -> None:
        with self._start_lock:
            if self._thread is not None or self._closed:
                return
            thread = threading.Thread(target=self._run, name="elemta-db-log", daemon=True)
            thread.start()
            self._thread = thread

    def start(self) -> None:
        self._start_thread()

    def forget_parent_after_fork(self) -> None:
        """In a forked child: the parent's thread is not here, its connection is not ours."""
        self._start_lock = threading.Lock()
        self._new_queue()
        self._engine.dispose(close=False)

    def _run(self) -> None:
        _thread_state.writing = True
        batch: list[_Row] = []
        markers: list[_FlushMarker] = []
        next_prune = time.monotonic() + min(60.0, self.prune_interval)
        while True:
            if not batch:
                batch, markers = self._collect()
            if batch:
                outcome = self._write(batch, first_failure=self.failures == 0)
                if outcome == "retry" and not self._stop.is_set():
                    self.failures += 1
                    self._release(markers)  # a flush does not wait out an outage
                    markers = []
                    self._stop.wait(min(MAX_RETRY_PAUSE, 0.25 * 2 ** self.failures))
                    continue
                if outcome == "ok":
                    if self.failures:
                        log.warning("database logging resumed; %d record(s) dropped so far",
                                    self.dropped)
                    self.written += len(batch)
                    self.failures = 0
                else:
                    self.dropped_unwritable += len(batch)
                batch = []
            self._release(markers)
            markers = []
            if self._stop.is_set() and self._queue.empty():
                return
            if self.retention and self.prune_interval and time.monotonic() >= next_prune:
                self._prune()
                next_prune = time.monotonic() + self.prune_interval

    def _collect(self) -> tuple[list[_Row], list[_FlushMarker]]:
        rows: list[_Row] = []
        markers: list[_FlushMarker] = []
        try:
            item = self._queue.get(timeout=self.flush_interval)
        except queue.Empty:
            return rows, markers
        if self.gather and not isinstance(item, _FlushMarker) and item is not _STOP:
            # Let the batch fill for a moment: a busy listener logs a record per message, and
            # a transaction per record (checkout, ping, BEGIN, INSERT, COMMIT: ~0.7 ms of
            # this process's CPU, and a WAL flush) cost more than the rest of the log line.
            # ``drain`` and ``close`` cut the pause short.
            self._wake.wait(self.gather)
            self._wake.clear()
        while True:
            if isinstance(item, _FlushMarker):
                markers.append(item)
                self._wake.clear()
            elif item is not _STOP:
                rows.append(item)
            if len(rows) >= self.batch_size:
                break
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
        return rows, markers

    @staticmethod
    def _release(markers: list[_FlushMarker]) -> None:
        for marker in markers:
            marker.done.set()

    def _write(self, batch: list[_Row], *, first_failure: bool) -> str:
        """``ok``, ``retry`` (database unavailable: keep the batch) or ``drop``."""
        try:
            with self._engine.begin() as conn:
                if conn.dialect.name == "postgresql":
                    # The batch as one binary COPY (app/copyinsert.py), run on the raw psycopg
                    # cursor: SQLAlchemy's before_cursor_execute events do not see it.
                    _COPY.execute(conn, batch)
                else:
                    conn.execute(sa.insert(_COPY.table),
                                 [dict(zip(_COPY.columns, row, strict=True)) for row in batch])
            return "ok"
        except Exception as exc:
            reason = _short_reason(exc)
            if is_database_unavailable(exc) or is_transient_conflict(exc):  # try again later
                if first_failure:
                    log.warning("database logging paused, database unavailable: %s", reason)
                return "retry"
            log.warning("dropped %d log record(s) the database refused: %s", len(batch), reason)
            return "drop"

    def _prune(self) -> None:
        try:
            with self._engine.begin() as conn:
                self.pruned += prune_system_logs(conn, self.retention)
        except Exception as exc:  # the next round tries again
            log.info("pruning system logs failed: %s", _short_reason(exc))


def _short_reason(exc: BaseException) -> str:
    """The driver's first line, without the SQL and parameters SQLAlchemy appends."""
    origin = getattr(exc, "orig", None) or exc
    text = str(origin).strip().splitlines()
    return f"{type(origin).__name__}: {text[0] if text else ''}"


# --------------------------------------------------------------------------- per process

_installed: DatabaseLogHandler | None = None
_install_lock = threading.Lock()
_atexit_registered = False


def database_logging_enabled(app: Flask) -> bool:
    """On by default; off by default under TESTING (app/config.py resolves the default)."""
    return bool(app.config["LOG_TO_DATABASE"])


def configured_levelno(app: Flask) -> int:
    return levelno_of(app.config["LOG_LEVEL"])  # checked against the same names at start


def install_database_logging(app: Flask) -> DatabaseLogHandler | None:
    """Store this process's log records in the app's database (once per process)."""
    global _installed, _atexit_registered
    if not database_logging_enabled(app):
        return None
    url = app.config["SQLALCHEMY_DATABASE_URI"]
    options = {
        "level": configured_levelno(app),
        "role": detect_role(),
        "retention": app.config["LOG_RETENTION"],
        "capacity": app.config["LOG_QUEUE_SIZE"],
        "flush_interval": app.config["LOG_FLUSH_INTERVAL"],
        "prune_interval": app.config["LOG_PRUNE_INTERVAL"],
    }
    with _install_lock:
        current = _installed
        if current is not None and current.url == url and current.is_running():
            return current
        if current is not None:
            _remove(current)
        handler = DatabaseLogHandler(url, **options)
        logging.getLogger().addHandler(handler)
        handler.start()
        _installed = handler
        if not _atexit_registered:
            atexit.register(shutdown_database_logging)
            _atexit_registered = True
        return handler


def installed_handler() -> DatabaseLogHandler | None:
    return _installed


def set_process_role(role: str) -> None:
    """Name this process in stored records (``worker:5678``) when detection is not enough."""
    if _installed is not None:
        _installed.role = role


def shutdown_database_logging(timeout: float = SHUTDOWN_TIMEOUT) -> None:
    """Flush and remove this process's handler (atexit; tests)."""
    global _installed
    with _install_lock:
        current, _installed = _installed, None
        if current is not None:
            _remove(current, timeout)


def _remove(handler: DatabaseLogHandler, timeout: float = SHUTDOWN_TIMEOUT) -> None:
    logging.getLogger().removeHandler(handler)
    handler.close(timeout)  # writes what is queued first


def _after_fork_in_child() -> None:
    global _install_lock
    _install_lock = threading.Lock()
    if _installed is not None:
        _installed.forget_parent_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
