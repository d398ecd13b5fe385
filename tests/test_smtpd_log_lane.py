"""The listener's stdout lines, written by a thread of their own (``stdout_on_own_thread``):
the same lines as when the logging thread wrote them, and none lost when the listener stops.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import signal
import smtplib
import sys
from pathlib import Path

import pytest
from flask import Flask

from app import logging_setup
from app.logging_setup import (
    StdoutJsonHandler,
    StdoutLaneHandler,
    configure_logging,
    stdout_on_own_thread,
)
from tests.smtpd_helpers import crlf, email_message, queued_id
from tests.test_smtpd_processes import PATIENCE, smtpd

MESSAGES = 12


def _ours() -> list[logging.Handler]:
    """The stdout handlers on the root logger (pytest adds its own during a test)."""
    return [h for h in logging.getLogger().handlers
            if isinstance(h, (StdoutJsonHandler, StdoutLaneHandler))]


def _records() -> list[logging.LogRecord]:
    """One record of each shape the listener logs, or could."""
    logger = logging.getLogger("elemta.smtpd")
    made = [
        logger.makeRecord(logger.name, logging.INFO, __file__, 10,
                          "Queued %s from %s: %s -> %d recipient(s), %d bytes received",
                          ("ABC123", "127.0.0.1", "<a@example.com>", 2, 1024), None),
        logger.makeRecord(logger.name, logging.WARNING, __file__, 11, "with extra %s", ("x",),
                          None, extra={"client": "192.0.2.1", "count": 3}),
        logger.makeRecord(logger.name, logging.INFO, __file__, 12, {"event": "dict message"},
                          (), None),
        logger.makeRecord(logger.name, logging.INFO, __file__, 13, "100% literal", (), None),
    ]
    try:
        raise ValueError("storage failed")
    except ValueError:
        made.append(logger.makeRecord(logger.name, logging.ERROR, __file__, 14,
                                      "Acceptance failed for %s", ("ABC124",), sys.exc_info()))
    made.append(logger.makeRecord(logger.name, logging.WARNING, __file__, 15, "with a stack",
                                  (), None, sinfo="Stack (most recent call last):\n  here"))
    return made


@pytest.fixture
def lone_handler(monkeypatch, caplog) -> StdoutJsonHandler:
    """The listener's stdout handler, alone on the root logger for this test, at info."""
    caplog.set_level(logging.INFO)
    handler = StdoutJsonHandler("smtpd", "json")
    monkeypatch.setattr(logging.getLogger(), "handlers", [handler])
    return handler


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_the_thread_writes_the_lines_the_handler_wrote(lone_handler, log_format, capsys):
    lone_handler.log_format = log_format
    records = _records()
    expected = "".join(lone_handler.format(copy.copy(r)) + "\n" for r in records)
    with stdout_on_own_thread():
        assert [type(h) for h in _ours()] == [StdoutLaneHandler]
        for record in records:
            logging.getLogger().handle(record)
    assert capsys.readouterr().out == expected
    assert _ours() == [lone_handler]
    if log_format == "json":
        error = json.loads(expected.splitlines()[4])
        assert error["message"] == "Acceptance failed for ABC124"
        assert 'raise ValueError("storage failed")' in error["exc_info"]


def test_the_message_is_the_one_at_the_call(lone_handler, capsys):
    changing = ["first"]
    with stdout_on_own_thread():
        logging.getLogger("elemta.smtpd").info("recipients %s", changing)
        changing[0] = "changed after the call"
    assert json.loads(capsys.readouterr().out)["message"] == "recipients ['first']"


def test_a_full_lane_makes_the_caller_wait_never_drops_a_line(lone_handler, monkeypatch,
                                                             capsys):
    monkeypatch.setattr(logging_setup, "LANE_CAPACITY", 1)
    with stdout_on_own_thread():
        for number in range(200):
            logging.getLogger("elemta.smtpd").info("line %d", number)
    captured = capsys.readouterr()
    assert [json.loads(line)["message"] for line in captured.out.splitlines()] == [
        f"line {number}" for number in range(200)]
    assert "Logging error" not in captured.err


def test_other_handlers_see_the_record_untouched(lone_handler, monkeypatch, capsys):
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    monkeypatch.setattr(logging.getLogger(), "handlers", [lone_handler, Keep()])
    with stdout_on_own_thread():
        logging.getLogger("elemta.smtpd").info("a %s", "b")
    assert seen[0].msg == "a %s" and seen[0].args == ("b",)
    assert json.loads(capsys.readouterr().out)["message"] == "a b"


def test_configuring_again_inside_adds_no_second_handler(lone_handler, app: Flask, capsys):
    with stdout_on_own_thread():
        configure_logging(app, role="smtpd")
        handlers = _ours()
    assert [type(h) for h in handlers] == [StdoutLaneHandler]
    assert _ours() == [lone_handler]


class _CountingStdout(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_the_lines_waiting_go_out_in_one_write_the_same_bytes(lone_handler, log_format,
                                                             monkeypatch):
    """Lines queued while the writer is held up (here: by the handler's lock) are written
    together, the same bytes in the same order as one handle() per record."""
    lone_handler.log_format = log_format
    stdout = _CountingStdout()
    monkeypatch.setattr(sys, "stdout", stdout)
    records = [r for _ in range(20) for r in _records()]
    expected = "".join(lone_handler.format(copy.copy(r)) + "\n" for r in records)
    with stdout_on_own_thread():
        lone_handler.acquire()  # the writer formats what it took, then waits here
        try:
            for record in records:
                logging.getLogger().handle(record)
        finally:
            lone_handler.release()
    assert stdout.getvalue() == expected
    assert 1 <= stdout.writes <= 2  # what it took before the lock, then all the others
    assert _ours() == [lone_handler]


# ------------------------------------------------------------- the real listener, stopped


def _send(port: int, count: int) -> list[str]:
    ids = []
    with smtplib.SMTP("127.0.0.1", port, timeout=PATIENCE) as client:
        client.ehlo("client.example")
        for _ in range(count):
            client.mail("alice@example.com")
            client.rcpt("bob@example.net")
            code, reply = client.data(crlf(email_message()))
            assert code == 250, reply
            ids.append(queued_id(reply))
    return ids


@pytest.mark.parametrize(("processes", "signum"), [(1, signal.SIGTERM), (1, signal.SIGINT),
                                                   (2, signal.SIGTERM)])
def test_every_line_is_written_before_the_listener_exits(database_url: str, tmp_path: Path,
                                                         processes: int, signum: int):
    with smtpd(database_url, tmp_path, smtpd_processes=processes, log_format="json") as server:
        ids = _send(server.port, MESSAGES)
        assert server.stop(signum) == 0
        text = server.text
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    queued = [line for line in lines if line["message"].startswith("Queued ")]
    assert sorted(line["message"].split()[1] for line in queued) == sorted(ids)
    for line in queued:
        assert list(line) == ["timestamp", "level", "logger", "message", "role", "pid",
                              "request_id"]
        assert (line["level"], line["logger"], line["role"]) == ("info", "elemta.smtpd", "smtpd")
    messages = [line["message"] for line in lines]
    assert messages[-1] == "SMTP listener stopped"
