"""JSON log lines on stdout for every process, with the request id inside a request."""

from __future__ import annotations

import json
import logging

import pytest
from flask import Flask

from app.logging_setup import StdoutJsonHandler, detect_role


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
