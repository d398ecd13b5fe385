"""JSON log lines on stdout for every process, with the request id inside a request."""

from __future__ import annotations

import io
import json
import logging
import os
import pty
import re
import subprocess
import sys

import pytest
from flask import Flask

from app import logging_setup
from app.logging_setup import StdoutJsonHandler, detect_role

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lines(captured) -> list[dict]:
    # Tests run as the "cli" role, which logs to stderr (its stdout is data); services use stdout.
    text = captured.out + captured.err
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_a_record_logged_in_a_request_carries_its_request_id(app: Flask, capsys) -> None:
    @app.get("/test-logging")
    def _logs_something() -> dict:
        logging.getLogger("elemta.test").warning("inside %s", "a request", extra={"detail": 7})
        return {}

    response = app.test_client().get("/test-logging", headers={"X-Request-ID": "req-42"})
    assert response.headers["X-Request-ID"] == "req-42"
    lines = [line for line in _lines(capsys.readouterr()) if line["logger"] == "elemta.test"]
    assert len(lines) == 1
    line = lines[0]
    assert line["request_id"] == "req-42"
    assert line["message"] == "inside a request"
    assert line["level"] == "warning"
    assert line["detail"] == 7
    assert line["timestamp"].endswith("Z")
    assert {"role", "pid"} <= set(line)


def test_outside_a_request_the_request_id_is_null(app: Flask, capsys) -> None:
    logging.getLogger("elemta.test").error("no request here")
    lines = [line for line in _lines(capsys.readouterr()) if line["logger"] == "elemta.test"]
    assert lines and lines[0]["request_id"] is None


def test_one_stdout_handler_however_many_apps(make_app) -> None:
    make_app()
    make_app()
    ours = [h for h in logging.getLogger().handlers if isinstance(h, StdoutJsonHandler)]
    assert len(ours) == 1


@pytest.mark.parametrize(("argv", "role"), [
    (["/srv/.venv/bin/gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"], "api"),
    (["/srv/.venv/bin/flask", "worker", "--once"], "worker"),
    (["/srv/.venv/bin/flask", "smtpd"], "smtpd"),
    (["/srv/.venv/bin/flask", "queue", "stats"], "cli"),
    (["/srv/.venv/bin/flask", "webhook", "dispatch"], "webhooks"),
    (["/srv/.venv/bin/flask", "webhook", "list"], "cli"),
])
def test_role_follows_the_command(argv: list[str], role: str, monkeypatch) -> None:
    monkeypatch.delenv("ELEMTA_PROCESS_ROLE", raising=False)
    assert detect_role(argv) == role


@pytest.mark.parametrize(("role", "stream"), [("api", "out"), ("worker", "out"), ("smtpd", "out"),
                                              ("cli", "err")])
def test_services_log_to_stdout_cli_commands_to_stderr(role: str, stream: str, capsys) -> None:
    handler = StdoutJsonHandler(role)
    handler.handle(logging.LogRecord("elemta.test", logging.INFO, __file__, 1, "hello", (), None))
    captured = capsys.readouterr()
    line = json.loads(getattr(captured, stream))
    assert line["role"] == role and line["message"] == "hello"
    assert getattr(captured, "err" if stream == "out" else "out") == ""


def _record(level: int, message: str) -> logging.LogRecord:
    return logging.LogRecord("elemta.test", level, __file__, 1, message, (), None)


@pytest.fixture
def on_a_terminal(monkeypatch) -> None:
    monkeypatch.setattr(logging_setup, "_is_terminal", lambda _stream: True)


def test_auto_is_json_on_a_pipe(capsys) -> None:
    StdoutJsonHandler("worker", "auto").handle(_record(logging.INFO, "piped"))
    assert json.loads(capsys.readouterr().out)["message"] == "piped"


def test_the_terminal_is_asked_once_per_stream(monkeypatch, capsys) -> None:
    """Asked once for a stream, again when the stream is another (test runners swap it)."""
    asked = []
    monkeypatch.setattr(logging_setup, "_is_terminal",
                        lambda stream: asked.append(stream) or False)
    handler = StdoutJsonHandler("worker", "auto")
    for n in range(3):
        handler.handle(_record(logging.INFO, f"line {n}"))
    first = sys.stdout
    assert asked == [first]
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    handler.handle(_record(logging.INFO, "elsewhere"))
    assert asked == [first, sys.stdout]
    assert json.loads(sys.stdout.getvalue())["message"] == "elsewhere"
    assert [json.loads(line)["message"] for line in capsys.readouterr().out.splitlines()] == \
        ["line 0", "line 1", "line 2"]


