"""JSON logs for every Elemta process: on stdout for the services (API, worker, listener), on
stderr for other CLI commands (their stdout is data).

One line per record: ``timestamp``, ``level``, ``logger``, ``message``, ``role``, ``pid`` and,
inside an HTTP request, ``request_id`` (the response's ``X-Request-ID``). gunicorn's own logs go
through the same handler (``logconfig_dict`` in gunicorn.conf.py); its access log lines carry
method, path, status, duration and the request id as separate fields.

Only the handler added here is managed here: other handlers (the database handler of
``app.logs``, pytest's capture) are left alone.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import sys
from typing import Any

from flask import Flask, g, has_request_context
from flask.logging import default_handler
from pythonjsonlogger.json import JsonFormatter as _JsonFormatter

ROLE_ENV = "ELEMTA_PROCESS_ROLE"
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
    """``api`` under gunicorn, ``worker``/``smtpd`` for those commands, else ``cli``."""
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

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord,
                   message_dict: dict[str, Any]) -> None:
        extras: dict[str, Any] = {}
        super().add_fields(extras, record, message_dict)  # extra= fields of the call
        log_data["timestamp"] = (dt.datetime.fromtimestamp(record.created, dt.timezone.utc)
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


class StdoutJsonHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """JSON lines to the *current* ``sys.stdout`` (test runners swap it between tests).

    CLI commands log to stderr instead: their stdout is data (``flask apikey create`` prints
    the key alone, ``--json`` output must parse), and ``KEY=$(flask apikey create ...)`` works.
    """

    def __init__(self, role: str | None = None) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter(role=role))
        self.addFilter(RequestIdFilter())

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr if getattr(self.formatter, "role", None) == "cli" else sys.stdout

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def configure_logging(app: Flask, role: str | None = None) -> None:
    """Send every record of this process as a JSON line to stdout, once per process."""
    role = role or detect_role()
    level = LEVELS.get(str(app.config.get("LOG_LEVEL", "info")).lower(), logging.INFO)
    root = logging.getLogger()
    ours = [h for h in root.handlers if isinstance(h, StdoutJsonHandler)]
    if not ours:
        root.addHandler(StdoutJsonHandler(role))
    else:
        for handler in ours:
            handler.formatter.role = role  # type: ignore[union-attr]
    root.setLevel(level)
    # Flask's own stderr handler would print every app.logger record a second time.
    app.logger.removeHandler(default_handler)
