"""The ``elemta`` console script: Elemta's groups under its own help, the same commands as flask."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from app import console
from app.console import build
from app.extensions import db
from app.logs.handler import shutdown_database_logging

BIN = os.path.dirname(sys.executable)


@pytest.fixture(autouse=True)
def no_database_log_handler(monkeypatch):
    """The commands here build apps without TESTING, which would store this process's log
    records in the database: a background thread of the handler, left running for the rest of
    the session on the shared test database (or the checkout's instance database for --help).
    The log handler has tests of its own (test_logs_handler.py)."""
    monkeypatch.setenv("ELEMTA_LOG_TO_DATABASE", "false")
    yield
    shutdown_database_logging()


def test_the_help_lists_elemtas_groups_not_flasks_server() -> None:
    result = CliRunner().invoke(build(), ["--help"])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0] == "Usage: elemta [OPTIONS] COMMAND [ARGS]..."
    titles = [line for line in lines if line and not line.startswith(" ")][1:]
    assert titles[:6] == ["Options:", "Services:", "Queue and history:", "Delivery control:",
                          "Keys, signing and DNS:", "Database and demo data:"]
    commands = {line.split()[0] for line in lines if line.startswith("  ") and line.strip()}
    assert {"api", "worker", "smtpd", "queue", "logs", "stats", "policy", "suppression", "rule",
            "apikey", "db", "demo"} <= commands
    assert not {"run", "shell", "routes"} & commands
    assert "--app" not in result.output and "--debug" not in result.output


def test_a_command_answers_as_under_flask(app, database_url, monkeypatch) -> None:
    # ``app`` empties the test database first.
    created = []
    original = console.load_app

    def load_and_keep(*args, **kwargs):
        created.append(original(*args, **kwargs))
        return created[-1]

    monkeypatch.setattr(console, "load_app", load_and_keep, raising=True)
    try:
        result = CliRunner().invoke(console.build(), ["queue", "stats", "--json"],
                                    env={"ELEMTA_DATABASE_URL": database_url,
                                         "ELEMTA_LOG_TO_DATABASE": "false"})
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["total"] == 0
    finally:
        # The command's own app must close its pool here: a connection left to the garbage
        # collector fails whichever later test is running when it goes (ResourceWarning).
        for made in created:
            with made.app_context():
                db.engine.dispose()


def test_the_installed_script_refuses_a_bad_setting_in_one_line(tmp_path) -> None:
    """Installed by ``make setup`` (pip install -e .); any directory, no FLASK_APP."""
    env = dict(os.environ, ELEMTA_RELAY_HOST="host:notaport")
    env.pop("FLASK_APP", None)
    done = subprocess.run([os.path.join(BIN, "elemta"), "queue", "stats"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr == "Error: ELEMTA_RELAY_HOST: 'host:notaport' is not host:port\n"
