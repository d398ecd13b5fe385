"""Streams under the production server: gunicorn, 2 gthread workers, other processes writing.

Clients are spread over the two workers by the kernel; a REST action (served by either worker)
and a CLI command in another process must reach every client, and SIGTERM must close every
stream with 1001 instead of leaving it to the graceful timeout.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from simple_websocket import ConnectionClosed

from app.extensions import db
from tests.conftest import TEST_ADMIN_KEY
from tests.helpers import queue_message
from tests.stream_helpers import (
    ROOT,
    StreamClient,
    close_quietly,
    flask_cli,
    receive,
    receive_until,
)

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _http(port: int, method: str, path: str) -> tuple[int, bytes]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, headers={"Authorization": f"Bearer {TEST_ADMIN_KEY}"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest.fixture
def gunicorn(app: Flask, database_url: str,
             tmp_path: Path) -> Iterator[tuple[int, subprocess.Popen]]:
    port = _free_port()
    # The project's own configuration file, unchanged: its post_worker_init hook is under test.
    config = os.path.join(ROOT, "gunicorn.conf.py")
    env = {**os.environ, "ELEMTA_DATABASE_URL": database_url,
           "ELEMTA_API_LISTEN": f"127.0.0.1:{port}", "WEB_CONCURRENCY": "2",
           "ELEMTA_API_THREADS": "24", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"),
           "ELEMTA_STREAM_POLL_INTERVAL": "0.5"}
    env.pop("ELEMTA_STARTED_AT", None)
    binary = os.path.join(os.path.dirname(sys.executable), "gunicorn")
    with open(tmp_path / "gunicorn.log", "wb") as log:
        process = subprocess.Popen([binary, "-c", config, "wsgi:app"], cwd=ROOT, env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(400):
            assert process.poll() is None, (tmp_path / "gunicorn.log").read_text()[-3000:]
            try:
                if _http(port, "GET", "/livez")[0] == 200:
                    break
            except OSError:
                time.sleep(0.05)
        yield port, process, tmp_path / "gunicorn.log"
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_two_workers_stream_every_change_and_close_cleanly_on_sigterm(
        app, gunicorn, database_url):
    port, process, log = gunicorn
    with app.app_context():
        message_id = queue_message(db.session)
        db.session.remove()
    clients = [StreamClient.connect(f"ws://127.0.0.1:{port}/api/queue/ws") for _ in range(8)]
    try:
        for client in clients:
            assert receive(client)["data"]["pending"] == 1

        status, body = _http(port, "POST", f"/api/queue/message/{message_id}/hold")
        assert status == 200, body
        for client in clients:
            frames = receive_until(client, lambda f: f["type"] == "queue_event")
            assert frames[-1]["data"] == {"message_id": message_id, "action": "held",
                                          "queue": "held"}

        flask_cli(database_url, "queue", "release", message_id)
        for client in clients:
            frames = receive_until(client, lambda f: f["type"] == "queue_event"
                                   and f["data"]["action"] == "released")
            assert frames[-1]["data"]["queue"] == "pending"

        process.send_signal(signal.SIGTERM)
        for client in clients:
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    text = client.receive(timeout=25)
                    assert text is not None, "no close frame"
                    json.loads(text)
            assert closed.value.reason == 1001
        # gunicorn's own graceful shutdown still ran (the hook chains to its handler): each
        # worker left its loop and exited by itself; none died of the signal or was killed at
        # graceful_timeout.
        assert process.wait(timeout=60) == 0
        records = [json.loads(line) for line in log.read_text().splitlines()
                   if line.startswith("{")]
        messages = [r.get("message", "") for r in records]
        assert sum(m.startswith("Worker exiting") for m in messages) == 2, messages
        assert not [m for m in messages if "was sent" in m or "WORKER TIMEOUT" in m
                    or "Exception in worker" in m], messages
    finally:
        for client in clients:
            close_quietly(client)


def test_sigterm_hook_is_installed_once_and_chains_to_gunicorns_handler(tmp_path):
    """Run in a child: the hook replaces the process's SIGTERM handler and flags every hub."""
    script = """
import os, signal, runpy
calls = []
signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))  # gunicorn's, here
config = runpy.run_path(os.path.join({root!r}, "gunicorn.conf.py"))
from app import create_app
from app.stream.hub import close_streams_on_sigterm, get_hub
hub = get_hub(create_app({{"DATABASE_URL": "sqlite:///" + {db!r}, "LOG_TO_DATABASE": False}}))
config["post_worker_init"](None)
handler = signal.getsignal(signal.SIGTERM)
close_streams_on_sigterm()  # a second installation (a merged hook) changes nothing
assert signal.getsignal(signal.SIGTERM) is handler
os.kill(os.getpid(), signal.SIGTERM)
assert calls == [signal.SIGTERM], calls
assert hub.closing
print("ok")
""".format(root=ROOT, db=str(tmp_path / "hook.db"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELEMTA_")}
    env.update(PYTHONPATH=ROOT, PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")
