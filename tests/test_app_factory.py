"""``create_app`` for the processes that answer no HTTP request (``flask worker``, ``flask
smtpd``, ``flask webhook dispatch``): the same commands, without the API's packages, whose
imports were a third of the worker's start-up (docs/PERFORMANCE.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLASK = os.path.join(os.path.dirname(sys.executable), "flask")
API_PACKAGES = ("flask_smorest", "flask_migrate", "flask_sock", "apispec", "app.api",
                "app.queue.routes", "app.ratelimit", "app.auth.guard")

# Runs the installed ``flask`` script in this interpreter, then names the API's packages loaded.
PROBE = """
import json, runpy, sys
sys.argv = [sys.argv[1], *sys.argv[2:]]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "loaded": [m for m in %r if m in sys.modules]}))
"""


def _flask(*args: str, tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELEMTA_")}
    env.update(FLASK_APP="wsgi.py", ELEMTA_DATABASE_URL=f"sqlite:///{tmp_path}/probe.db")
    done = subprocess.run([sys.executable, "-c", PROBE % (API_PACKAGES,), FLASK, *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("command", [["worker", "--help"], ["smtpd", "--help"],
                                     ["webhook", "dispatch", "--help"]])
def test_a_service_that_answers_no_http_loads_none_of_the_api(command, tmp_path) -> None:
    probe = _flask(*command, tmp_path=tmp_path)
    assert probe == {"code": 0, "loaded": []}


def test_every_other_command_gets_the_whole_application(tmp_path) -> None:
    probe = _flask("routes", tmp_path=tmp_path)
    assert probe["code"] in (0, None)
    assert set(probe["loaded"]) == set(API_PACKAGES)