def test_auto_is_text_on_a_terminal(capsys, on_a_terminal) -> None:
    StdoutJsonHandler("worker", "auto").handle(_record(logging.INFO, "for a person"))
    out = capsys.readouterr().out
    assert not out.startswith("{")
    assert re.fullmatch(r"\d\d:\d\d:\d\d worker info elemta\.test: for a person\n", out)


def test_an_interactive_cli_command_shows_warnings_only(capsys, on_a_terminal) -> None:
    handler = StdoutJsonHandler("cli", "auto")
    handler.handle(_record(logging.INFO, "chatter"))
    handler.handle(_record(logging.WARNING, "worth reading"))
    err = capsys.readouterr().err
    assert "chatter" not in err
    assert err.endswith("cli warning elemta.test: worth reading\n")


@pytest.mark.parametrize(("log_format", "shape"), [("json", "json"), ("text", "text")])
def test_an_explicit_format_wins_everywhere(log_format, shape, capsys, on_a_terminal) -> None:
    handler = StdoutJsonHandler("cli", log_format)
    handler.handle(_record(logging.INFO, "asked for"))
    err = capsys.readouterr().err
    assert "asked for" in err  # nothing filtered when the operator chose the format
    assert err.startswith("{") == (shape == "json")


def test_the_setting_reaches_the_handler(make_app, on_a_terminal, capsys) -> None:
    make_app(log_format="json")
    logging.getLogger("elemta.test").warning("configured")
    assert json.loads(capsys.readouterr().err.splitlines()[-1])["message"] == "configured"
    make_app(log_format="text")
    logging.getLogger("elemta.test").warning("configured")
    assert capsys.readouterr().err.splitlines()[-1].endswith("warning elemta.test: configured")


def test_a_cli_command_on_a_real_terminal_prints_no_log_lines(database_url) -> None:
    """``flask logs prune`` with stderr on a pseudo-terminal: its answer, no JSON info line."""
    main_fd, terminal_fd = pty.openpty()
    env = dict(os.environ, ELEMTA_DATABASE_URL=database_url, FLASK_APP="wsgi.py")
    env.pop("ELEMTA_LOG_FORMAT", None)
    try:
        done = subprocess.run([os.path.join(os.path.dirname(sys.executable), "flask"), "logs",
                               "prune"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=terminal_fd, timeout=120, text=True)
        os.close(terminal_fd)
        terminal = b""
        while True:
            try:
                chunk = os.read(main_fd, 4096)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not chunk:
                break
            terminal += chunk
    finally:
        os.close(main_fd)
    assert done.returncode == 0
    assert done.stdout.strip().endswith("record(s) pruned")
    assert b"pruned" not in terminal and b"{" not in terminal


def _records() -> list[logging.LogRecord]:
    """Records of every shape a process logs: plain, %-args, non-ASCII, a request id, extra=
    fields, an exception, a stack, a dict message, gunicorn's access record."""
    def make(name="elemta.smtpd", level=logging.INFO, msg="Queued %s for %d recipient(s)",
             args=("4f1c9a", 2), exc=None, **attrs):
        record = logging.LogRecord(name, level, __file__, 10, msg, args, exc)
        for key, value in attrs.items():
            setattr(record, key, value)
        return record

    try:
        raise ValueError("boom")
    except ValueError:
        exc = sys.exc_info()
    return [
        make(),
        make(msg="no args", args=()),
        make(msg="caf\u00e9 \u2603 \"quoted\" \\ \x01 <>&", args=(), request_id="req-\u00e9"),
        make(level=logging.WARNING, request_id="req-42"),
        make(level=25, name="aiosmtpd.custom"),
        make(detail=7, request_id=None),
        make(_private="kept out"),
        make(exc=exc),
        make(stack_info="Stack (most recent call last):\n  here"),
        make(msg={"event": "dict message"}, args=()),
        make(name="gunicorn.access", msg="%(h)s", args=({
            "h": "127.0.0.1", "{x-forwarded-for}i": "-", "m": "GET", "U": "/api", "q": "",
            "s": "200", "B": "12", "a": "curl", "{x-request-id}o": "r1", "D": "1500"},)),
    ]


@pytest.mark.parametrize("index", range(11))
def test_the_short_path_writes_python_json_loggers_line(index: int) -> None:
    """``JsonFormatter.format`` takes a short path for plain records: the line is the one
    python-json-logger's own ``format`` (with our ``add_fields``) makes, byte for byte."""
    formatter = logging_setup.JsonFormatter(role="smtpd")
    assert formatter._fast_encoder is not None
    ours, theirs = _records()[index], _records()[index]
    theirs.created = ours.created = 1764800000.1239995  # rounds to .124000 in datetime
    expected = logging_setup._JsonFormatter.format(formatter, theirs)
    assert formatter.format(ours) == expected
    assert ours.message == theirs.message
