"""Logs of every Elemta process: on stdout for the services (API, worker, listener), on stderr
for other CLI commands (their stdout is data).

``ELEMTA_LOG_FORMAT`` chooses the shape: ``json`` (one object per line, for journald, jq and
log shippers), ``text`` (one human line per record) or ``auto`` (the default): text when the
stream is a terminal, JSON otherwise (a pipe, a file, systemd). On a terminal in ``auto`` an
interactive CLI command (``flask apikey create``, ``flask logs prune`` ...) shows only warnings
and errors: its own output is what the operator asked for. The database handler still stores
every record at ``ELEMTA_LOG_LEVEL``.

One JSON line per record: ``timestamp``, ``level``, ``logger``, ``message``, ``role``, ``pid`` and,
inside an HTTP request, ``request_id`` (the response's ``X-Request-ID``). gunicorn's own logs go
through the same handler (``logconfig_dict`` in gunicorn.conf.py); its access log lines carry
method, path, status, duration and the request id as separate fields.

Only the handler added here is managed here: other handlers (the database handler of
``app.logs``, pytest's capture) are left alone.

The SMTP listener writes its lines on a thread of its own (``stdout_on_own_thread``): its event
loop only queues each record, so a slow stdout (a full pipe, journald) never stalls a session.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import json
import logging
import os
import queue
import re
import sys
import threading
from collections.abc import Iterator
from logging.handlers import QueueHandler
from typing import Any

from flask import Flask, g, has_request_context
from flask.logging import default_handler
from pythonjsonlogger.json import JsonEncoder
from pythonjsonlogger.json import JsonFormatter as _JsonFormatter

ROLE_ENV = "ELEMTA_PROCESS_ROLE"
# Lines queued for the listener's writer thread before a logging call waits for room
# (``stdout_on_own_thread``): seconds of mail at full rate, a few MB of records.
LANE_CAPACITY = 10_000
# Lines the writer thread writes (and flushes) at most at once: all those waiting, up to this.
LANE_BATCH = 256
# Seconds the writer lets lines gather after the first one before it writes them (cut short
# when the listener stops, skipped while the lane is full): at a few hundred lines a second
# it then wakes once per gather, not once per line (docs/PERFORMANCE.md, "Intake, the
# listener's wake-ups and the batch's round trips"). A line reaches stdout at most this much
# later (plus the write); its timestamp is the call's.
LANE_GATHER = 0.01
FORMAT_ENV = "ELEMTA_LOG_FORMAT"
FORMATS = ("auto", "json", "text")
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
          "warning": logging.WARNING, "error": logging.ERROR, "fatal": logging.CRITICAL,
          "critical": logging.CRITICAL}
# WebSocket clients may send their API key as ?api_key=: it must never reach a log line.
_SECRET_QUERY = re.compile(r"(?i)((?:^|&)api_key=)[^&]*")
# gunicorn access-log atoms worth a field of their own.
_ACCESS_FIELDS = {"h": "remote_addr", "{x-forwarded-for}i": "forwarded_for", "m": "method",
                  "U": "path", "q": "query", "s": "status", "B": "bytes", "a": "user_agent",
                  "{x-request-id}o": "request_id"}


def detect_role(argv: list[str] | None = None) -> str:
    """``api`` under gunicorn, ``worker``/``smtpd`` for those commands, ``webhooks`` for the
    webhook dispatcher, else ``cli``."""
    given = os.environ.get(ROLE_ENV)
    if given:
        return given
    argv = sys.argv if argv is None else argv
    program = os.path.basename(argv[0]) if argv else ""
    if "gunicorn" in program:
        return "api"
    commands = [arg for arg in argv[1:] if not arg.startswith("-")]
    if commands and commands[0] in ("worker", "smtpd"):
        return commands[0]
    if commands[:2] == ["webhook", "dispatch"]:
        return "webhooks"
    return "cli"


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` (None outside a request) to every record passing the handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = g.get("request_id") if has_request_context() else None
        return True


class JsonFormatter(_JsonFormatter):
    """python-json-logger with Elemta's field names; understands gunicorn access records."""

    def __init__(self, role: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("reserved_attrs", _RESERVED)
        super().__init__(**kwargs)
        self.role = role or detect_role()
        # The common record (no extra= fields, no exception or stack, a text message) takes a
        # short path to the same line: python-json-logger's format, add_fields and
        # merge_record_extra cost ~3x the line itself (the listener writes one per message).
        self._plain_keys = frozenset(self._skip_fields)
        self._fast_encoder = (
            JsonEncoder(ensure_ascii=self.json_ensure_ascii)
            if (self.json_encoder is JsonEncoder and self.json_default is None
                and self.json_indent is None and self.json_serializer is json.dumps
                and not (self.defaults or self.static_fields or self.rename_fields
                         or self.timestamp or self.prefix)
                and set(self._required_fields) <= {"message"})
            else None)

    def format(self, record: logging.LogRecord) -> str:
        encoder = self._fast_encoder
        if (encoder is None or record.exc_info or record.exc_text or record.stack_info
                or isinstance(record.msg, dict) or record.name == "gunicorn.access"
                or not record.__dict__.keys() <= self._plain_keys):
            return super().format(record)
        # What python-json-logger and add_fields below make of such a record, field for
        # field and in the same order (tests/test_logging_setup.py compares the two).
        record.message = message = record.getMessage()
        return encoder.encode({
            "timestamp": (dt.datetime.fromtimestamp(record.created, dt.UTC)
                          .isoformat(timespec="milliseconds").replace("+00:00", "Z")),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": message,
            "role": self.role,
            "pid": record.process,
            "request_id": getattr(record, "request_id", None),
        })

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord,
                   message_dict: dict[str, Any]) -> None:
        extras: dict[str, Any] = {}
        super().add_fields(extras, record, message_dict)  # extra= fields of the call
        log_data["timestamp"] = (dt.datetime.fromtimestamp(record.created, dt.UTC)
                                 .isoformat(timespec="milliseconds").replace("+00:00", "Z"))
        log_data["level"] = record.levelname.lower()
        log_data["logger"] = record.name
        log_data["message"] = record.getMessage()
        log_data["role"] = self.role
        log_data["pid"] = record.process
        log_data["request_id"] = getattr(record, "request_id", None)
        if record.name == "gunicorn.access" and isinstance(record.args, dict):
            self._access_fields(log_data, record.args)
        for key, value in extras.items():
            log_data.setdefault(key, value)

    @staticmethod
    def _access_fields(log_data: dict[str, Any], atoms: Any) -> None:
        for atom, field in _ACCESS_FIELDS.items():
            value = atoms[atom]
            log_data[field] = None if value == "-" else value
        if log_data.get("query"):
            log_data["query"] = _SECRET_QUERY.sub(r"\1[redacted]", log_data["query"])
        for field in ("status", "bytes"):
            try:
                log_data[field] = int(log_data[field])
            except (TypeError, ValueError):
                pass
        try:
            log_data["duration_ms"] = round(int(atoms["D"]) / 1000, 3)
        except (TypeError, ValueError):
            log_data["duration_ms"] = None
        log_data["message"] = f'{atoms["m"]} {atoms["U"]} {atoms["s"]}'


