"""``make run`` (scripts/run_all.py): a busy port is refused before anything starts; signalling
make alone stops every part."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.conftest import migrate_database
from tests.smtpd_helpers import free_port, port_is_free

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# make with SIGINT at its default disposition, in a session of its own (as from a terminal, but
# only make gets the signal): a test runner started in the background may ignore SIGINT.
MAKE_WITH_SIGINT = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                    "os.execvp('make', sys.argv[1:])")


def _env(tmp_path, api_port: int, smtp_port: int) -> dict[str, str]:
    env = dict(os.environ, ELEMTA_API_LISTEN=f"127.0.0.1:{api_port}",
               ELEMTA_SMTP_LISTEN=f"127.0.0.1:{smtp_port}", WEB_CONCURRENCY="1",
               ELEMTA_DATABASE_URL=f"sqlite:///{tmp_path}/run-all.db")
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return env


@pytest.mark.parametrize("busy", ["api", "smtpd"])
def test_a_busy_port_is_refused_before_anything_starts(tmp_path, busy: str) -> None:
    api_port, smtp_port = free_port(), free_port()
    taken = api_port if busy == "api" else smtp_port
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", taken))
        holder.listen()
        done = subprocess.run([sys.executable, "scripts/run_all.py"], cwd=ROOT,
                              env=_env(tmp_path, api_port, smtp_port), capture_output=True,
                              text=True, timeout=180)
    setting = "ELEMTA_API_LISTEN" if busy == "api" else "ELEMTA_SMTP_LISTEN"
    assert done.returncode == 1
    assert done.stderr == (f"run_all: 127.0.0.1:{taken} ({busy}) is already in use, by another "
                           f"`make run` or another program; stop it, or set {setting} to a "
                           f"free host:port\n")
    assert "starting" not in done.stderr


@pytest.mark.slow
def test_signalling_make_alone_stops_every_part(tmp_path) -> None:
    api_port, smtp_port = free_port(), free_port()
    env = _env(tmp_path, api_port, smtp_port)
    migrate_database(env["ELEMTA_DATABASE_URL"])
    # -o migrate: the database is migrated above; nothing is installed either.
    make = subprocess.Popen([sys.executable, "-c", MAKE_WITH_SIGINT, "make", "-s", "-o",
                             "migrate", "run"], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180  # a safety net for a broken start, not a measurement
        while True:
            assert make.poll() is None, make.stdout.read()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/livez", timeout=5):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the API never answered"
                time.sleep(0.5)
        while port_is_free(smtp_port):  # the listener binds after the API may already answer
            assert make.poll() is None and time.monotonic() < deadline
            time.sleep(0.5)
        os.kill(make.pid, signal.SIGINT)  # make alone: its children are in the same session
        output, _ = make.communicate(timeout=180)
    finally:
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGKILL)
            make.wait()
    assert "run_all: the parent process was signalled; stopping" in output
    assert output.rstrip().endswith("run_all: stopped")
    assert make.returncode != 0  # make re-raises the SIGINT it got once its child is done
    assert port_is_free(api_port) and port_is_free(smtp_port)
