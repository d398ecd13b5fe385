"""The production processes on loopback for the dashboard's browser tests and screenshots.

gunicorn (the project's own gunicorn.conf.py), ``flask worker`` relaying to an aiosmtpd sink,
a temporary SQLite database filled by ``flask demo seed``, and API keys made with
``flask apikey create``. Nothing here touches a host other than 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from aiosmtpd.controller import Controller

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# Recipient domains the sink treats specially (everything else is accepted at once).
DEFER_DOMAIN = "defer.test"  # 451, with hostile markup in the reply text
SLOW_DOMAIN = "slow.test"  # accepted after SLOW_SECONDS: the message stays pending meanwhile
SLOW_SECONDS = 3.0
HOSTILE = '<img src=x onerror="alert(document.domain)">'


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _SinkHandler:
    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:
        if address.lower().endswith("@" + DEFER_DOMAIN):
            return f"451 4.7.1 Greylisted {HOSTILE} try later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if any(r.lower().endswith("@" + SLOW_DOMAIN) for r in envelope.rcpt_tos):
            await asyncio.sleep(SLOW_SECONDS)
        with self.sink.lock:
            self.sink.received.extend(envelope.rcpt_tos)
        return "250 2.0.0 Ok: queued"


@dataclass
class Sink:
    """An SMTP server on 127.0.0.1 standing in for every remote host (ELEMTA_RELAY_HOST)."""

    port: int = field(default_factory=free_port)
    received: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._controller = Controller(_SinkHandler(self), hostname="127.0.0.1", port=self.port)

    def start(self) -> Sink:
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Stack:
    """One API server (and optionally a delivery worker) on a database of its own."""

    workdir: Path
    database_url: str
    env_extra: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        environ = {k: v for k, v in os.environ.items()
                   if not k.startswith("ELEMTA_") or k == "ELEMTA_TEST_DATABASE_URL"}
        environ.pop("ELEMTA_TEST_DATABASE_URL", None)
        environ.update({
            "ELEMTA_DATABASE_URL": self.database_url, "FLASK_APP": "wsgi.py",
            "ELEMTA_API_LISTEN": f"127.0.0.1:{self.port}", "WEB_CONCURRENCY": "1",
            "ELEMTA_API_THREADS": "48",
            "PROMETHEUS_MULTIPROC_DIR": str(self.workdir / f"prom-{self.port}"),
            "ELEMTA_STREAM_POLL_INTERVAL": "0.25", "PYTHONPATH": str(ROOT),
        })
        environ.update(self.env_extra)
        return environ

    def cli(self, *args: str) -> str:
        result = subprocess.run([str(BIN / "flask"), *args], cwd=ROOT, env=self.env(),
                                capture_output=True, text=True, timeout=180)
        if result.returncode != 0:
            raise RuntimeError(f"flask {' '.join(args)}: {result.stderr[-2000:]}")
        return result.stdout

    def create_key(self, name: str, role: str) -> str:
        return self.cli("apikey", "create", "--name", name, "--role", role).strip()

    def _spawn(self, name: str, argv: list[str]) -> None:
        os.makedirs(self.workdir / f"prom-{self.port}", exist_ok=True)
        with open(self.workdir / f"{name}-{self.port}.log", "wb") as log:
            self.processes[name] = subprocess.Popen(argv, cwd=ROOT, env=self.env(), stdout=log,
                                                    stderr=subprocess.STDOUT)

    def start_api(self) -> Stack:
        self._spawn("gunicorn", [str(BIN / "gunicorn"), "-c", str(ROOT / "gunicorn.conf.py"),
                                 "wsgi:app"])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.processes["gunicorn"].poll() is not None:
                raise RuntimeError(self.log("gunicorn")[-3000:])
            try:
                if self.request("GET", "/livez").status == 200:
                    return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("gunicorn did not answer /livez within 60 s")

    def start_worker(self) -> Stack:
        self._spawn("worker", [str(BIN / "flask"), "worker"])
        return self

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}-{self.port}.log").read_text(errors="replace")

    def stop(self, name: str | None = None) -> None:
        names = [name] if name else list(self.processes)
        for each in names:
            process = self.processes.pop(each, None)
            if process is None or process.poll() is not None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def request(self, method: str, path: str, *, key: str | None = None,
                query: dict[str, Any] | None = None, body: Any = None) -> Response:
        if query:
            path += "?" + urlencode({k: v for k, v in query.items() if v is not None})
        headers = {"Accept": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            return Response(response.status, dict(response.getheaders()), response.read())
        finally:
            conn.close()

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.request(method, path, **kwargs)
        assert response.status < 400, (method, path, response.status, response.body[:500])
        return response.json()


def wait_for(condition: Any, timeout: float = 30.0, interval: float = 0.2) -> Any:
    """Poll ``condition`` until it returns something truthy; that value, or AssertionError."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {condition}")
        time.sleep(interval)


def seeded_stack(workdir: Path, name: str, *, sink: Sink | None, seed: int = 42,
                 messages: int = 300, events: int = 3000, **env: str) -> Stack:
    """A migrated SQLite database of its own, seeded, with gunicorn started on it."""
    extra = dict(env)
    if sink is not None:
        extra.update({"ELEMTA_RELAY_HOST": f"127.0.0.1:{sink.port}",
                      "ELEMTA_RETRY_SCHEDULE": "120", "ELEMTA_SEND_BOUNCES": "false"})
    stack = Stack(workdir, f"sqlite:///{workdir / (name + '.db')}", extra)
    stack.cli("db", "upgrade")
    stack.cli("demo", "seed", "--seed", str(seed), "--messages", str(messages),
              "--events", str(events), "--days", "365")
    return stack.start_api()
