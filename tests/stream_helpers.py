"""Live servers and WebSocket clients for the stream tests (tests/test_stream*.py)."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from flask import Flask
from simple_websocket import Client, ConnectionClosed
from werkzeug.serving import make_server

from app.stream.hub import get_hub

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Generous: the contract is 2 s, but a loaded CI machine must not make the tests flaky.
RECEIVE_TIMEOUT = 15.0


class StreamClient(Client):
    """simple-websocket's client, minus one bug: frames that arrive in the same read as the
    handshake response stayed in wsproto's buffer until the next read (simple-websocket 1.1)."""

    def handshake(self) -> None:
        super().handshake()
        self._handle_events()


class LiveServer:
    """A threaded werkzeug server running the app on a free loopback port."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self._server = make_server("127.0.0.1", 0, app, threaded=True)
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="test-live-server", daemon=True)
        self._clients: list[Client] = []

    def start(self) -> LiveServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        for client in self._clients:
            close_quietly(client)
        get_hub(self.app).shutdown()
        self._server.shutdown()
        self._thread.join(10)
        self._server.server_close()

    @property
    def hub(self):  # noqa: ANN201
        return get_hub(self.app)

    def ws_url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def connect(self, path: str, **kwargs: Any) -> Client:
        client = StreamClient.connect(self.ws_url(path), **kwargs)
        self._clients.append(client)
        return client

    def request(self, method: str, path: str, body: Any = None,
                headers: dict[str, str] | None = None) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            payload = None if body is None else json.dumps(body)
            all_headers = {"Content-Type": "application/json"} if payload else {}
            all_headers.update(headers or {})
            conn.request(method, path, body=payload, headers=all_headers)
            response = conn.getresponse()
            data = response.read()
            return response.status, json.loads(data) if data else None
        finally:
            conn.close()

    def handshake(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        """A WebSocket upgrade request over plain HTTP: the status and JSON body when refused."""
        upgrade = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
                   "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
        upgrade.update(headers or {})
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("GET", path, headers=upgrade)
            response = conn.getresponse()
            if response.status == 101:
                return 101, None
            return response.status, json.loads(response.read())
        finally:
            conn.close()


def close_quietly(client: Client) -> None:
    try:
        client.close()
    except (ConnectionClosed, OSError):
        pass
    client.thread.join(5)


def receive(client: Client, timeout: float = RECEIVE_TIMEOUT) -> dict[str, Any]:
    """The next frame as JSON; fails when none comes within ``timeout``."""
    text = client.receive(timeout=timeout)
    assert text is not None, f"no frame within {timeout} s"
    return json.loads(text)


def receive_until(client: Client, predicate: Callable[[dict[str, Any]], bool],
                  timeout: float = RECEIVE_TIMEOUT) -> list[dict[str, Any]]:
    """Frames up to and including the first that matches ``predicate``."""
    received = []
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no matching frame within {timeout} s; got {received}"
        text = client.receive(timeout=remaining)
        assert text is not None, f"no matching frame within {timeout} s; got {received}"
        frame = json.loads(text)
        received.append(frame)
        if predicate(frame):
            return received


def no_frame(client: Client, wait: float = 1.5) -> bool:
    return client.receive(timeout=wait) is None


def wait_until(condition: Callable[[], bool], timeout: float = RECEIVE_TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def raw_websocket(port: int, path: str) -> socket.socket:
    """A bare TCP socket that completes the WebSocket handshake and then does nothing."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        assert chunk, "server closed during the handshake"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def run_in_other_process(database_url: str, code: str, *args: str,
                         env: dict[str, str] | None = None) -> str:
    """Run Python code in a separate interpreter against the same database; its stdout."""
    environment = dict(os.environ, ELEMTA_DATABASE_URL=database_url,
                       PYTHONPATH=ROOT, **(env or {}))
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=environment,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def flask_cli(database_url: str, *args: str, env: dict[str, str] | None = None) -> str:
    environment = dict(os.environ, ELEMTA_DATABASE_URL=database_url, FLASK_APP="wsgi.py",
                       PYTHONPATH=ROOT, **(env or {}))
    flask = os.path.join(os.path.dirname(sys.executable), "flask")
    result = subprocess.run([flask, *args], cwd=ROOT, env=environment, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@contextmanager
def live_server(app: Flask) -> Iterator[LiveServer]:
    server = LiveServer(app).start()
    try:
        yield server
    finally:
        server.stop()
