"""Requests that gunicorn answers itself, and gunicorn's settings that the contract depends on.

The project's gunicorn.conf.py, unchanged, serving the app: raw sockets send what no HTTP
client library would (a NUL in the request line, a 9 kB URL, a 9 kB header), and every
answer must be the contract's JSON error.
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

from tests.stream_helpers import ROOT

pytestmark = pytest.mark.slow

GUNICORN = os.path.join(os.path.dirname(sys.executable), "gunicorn")
CONFIG = os.path.join(ROOT, "gunicorn.conf.py")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def exchange(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``raw`` as it is; the status, headers and body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(raw)
        received = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
            head, sep, body = received.partition(b"\r\n\r\n")
            if sep:
                lines = head.decode("latin-1").split("\r\n")
                headers = {k.strip().lower(): v.strip()
                           for k, _, v in (line.partition(":") for line in lines[1:])}
                if len(body) >= int(headers.get("content-length", "-1")) >= 0:
                    return int(lines[0].split()[1]), headers, body
    raise AssertionError(f"incomplete answer: {received[:300]!r}")


def get(port: int, target: str, extra: str = "", method: str = "GET") -> tuple[int, dict, bytes]:
    return exchange(port, f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}"
                          "Content-Length: 0\r\nConnection: close\r\n\r\n".encode("latin-1"))


def assert_json_error(answer, status: int, code: str) -> dict:
    got, headers, body = answer
    assert got == status, body[:300]
    assert headers["content-type"].startswith("application/json"), headers
    error = json.loads(body)
    assert set(error) == {"error", "code", "details"} and error["code"] == code, error
    return error


@pytest.fixture
def served(app: Flask, database_url: str, tmp_path: Path) -> Iterator[int]:
    port = _free_port()
    env = {**os.environ, "ELEMTA_DATABASE_URL": database_url, "ELEMTA_AUTH_MODE": "off",
           "ELEMTA_API_LISTEN": f"127.0.0.1:{port}", "WEB_CONCURRENCY": "1",
           "ELEMTA_API_THREADS": "4", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom")}
    env.pop("ELEMTA_STARTED_AT", None)
    log_path = tmp_path / "gunicorn.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([GUNICORN, "-c", CONFIG, "wsgi:app"], cwd=ROOT, env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(400):
            assert process.poll() is None, log_path.read_text()[-3000:]
            try:
                if get(port, "/livez")[0] == 200:
                    break
            except OSError:
                time.sleep(0.05)
        yield port
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_gunicorns_own_errors_are_the_contracts_json(served):
    # Over the request line limit: once gunicorn's HTML 414.
    assert_json_error(get(served, "/api/queue/all?x=" + "a" * 9000), 414, "URI_TOO_LONG")
    # A NUL in the request line: once gunicorn's HTML 400.
    assert_json_error(get(served, "/api/queue/all?x=\x00"), 400, "VALIDATION_ERROR")
    assert_json_error(exchange(served, b"NOT HTTP AT ALL\r\n\r\n"), 400, "VALIDATION_ERROR")
    # One header field over the limit.
    assert_json_error(get(served, "/api/queue/stats", f"X-Big: {'b' * 9000}\r\n"),
                      431, "HEADERS_TOO_LARGE")


def test_what_the_api_accepts_reaches_the_api(served):
    # A 5,000-character cursor was gunicorn's 414: now the API's own answer (too long a cursor).
    error = assert_json_error(get(served, "/api/queue/deferred?cursor=" + "A" * 5000),
                              400, "VALIDATION_ERROR")
    assert list(error["details"]) == ["cursor"]
    # Every listing filter at its longest fits in the request line.
    query = "&".join([f"sender={'s' * 320}", f"recipient={'r' * 320}", f"domain={'d' * 255}",
                      f"cursor={'c' * 512}", "after=2026-01-01T00:00:00Z",
                      "before=2026-01-02T00:00:00Z", "limit=100"])
    status, _, _ = get(served, f"/api/queue/all?{query}")
    assert status == 400  # the made-up cursor: the API answered, not the server


def test_doubled_slashes_are_a_json_404_not_a_redirect(served):
    for method, path in (("POST", "/api//queue/all/flush"), ("GET", "/api/queue//stats")):
        assert_json_error(get(served, path, method=method), 404, "NOT_FOUND")


def test_gunicorn_honours_no_forwarding_header_itself():
    """X-Forwarded-Proto is ProxyFix's business (ELEMTA_TRUSTED_PROXIES), never gunicorn's."""
    output = subprocess.run([GUNICORN, "-c", CONFIG, "--print-config", "wsgi:app"], cwd=ROOT,
                            capture_output=True, text=True, check=True,
                            env={**os.environ, "ELEMTA_API_LISTEN": "127.0.0.1:1"}).stdout
    settings = {name.strip(): value.strip() for name, _, value in
                (line.partition("=") for line in output.splitlines()) if value}
    assert settings["forwarded_allow_ips"] == "[]"
    assert settings["limit_request_line"] == "8190"
    assert settings["worker_class"] == "app.gunicorn_worker.JsonErrorThreadWorker"