# Everything LogRecord carries that is not an explicit extra= field stays out of the line.
_RESERVED = [
    "args", "asctime", "created", "exc_info", "exc_text", "filename", "funcName", "levelname",
    "levelno", "lineno", "module", "msecs", "message", "msg", "name", "pathname", "process",
    "processName", "relativeCreated", "stack_info", "thread", "threadName", "taskName",
    "request_id",
]


class TextFormatter(logging.Formatter):
    """One human line: ``15:04:05 worker warning elemta.delivery: message [req-id]``."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        stamp = dt.datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        line = f"{stamp} {self.role} {record.levelname.lower()} {record.name}: "
        line += record.getMessage()
        request_id = getattr(record, "request_id", None)
        if request_id:
            line += f" [{request_id}]"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class StdoutJsonHandler(logging.StreamHandler):
    """Log lines to the *current* ``sys.stdout`` (test runners swap it between tests).

    CLI commands log to stderr instead: their stdout is data (``flask apikey create`` prints
    the key alone, ``--json`` output must parse), and ``KEY=$(flask apikey create ...)`` works.
    JSON or text per ``ELEMTA_LOG_FORMAT``, decided per record: the stream may change.
    """

    def __init__(self, role: str | None = None, log_format: str | None = None) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter(role=role))
        self.addFilter(RequestIdFilter())
        given = (log_format or os.environ.get(FORMAT_ENV) or "auto").strip().lower()
        self.log_format = given if given in FORMATS else "auto"
        # (stream, is it a terminal): asked once per stream object, not per record (an
        # ioctl that lets go of the GIL, for the listener's line of every accepted message).
        self._terminal: tuple[Any, bool] | None = None

    @property
    def role(self) -> str:
        return str(getattr(self.formatter, "role", "cli"))

    @property
    def stream(self) -> Any:
        return sys.stderr if self.role == "cli" else sys.stdout

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass

    def _on_terminal(self) -> bool:
        stream = self.stream
        known = self._terminal
        if known is None or known[0] is not stream:
            known = self._terminal = (stream, _is_terminal(stream))
        return known[1]

    def _as_text(self) -> bool:
        if self.log_format == "auto":
            return self._on_terminal()
        return self.log_format == "text"

    def filter(self, record: logging.LogRecord) -> bool:
        # An operator typing a command on a terminal wants its answer, not its info chatter.
        if (record.levelno < logging.WARNING and self.role == "cli"
                and self.log_format == "auto" and self._on_terminal()):
            return False
        return bool(super().filter(record))

    def format(self, record: logging.LogRecord) -> str:
        if self._as_text():
            return TextFormatter(self.role).format(record)
        return super().format(record)


class StdoutLaneHandler(QueueHandler):
    """Stands in for a ``StdoutJsonHandler`` (``target``) on the root logger: queues each record
    for the thread that writes them (``stdout_on_own_thread``).

    The stdlib's ``prepare`` formats the line here and drops ``exc_info``, ``args`` and the
    stack; the thread would then wrap that text as the message of a second line. This one only
    does what must happen on the calling thread: the request id is read (``RequestIdFilter``:
    Flask's ``g`` belongs to this thread) and the message merged with its arguments (they may
    change once the call returns). Everything else the formatter reads (the exception, the
    stack, the ``extra=`` fields) stays on the record, so the thread writes the same line, to
    the byte, that the target would have written here.
    """

    def __init__(self, lane: queue.Queue[Any], target: StdoutJsonHandler) -> None:
        super().__init__(lane)
        self.lane = lane
        self.target = target
        self.addFilter(RequestIdFilter())

    def enqueue(self, record: logging.LogRecord) -> None:
        # Waits when LANE_CAPACITY lines are behind (stdout stuck: a paused terminal, a dead
        # journald): the process then waits on its log as before, but no line is dropped and
        # memory stays bounded. The stdlib's put_nowait would drop the line with an error.
        self.lane.put(record)

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # A copy: the other handlers (the database's, pytest's) see the record as it was.
        record = copy.copy(record)
        # Merged only for the usual %-style tuple: a dict message is python-json-logger's
        # fields, dict arguments are gunicorn's access atoms; both stay as they are.
        if record.args and isinstance(record.args, tuple) and not isinstance(record.msg, dict):
            record.msg = record.getMessage()
            record.args = None
        return record


_END = object()  # the lane's end marker: the writer writes what came before it, then ends


class _LaneWriter:
    """The thread writing the lane's lines.

    After the first line it lets more gather for ``LANE_GATHER`` seconds, then every line
    waiting goes out in one ``write`` and one ``flush`` (at most ``LANE_BATCH`` lines): a wake-up
    of this thread (and its turn at the GIL) and a write per accepted message's ``Queued`` line
    become one per gather. The bytes and their order are those of one ``handle`` per record.
    Its own thread rather than the stdlib's ``QueueListener``, whose loop handles one record
    at a time and whose end marker is private; ``stop``'s marker waits for room, as records do
    (a lane full of lines is written out, then the thread ends)."""

    def __init__(self, lane: queue.Queue[Any], target: StdoutJsonHandler) -> None:
        self.lane = lane
        self.target = target
        self._stopping = threading.Event()  # ends the gather pause at once
        self._thread = threading.Thread(target=self._run, name="elemta-stdout-lane",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Write every line queued before this call, then end the thread."""
        self._stopping.set()
        self.lane.put(_END)
        self._thread.join()

    def _run(self) -> None:
        lane = self.lane
        while True:
            batch = [lane.get()]
            if batch[0] is not _END and not lane.full():
                self._stopping.wait(LANE_GATHER)
            while len(batch) < LANE_BATCH:
                try:
                    batch.append(lane.get_nowait())
                except queue.Empty:
                    break
            self._write(batch)
            for _ in batch:
                lane.task_done()
            if any(item is _END for item in batch):
                return  # lines queued after the marker: written by stdout_on_own_thread

    def _write(self, batch: list[Any]) -> None:
        """What ``target.handle`` does for each record (level, filters, format), then the lines
        in one write and one flush under the handler's lock."""
        target = self.target
        lines: list[str] = []
        last: logging.LogRecord | None = None
        for record in batch:
            if record is _END:
                continue
            if record.levelno < target.level or not target.filter(record):
                continue
            try:
                lines.append(target.format(record) + target.terminator)
                last = record
            except RecursionError:
                raise
            except Exception:
                target.handleError(record)
        if last is None:
            return
        target.acquire()
        try:
            stream = target.stream
            stream.write("".join(lines))
            stream.flush()
        except RecursionError:
            raise
        except Exception:
            target.handleError(last)
        finally:
            target.release()


