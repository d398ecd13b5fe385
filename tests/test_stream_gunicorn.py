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
from app.queue import service
from tests.conftest import TEST_ADMIN_KEY
from tests.helpers import queue_message, raw_message
from tests.stream_helpers import (
    ROOT,
    StreamClient,
    close_quietly,
    flask_cli,
    raw_websocket,
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
def gunicorn_env() -> dict[str, str]:
    """Settings added to the server's environment (a test parametrizes this to change them)."""
    return {}


@pytest.fixture
def gunicorn(app: Flask, database_url: str, tmp_path: Path,
             gunicorn_env: dict[str, str]) -> Iterator[tuple[int, subprocess.Popen]]:
    port = _free_port()
    # The project's own configuration file, unchanged: its post_worker_init hook is under test.
    config = os.path.join(ROOT, "gunicorn.conf.py")
    env = {**os.environ, "ELEMTA_DATABASE_URL": database_url,
           "ELEMTA_API_LISTEN": f"127.0.0.1:{port}", "WEB_CONCURRENCY": "2",
           "ELEMTA_API_THREADS": "24", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"),
           "ELEMTA_STREAM_POLL_INTERVAL": "0.5", **gunicorn_env}
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


def _frame(sock: socket.socket) -> tuple[int, bytes]:
    """The opcode and payload of the next (server-to-client, unmasked) frame on a raw socket."""
    def exactly(count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = sock.recv(count - len(data))
            assert chunk, "the server closed the connection"
            data += chunk
        return data

    head = exactly(2)
    length = head[1] & 0x7F
    if length == 126:
        length = int.from_bytes(exactly(2), "big")
    elif length == 127:
        length = int.from_bytes(exactly(8), "big")
    return head[0] & 0x0F, exactly(length)


def _close_code(sock: socket.socket) -> int:
    """Skip frames up to the server's close frame; its code."""
    sock.settimeout(30)
    while True:
        opcode, payload = _frame(sock)
        if opcode == 0x8:
            return int.from_bytes(payload[:2], "big")


# One worker, so that every client below is its own (with two, the kernel hands new clients
# to whichever worker is free). A queue of one frame: the burst below overflows every stalled
# client's queue at once, so the worker cuts them all off (1013) together.
@pytest.mark.parametrize("gunicorn_env", [{"WEB_CONCURRENCY": "1",
                                           "ELEMTA_STREAM_QUEUE_SIZE": "1"}])
def test_a_worker_cutting_off_stalled_clients_still_answers_new_ones(app, gunicorn):
    """Clients that stop reading and never answer the close frame (a frozen or vanished
    client) are cut off; that must not stop their worker from serving new clients meanwhile.

    gunicorn closed each such connection on the worker's main loop and waited up to 2 s for
    the client there: with ten of them, the worker accepted nothing for 20 s."""
    port, _, _ = gunicorn
    stalled = [raw_websocket(port, "/api/queue/ws" if i % 2 else "/api/logs/ws")
               for i in range(10)]
    probes: list[socket.socket] = []
    try:
        with app.app_context():  # every stream gets far more than its queue of one frame
            for _ in range(20):
                service.accept_message(
                    db.session, sender="a@example.com", recipients=["b@example.net"],
                    raw=raw_message("a@example.com", "b@example.net", "burst"), origin="api")
            db.session.commit()
            db.session.remove()
        # The server is cutting them off: in the defect, each worker's main loop was then stuck
        # in one close after the other, for 2 s each.
        assert _close_code(stalled[0]) == 1013
        for _ in range(6):
            # Generous (raw_websocket's handshake and the frame each within 10 s): the first
            # frame takes milliseconds; the defect took 2 s per client cut off.
            probes.append(raw_websocket(port, "/api/queue/ws"))
            opcode, payload = _frame(probes[-1])
            assert (opcode, json.loads(payload)["type"]) == (0x1, "queue_stats")
        assert [_close_code(sock) for sock in stalled[1:]] == [1013] * 9
    finally:
        for sock in stalled + probes:
            sock.close()


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