@contextlib.contextmanager
def stdout_on_own_thread() -> Iterator[None]:
    """While inside: this process's stdout lines are written by a thread of their own (one
    ``_LaneWriter``) instead of by the thread that logs; on the way out every queued line is
    written and the ``StdoutJsonHandler`` takes its place back, so what is logged later (the
    last lines of a stopping process) is written directly.

    For the SMTP listener's processes (app/smtpd/server.py, processes.py): their event loop
    must not wait on a write to stdout. Not for a process that forks while inside (a thread
    may hold a lock the child would inherit held). Lines keep their order: one queue, one
    writer; each carries the time it was logged at, not written at.
    """
    root = logging.getLogger()
    targets = [h for h in root.handlers if isinstance(h, StdoutJsonHandler)]
    if not targets:  # no stdout handler here (a test's own set-up): nothing to move
        yield
        return
    target = targets[0]
    lane: queue.Queue[Any] = queue.Queue(LANE_CAPACITY)
    handler = StdoutLaneHandler(lane, target)
    writer = _LaneWriter(lane, target)
    writer.start()  # before the swap: no record is queued without a thread to write it
    # Swapped in place, one atomic list assignment: no record is written twice or missed
    # (add-then-remove or remove-then-add would), and the handlers keep their order.
    root.handlers[root.handlers.index(target)] = handler
    try:
        yield
    finally:
        if handler in root.handlers:
            root.handlers[root.handlers.index(handler)] = target
        writer.stop()  # writes what is queued, then its thread ends
        # A record queued by another thread just after stop()'s end marker: written here.
        with contextlib.suppress(queue.Empty):
            while True:
                target.handle(lane.get_nowait())


def _stdout_handlers(root: logging.Logger) -> list[StdoutJsonHandler]:
    """The process's ``StdoutJsonHandler``, on the root logger or behind its lane."""
    return [h.target if isinstance(h, StdoutLaneHandler) else h for h in root.handlers
            if isinstance(h, (StdoutJsonHandler, StdoutLaneHandler))]


def configure_logging(app: Flask, role: str | None = None) -> None:
    """Send every record of this process as a log line to stdout, once per process."""
    role = role or detect_role()
    level = LEVELS.get(str(app.config.get("LOG_LEVEL", "info")).lower(), logging.INFO)
    log_format = str(app.config.get("LOG_FORMAT", "auto")).lower()
    root = logging.getLogger()
    ours = _stdout_handlers(root)
    if not ours:
        root.addHandler(StdoutJsonHandler(role, log_format))
    else:
        for handler in ours:
            if isinstance(handler.formatter, JsonFormatter):
                handler.formatter.role = role
            handler.log_format = log_format
    root.setLevel(level)
    # alembic announces each of its plugins at INFO when it is imported, which create_app does
    # after this (for the API only): chatter, and on stdout it would precede a command's --json.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    # Flask's own stderr handler would print every app.logger record a second time.
    app.logger.removeHandler(default_handler)
